"""How the local kubelet runs a pod's container from an image (pure).

`plan_container(pod, container, bundle)` reads a container of a Pod object together with the
image found in the local store into a `ContainerPlan`: the argv rules, the security context,
the volumes and where they are mounted. Anything the local kubelet cannot honour raises
`PodPlanError` with the field it is about; the caller puts it on the pod's status.

`launch_spec(...)` turns a plan, the environment and the volumes' resolved host paths into the
JSON document `localcluster.kube.container` (the launcher) acts on, so everything the
launcher does is decided here, where a table of cases can check it.

Rules followed (Kubernetes', with Docker's/containerd's runtime defaults):
- argv: neither `command` nor `args`: ENTRYPOINT + CMD; `command` only: command (the image's
  ENTRYPOINT and CMD are both ignored); `args` only: ENTRYPOINT + args; both: command + args;
- capabilities: Docker's default set unless `privileged` (every capability); `drop` then
  `add` (`ALL` allowed in both; names with or without `CAP_`); a non-root user keeps them only
  in its bounding set (as Docker: permitted and effective are cleared on the uid change);
- user: `runAsUser`/`runAsGroup` of the container, else of the pod, else the image's `User`
  (`uid`, `name`, `uid:gid`, `name:group`, names read from the image's /etc/passwd and
  /etc/group by the launcher); no group given: the user's from /etc/passwd, else 0;
- `allowPrivilegeEscalation: false` sets no_new_privs (not with `privileged`).
- hostPath: the machine-wide paths (`MACHINE_PATHS`) are the machine's own; every other path
  lives in the node's own "host" directory, `<state>/nodes/<node>/host<path>`.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from localcluster.kube.hostnet import hosts_file as hosts_file
from localcluster.kube.hostnet import resolv_conf as resolv_conf


class PodPlanError(ValueError):
    """The pod cannot be run as written; the message names the field."""


class Bundle(Protocol):
    """What planning needs of an image (`localcluster.kube.images.ImageBundle`)."""

    @property
    def ref(self) -> str: ...
    @property
    def rootfs(self) -> Path: ...
    @property
    def env(self) -> tuple[str, ...]: ...
    @property
    def entrypoint(self) -> tuple[str, ...]: ...
    @property
    def cmd(self) -> tuple[str, ...]: ...
    @property
    def working_dir(self) -> str: ...
    @property
    def user(self) -> str: ...


# --- capabilities ----------------------------------------------------------------------------

CAPABILITIES: dict[str, int] = {
    "CHOWN": 0,
    "DAC_OVERRIDE": 1,
    "DAC_READ_SEARCH": 2,
    "FOWNER": 3,
    "FSETID": 4,
    "KILL": 5,
    "SETGID": 6,
    "SETUID": 7,
    "SETPCAP": 8,
    "LINUX_IMMUTABLE": 9,
    "NET_BIND_SERVICE": 10,
    "NET_BROADCAST": 11,
    "NET_ADMIN": 12,
    "NET_RAW": 13,
    "IPC_LOCK": 14,
    "IPC_OWNER": 15,
    "SYS_MODULE": 16,
    "SYS_RAWIO": 17,
    "SYS_CHROOT": 18,
    "SYS_PTRACE": 19,
    "SYS_PACCT": 20,
    "SYS_ADMIN": 21,
    "SYS_BOOT": 22,
    "SYS_NICE": 23,
    "SYS_RESOURCE": 24,
    "SYS_TIME": 25,
    "SYS_TTY_CONFIG": 26,
    "MKNOD": 27,
    "LEASE": 28,
    "AUDIT_WRITE": 29,
    "AUDIT_CONTROL": 30,
    "SETFCAP": 31,
    "MAC_OVERRIDE": 32,
    "MAC_ADMIN": 33,
    "SYSLOG": 34,
    "WAKE_ALARM": 35,
    "BLOCK_SUSPEND": 36,
    "AUDIT_READ": 37,
    "PERFMON": 38,
    "BPF": 39,
    "CHECKPOINT_RESTORE": 40,
}
# Docker's (and containerd's) default set for a container that is not privileged.
DEFAULT_CAPABILITIES = frozenset(
    {
        "CHOWN",
        "DAC_OVERRIDE",
        "FSETID",
        "FOWNER",
        "MKNOD",
        "NET_RAW",
        "SETGID",
        "SETUID",
        "SETFCAP",
        "SETPCAP",
        "NET_BIND_SERVICE",
        "SYS_CHROOT",
        "KILL",
        "AUDIT_WRITE",
    }
)


def cap_name(raw: str, field: str) -> str:
    """`NET_ADMIN`, `CAP_NET_ADMIN`, `net_admin` -> `NET_ADMIN`; `ALL` stays `ALL`."""
    name = raw.strip().upper().removeprefix("CAP_")
    if name != "ALL" and name not in CAPABILITIES:
        raise PodPlanError(f"{field}: unknown capability {raw!r}")
    return name


def capability_set(
    add: Sequence[str], drop: Sequence[str], privileged: bool, last_cap: int
) -> frozenset[int]:
    """The numbers of the capabilities the container gets (bounding, and for root also
    permitted and effective), on a kernel whose highest capability is `last_cap`."""
    every = frozenset(range(last_cap + 1))
    if privileged:
        return every
    names = set(DEFAULT_CAPABILITIES)
    if "ALL" in drop:
        names.clear()
    names -= set(drop)
    out = {CAPABILITIES[n] for n in names}
    if "ALL" in add:
        out |= every
    out |= {CAPABILITIES[n] for n in add if n != "ALL"}
    return frozenset(c for c in out if c <= last_cap)


def cap_mask(caps: frozenset[int]) -> int:
    """The /proc/<pid>/status form (CapEff, CapBnd) of a set, as an integer."""
    return sum(1 << c for c in caps)


# --- argv ------------------------------------------------------------------------------------


def image_argv(
    entrypoint: Sequence[str],
    cmd: Sequence[str],
    command: Sequence[str],
    args: Sequence[str],
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(from the image, from the pod): the two parts of argv by Kubernetes' rules. Only the
    pod's part is `$(VAR)`-expanded later, as the kubelet does."""
    if command:
        return (), (*command, *args)
    if args:
        return tuple(entrypoint), tuple(args)
    return (*entrypoint, *cmd), ()


# --- users -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UserPlan:
    """Who the container runs as: numbers when known, names to resolve in the image."""

    uid: int | None = None
    gid: int | None = None
    user_name: str = ""  # resolved by the launcher from the image's /etc/passwd
    group_name: str = ""  # from /etc/group
    supplemental: tuple[int, ...] = ()
    non_root: bool = False  # runAsNonRoot


@dataclass(frozen=True, slots=True)
class ResolvedUser:
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str


def parse_image_user(user: str) -> tuple[int | None, int | None, str, str]:
    """(uid, gid, user name, group name) of an image's `User` (`uid`, `name`, `u:g`)."""
    u, _, g = user.partition(":")
    uid = int(u) if u.isdigit() else None
    gid = int(g) if g.isdigit() else None
    return uid, gid, (u if uid is None else ""), (g if gid is None else "")


def parse_passwd(text: str) -> list[tuple[str, int, int, str]]:
    """(name, uid, gid, home) of each well-formed line of an /etc/passwd."""
    out: list[tuple[str, int, int, str]] = []
    for line in text.splitlines():
        f = line.split(":")
        if len(f) >= 6 and f[2].isdigit() and f[3].isdigit():
            out.append((f[0], int(f[2]), int(f[3]), f[5]))
    return out


def parse_group(text: str) -> list[tuple[str, int, tuple[str, ...]]]:
    """(name, gid, members) of each well-formed line of an /etc/group."""
    out: list[tuple[str, int, tuple[str, ...]]] = []
    for line in text.splitlines():
        f = line.split(":")
        if len(f) >= 3 and f[2].isdigit():
            members = tuple(m for m in (f[3].split(",") if len(f) > 3 else []) if m)
            out.append((f[0], int(f[2]), members))
    return out


def resolve_user(plan: UserPlan, passwd: str, group: str) -> ResolvedUser:
    """Numbers for a UserPlan from the image's /etc/passwd and /etc/group texts (either may
    be empty). Raises PodPlanError when a name is unknown or runAsNonRoot is violated."""
    users = parse_passwd(passwd)
    groups = parse_group(group)
    uid = plan.uid
    entry = None
    if uid is None:
        name = plan.user_name or "root"
        entry = next((e for e in users if e[0] == name), None)
        if entry is None:
            if plan.user_name:
                raise PodPlanError(f"user {name!r} is not in the image's /etc/passwd")
            uid = 0
        else:
            uid = entry[1]
    else:
        entry = next((e for e in users if e[1] == uid), None)
    if plan.non_root and uid == 0:
        raise PodPlanError("runAsNonRoot is set but the container would run as root (uid 0)")
    gid = plan.gid
    if gid is None and plan.group_name:
        found = next((g for g in groups if g[0] == plan.group_name), None)
        if found is None:
            raise PodPlanError(f"group {plan.group_name!r} is not in the image's /etc/group")
        gid = found[1]
    if gid is None:
        gid = entry[2] if entry is not None else 0
    extra: list[int] = []
    if entry is not None:  # the groups /etc/group lists the user in, as runtimes add them
        extra = [g[1] for g in groups if entry[0] in g[2]]
    supplementary = tuple(dict.fromkeys([gid, *extra, *plan.supplemental]))
    home = entry[3] if entry is not None and entry[3] else "/"
    return ResolvedUser(uid, gid, supplementary, home)


# --- volumes ---------------------------------------------------------------------------------

# hostPath paths that are the machine's own on every node (the node agent's netns directory,
# bpffs, kernel modules and headers); any other hostPath is per node.
MACHINE_PATHS = (
    "/proc",
    "/sys",
    "/dev",
    "/run/netns",
    "/var/run/netns",
    "/lib/modules",
    "/usr/src",
    "/sys/fs/bpf",
)
HOST_PATH_TYPES = frozenset(
    {"", "DirectoryOrCreate", "Directory", "FileOrCreate", "File", "Socket", "CharDevice"}
)
PROPAGATIONS = {"": "rprivate", "None": "rprivate", "HostToContainer": "rslave"}
PROPAGATIONS["Bidirectional"] = "rshared"


def host_path_source(path: str, node_host_dir: Path) -> Path:
    """Where a hostPath is on this machine: itself when machine-wide, else under the node's
    host directory (`<node_host_dir><path>`)."""
    norm = posixpath.normpath("/" + path.lstrip("/"))
    for m in MACHINE_PATHS:
        if norm == m or norm.startswith(m + "/"):
            return Path(norm)
    return Path(str(node_host_dir) + norm)


@dataclass(frozen=True, slots=True)
class KeyToPath:
    key: str
    path: str
    mode: int | None = None


@dataclass(frozen=True, slots=True)
class DownwardItem:
    path: str
    field: str  # a fieldRef fieldPath
    mode: int | None = None


@dataclass(frozen=True, slots=True)
class FileSource:
    """One source of files in a secret/configMap/downwardAPI/projected volume."""

    kind: str  # "secret" | "configMap" | "downwardAPI" | "serviceAccountToken"
    name: str = ""  # of the Secret or ConfigMap
    items: tuple[KeyToPath, ...] = ()
    optional: bool = False
    downward: tuple[DownwardItem, ...] = ()
    audience: str = ""
    expiration_s: int = 3600
    token_path: str = ""


@dataclass(frozen=True, slots=True)
class Volume:
    name: str
    kind: str  # "hostPath" | "emptyDir" | "files"
    path: str = ""  # hostPath
    host_type: str = ""  # hostPath type
    memory: bool = False  # emptyDir medium Memory
    sources: tuple[FileSource, ...] = ()
    default_mode: int = 0o644


@dataclass(frozen=True, slots=True)
class Mount:
    volume: str
    path: str  # mountPath, absolute inside the container
    sub_path: str = ""
    read_only: bool = False
    propagation: str = "rprivate"  # rprivate | rslave | rshared


# --- the plan --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ContainerPlan:
    image_ref: str
    image_id: str
    rootfs: str
    image_env: tuple[str, ...]
    image_argv: tuple[str, ...]  # ENTRYPOINT/CMD part, used as it is
    pod_argv: tuple[str, ...]  # command/args part, `$(VAR)`-expanded at start
    working_dir: str
    user: UserPlan
    privileged: bool
    cap_add: tuple[str, ...]
    cap_drop: tuple[str, ...]
    no_new_privs: bool
    read_only_root: bool
    volumes: tuple[Volume, ...]
    mounts: tuple[Mount, ...]
    dns_policy: str
    hostname: str


def _dict(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _list(v: Any) -> list[Any]:
    return v if isinstance(v, list) else []


def _int(v: Any, field: str) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise PodPlanError(f"{field}: {v!r} is not a non-negative integer")
    return v


def plan_container(
    pod: Mapping[str, Any], container: Mapping[str, Any], bundle: Bundle, image_id: str = ""
) -> ContainerPlan:
    md = _dict(pod.get("metadata"))
    spec = _dict(pod.get("spec"))
    psc = _dict(spec.get("securityContext"))
    csc = _dict(container.get("securityContext"))
    command = [str(c) for c in _list(container.get("command"))]
    args = [str(a) for a in _list(container.get("args"))]
    from_image, from_pod = image_argv(bundle.entrypoint, bundle.cmd, command, args)
    if not from_image and not from_pod:
        raise PodPlanError(
            f"container {container.get('name')!r}: no command: neither the pod nor image "
            f"{bundle.ref} gives one"
        )
    privileged = bool(csc.get("privileged", False))
    caps = _dict(csc.get("capabilities"))
    add = tuple(cap_name(str(c), "capabilities.add") for c in _list(caps.get("add")))
    drop = tuple(cap_name(str(c), "capabilities.drop") for c in _list(caps.get("drop")))
    ape = csc.get("allowPrivilegeEscalation")
    if ape is False and privileged:
        raise PodPlanError("securityContext: allowPrivilegeEscalation false with privileged")
    volumes = tuple(_volume(v, i) for i, v in enumerate(_list(spec.get("volumes"))))
    names = {v.name for v in volumes}
    mounts = tuple(_mount(m, i, names) for i, m in enumerate(_list(container.get("volumeMounts"))))
    hostname = str(spec.get("hostname") or md.get("name", ""))
    if spec.get("hostNetwork"):
        hostname = str(spec.get("nodeName", hostname))
    return ContainerPlan(
        image_ref=bundle.ref,
        image_id=image_id,
        rootfs=str(bundle.rootfs),
        image_env=tuple(bundle.env),
        image_argv=from_image,
        pod_argv=from_pod,
        working_dir=str(container.get("workingDir") or bundle.working_dir or "/"),
        user=_user(psc, csc, bundle.user),
        privileged=privileged,
        cap_add=add,
        cap_drop=drop,
        no_new_privs=ape is False,
        read_only_root=bool(csc.get("readOnlyRootFilesystem", False)),
        volumes=volumes,
        mounts=mounts,
        dns_policy=str(spec.get("dnsPolicy") or "ClusterFirst"),
        hostname=hostname,
    )


def _user(psc: Mapping[str, Any], csc: Mapping[str, Any], image_user: str) -> UserPlan:
    def pick(key: str) -> int | None:
        v = csc.get(key, psc.get(key))
        return _int(v, f"securityContext.{key}")

    uid, gid = pick("runAsUser"), pick("runAsGroup")
    i_uid, i_gid, i_user, i_group = parse_image_user(image_user)
    user_name = group_name = ""
    if uid is None:
        uid, user_name = i_uid, i_user
        if gid is None:
            gid, group_name = i_gid, i_group
    supplemental = [
        _int(g, "securityContext.supplementalGroups") for g in _list(psc.get("supplementalGroups"))
    ]
    fs_group = _int(psc.get("fsGroup"), "securityContext.fsGroup")
    extra = tuple(g for g in (*supplemental, fs_group) if g is not None)
    non_root = bool(csc.get("runAsNonRoot", psc.get("runAsNonRoot", False)))
    if non_root and uid == 0:
        raise PodPlanError("runAsNonRoot is set but runAsUser is 0")
    return UserPlan(uid, gid, user_name, group_name, extra, non_root)


def _mode(v: Any, field: str) -> int | None:
    m = _int(v, field)
    if m is not None and m > 0o777:
        raise PodPlanError(f"{field}: mode {v!r} is above 0777")
    return m


def _rel_path(p: str, field: str) -> str:
    norm = posixpath.normpath(p)
    if not p or p.startswith("/") or norm == ".." or norm.startswith("../"):
        raise PodPlanError(f"{field}: {p!r} must be a relative path without '..'")
    return norm


def _items(v: Any, field: str) -> tuple[KeyToPath, ...]:
    out = []
    for i, it in enumerate(_list(v)):
        it = _dict(it)
        out.append(
            KeyToPath(
                key=str(it.get("key", "")),
                path=_rel_path(str(it.get("path", "")), f"{field}.items[{i}].path"),
                mode=_mode(it.get("mode"), f"{field}.items[{i}].mode"),
            )
        )
    return tuple(out)


def _downward(v: Any, field: str) -> tuple[DownwardItem, ...]:
    out = []
    for i, it in enumerate(_list(v)):
        it = _dict(it)
        ref = _dict(it.get("fieldRef"))
        fp = str(ref.get("fieldPath", ""))
        if not fp:
            raise PodPlanError(f"{field}.items[{i}]: only fieldRef is supported")
        out.append(
            DownwardItem(
                path=_rel_path(str(it.get("path", "")), f"{field}.items[{i}].path"),
                field=fp,
                mode=_mode(it.get("mode"), f"{field}.items[{i}].mode"),
            )
        )
    return tuple(out)


def _source(kind: str, v: Mapping[str, Any], field: str, name_key: str) -> FileSource:
    return FileSource(
        kind=kind,
        name=str(v.get(name_key, "")),
        items=_items(v.get("items"), field),
        optional=bool(v.get("optional", False)),
    )


def _volume(v: Any, i: int) -> Volume:
    v = _dict(v)
    name = str(v.get("name", ""))
    field = f"spec.volumes[{i}] ({name})"
    if "hostPath" in v:
        hp = _dict(v["hostPath"])
        t = str(hp.get("type") or "")
        path = str(hp.get("path", ""))
        if t not in HOST_PATH_TYPES:
            raise PodPlanError(f"{field}: hostPath type {t!r} is not supported")
        if not path.startswith("/"):
            raise PodPlanError(f"{field}: hostPath path {path!r} is not absolute")
        return Volume(name, "hostPath", path=path, host_type=t)
    if "emptyDir" in v:
        medium = str(_dict(v["emptyDir"]).get("medium") or "")
        if medium not in ("", "Memory"):
            raise PodPlanError(f"{field}: emptyDir medium {medium!r} is not supported")
        return Volume(name, "emptyDir", memory=medium == "Memory")
    if "secret" in v:
        s = _dict(v["secret"])
        m = _mode(s.get("defaultMode"), f"{field}.secret.defaultMode")
        src = _source("secret", s, f"{field}.secret", "secretName")
        return Volume(name, "files", sources=(src,), default_mode=m if m is not None else 0o644)
    if "configMap" in v:
        c = _dict(v["configMap"])
        m = _mode(c.get("defaultMode"), f"{field}.configMap.defaultMode")
        src = _source("configMap", c, f"{field}.configMap", "name")
        return Volume(name, "files", sources=(src,), default_mode=m if m is not None else 0o644)
    if "downwardAPI" in v:
        d = _dict(v["downwardAPI"])
        m = _mode(d.get("defaultMode"), f"{field}.downwardAPI.defaultMode")
        src = FileSource("downwardAPI", downward=_downward(d.get("items"), f"{field}.downwardAPI"))
        return Volume(name, "files", sources=(src,), default_mode=m if m is not None else 0o644)
    if "projected" in v:
        p = _dict(v["projected"])
        m = _mode(p.get("defaultMode"), f"{field}.projected.defaultMode")
        sources = [
            _projection(s, f"{field}.projected.sources[{j}]")
            for j, s in enumerate(_list(p.get("sources")))
        ]
        return Volume(
            name, "files", sources=tuple(sources), default_mode=m if m is not None else 0o644
        )
    kinds = sorted(k for k in v if k != "name")
    raise PodPlanError(
        f"{field}: volume type {', '.join(kinds) or '(none)'} is not supported by the local "
        "kubelet (hostPath, emptyDir, secret, configMap, downwardAPI, projected are)"
    )


def _projection(s: Any, field: str) -> FileSource:
    s = _dict(s)
    if "serviceAccountToken" in s:
        t = _dict(s["serviceAccountToken"])
        exp = _int(t.get("expirationSeconds", 3600), f"{field}.expirationSeconds") or 3600
        if exp < 600:
            raise PodPlanError(f"{field}.expirationSeconds: {exp} is below 600")
        return FileSource(
            "serviceAccountToken",
            audience=str(t.get("audience", "")),
            expiration_s=exp,
            token_path=_rel_path(str(t.get("path", "")), f"{field}.path"),
        )
    if "secret" in s:
        return _source("secret", _dict(s["secret"]), f"{field}.secret", "name")
    if "configMap" in s:
        return _source("configMap", _dict(s["configMap"]), f"{field}.configMap", "name")
    if "downwardAPI" in s:
        d = _dict(s["downwardAPI"])
        return FileSource("downwardAPI", downward=_downward(d.get("items"), f"{field}.downwardAPI"))
    raise PodPlanError(f"{field}: only serviceAccountToken, secret, configMap, downwardAPI")


def _mount(m: Any, i: int, names: set[str]) -> Mount:
    m = _dict(m)
    field = f"volumeMounts[{i}]"
    vol = str(m.get("name", ""))
    if vol not in names:
        raise PodPlanError(f"{field}: no volume named {vol!r}")
    path = str(m.get("mountPath", ""))
    if not path.startswith("/"):
        raise PodPlanError(f"{field}.mountPath: {path!r} is not absolute")
    sub = str(m.get("subPath") or "")
    if sub:
        sub = _rel_path(sub, f"{field}.subPath")
    if m.get("subPathExpr"):
        raise PodPlanError(f"{field}.subPathExpr is not supported by the local kubelet")
    prop = str(m.get("mountPropagation") or "")
    if prop not in PROPAGATIONS:
        raise PodPlanError(f"{field}.mountPropagation: {prop!r} is not a propagation mode")
    return Mount(
        volume=vol,
        path=posixpath.normpath(path),
        sub_path=sub,
        read_only=bool(m.get("readOnly", False)),
        propagation=PROPAGATIONS[prop],
    )


# --- what the launcher gets ------------------------------------------------------------------


def merge_env(image_env: Sequence[str], kube_env: Mapping[str, str]) -> dict[str, str]:
    """The image's Env (`K=V` strings), then Kubernetes' variables, which win."""
    env: dict[str, str] = {}
    for kv in image_env:
        k, sep, v = kv.partition("=")
        if sep:
            env[k] = v
    env.update(kube_env)
    return env


def launch_spec(
    plan: ContainerPlan,
    argv: Sequence[str],
    env: Mapping[str, str],
    sources: Mapping[str, str],
    caps: frozenset[int],
    pod_dir: Path,
    etc_files: Mapping[str, str],
) -> dict[str, Any]:
    """The launcher's document. `sources`: each volume's path on this machine (a file or a
    directory); `etc_files`: container path -> host file (resolv.conf, hosts, hostname)."""
    mounts = []
    for m in plan.mounts:
        src = sources[m.volume]
        if m.sub_path:
            src = posixpath.join(src, m.sub_path)
        mounts.append(
            {
                "source": src,
                "target": m.path,
                "read_only": m.read_only,
                "propagation": m.propagation,
            }
        )
    return {
        "rootfs": plan.rootfs,
        "upper": str(pod_dir / "upper"),
        "work": str(pod_dir / "work"),
        "merged": str(pod_dir / "merged"),
        "read_only": plan.read_only_root,
        "hostname": plan.hostname,
        "etc_files": dict(etc_files),
        "mounts": mounts,
        "privileged": plan.privileged,
        "caps": sorted(caps),
        "no_new_privs": plan.no_new_privs,
        "user": {
            "uid": plan.user.uid,
            "gid": plan.user.gid,
            "user_name": plan.user.user_name,
            "group_name": plan.user.group_name,
            "supplemental": list(plan.user.supplemental),
            "non_root": plan.user.non_root,
        },
        "cwd": plan.working_dir,
        "argv": list(argv),
        "env": dict(env),
        "error_file": str(pod_dir / "launch-error"),
    }


def user_plan_of(spec: Mapping[str, Any]) -> UserPlan:
    u = _dict(spec.get("user"))
    return UserPlan(
        uid=u.get("uid"),
        gid=u.get("gid"),
        user_name=str(u.get("user_name", "")),
        group_name=str(u.get("group_name", "")),
        supplemental=tuple(int(g) for g in _list(u.get("supplemental"))),
        non_root=bool(u.get("non_root", False)),
    )


# The kubelet's /etc files: localcluster.kube.hostnet (re-exported for the kubelet).
