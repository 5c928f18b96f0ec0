"""The local kubelet's image decisions as tables: image lookup, argv rules, capabilities, users,
hostPath mapping, volumes and their files, the launcher's document (no root needed)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from localcluster.kube import volumes
from localcluster.kube.container import in_root
from localcluster.kube.containerplan import (
    CAPABILITIES,
    FileSource,
    KeyToPath,
    PodPlanError,
    UserPlan,
    Volume,
    cap_mask,
    cap_name,
    capability_set,
    host_path_source,
    hosts_file,
    image_argv,
    launch_spec,
    merge_env,
    resolv_conf,
    resolve_user,
)
from localcluster.kube.images import ImageBundle, lookup, normalise
from localcluster.kube.podplan import EnvFrom, container_env, env_from_vars, plan_pod
from localcluster.kube.volumecontent import VolumeNotReady, pod_field, renew_at, volume_files

DOCKER_DEFAULT = 0xA80425FB


def write_image(store: Path, repo: str, tag: str, digest: str, **config: Any) -> Path:
    d = store / repo / tag
    (d / "rootfs").mkdir(parents=True)
    meta = {"ref": f"{repo}:{tag}", "digest": digest, "config": config}
    (d / "image.json").write_text(json.dumps(meta))
    return d


@pytest.mark.parametrize(
    ("ref", "want"),
    [
        ("ambient-mesh/mesh:0.13.0", ("ambient-mesh/mesh", "0.13.0")),
        ("ambient-mesh/mesh", ("ambient-mesh/mesh", "latest")),
        ("docker.io/library/busybox:1", ("busybox", "1")),
        ("docker.io/ambient-mesh/mesh:2", ("ambient-mesh/mesh", "2")),
        ("localhost/a/b/c:t", ("a/b/c", "t")),
        ("registry:5000/x", ("registry:5000/x", "latest")),
        ("x@sha256:abc", ("x", "sha256:abc")),
        ("x:1@sha256:abc", ("x", "sha256:abc")),
    ],
)
def test_normalise(ref: str, want: tuple[str, str]) -> None:
    assert normalise(ref) == want


def test_lookup_by_tag_and_digest_and_only_when_ready(tmp_path: Path) -> None:
    d = write_image(
        tmp_path,
        "ambient-mesh/mesh",
        "0.13.0",
        "sha256:" + "1" * 64,
        Env=["PATH=/bin"],
        Entrypoint=None,
        Cmd=["sh"],
        WorkingDir="/opt/ambient-mesh",
        User="1337",
    )
    write_image(tmp_path, "ambient-mesh/mesh", "0.13.0-next", "sha256:" + "2" * 64)
    b = lookup("docker.io/ambient-mesh/mesh:0.13.0", tmp_path)
    assert b == ImageBundle(
        ref="ambient-mesh/mesh:0.13.0",
        digest="sha256:" + "1" * 64,
        rootfs=d / "rootfs",
        env=("PATH=/bin",),
        entrypoint=(),
        cmd=("sh",),
        working_dir="/opt/ambient-mesh",
        user="1337",
    )
    assert b.image_id == "ambient-mesh/mesh@sha256:" + "1" * 64
    by_digest = lookup("ambient-mesh/mesh@sha256:" + "2" * 64, tmp_path)
    assert by_digest is not None and by_digest.ref == "ambient-mesh/mesh:0.13.0-next"
    assert lookup("ambient-mesh/mesh@sha256:" + "3" * 64, tmp_path) is None
    assert lookup("ambient-mesh/mesh", tmp_path) is None  # no `latest`
    assert lookup("../etc:x", tmp_path) is None
    (d / "image.json").unlink()  # not ready (or half written): not there
    assert lookup("ambient-mesh/mesh:0.13.0", tmp_path) is None


@pytest.mark.parametrize(
    ("command", "args", "want"),
    [
        ([], [], (("/ep", "-x", "cmd"), ())),
        (["c"], [], ((), ("c",))),
        ([], ["a"], (("/ep", "-x"), ("a",))),
        (["c"], ["a"], ((), ("c", "a"))),
    ],
)
def test_argv_rules(command: list[str], args: list[str], want: Any) -> None:
    assert image_argv(["/ep", "-x"], ["cmd"], command, args) == want


@pytest.mark.parametrize(
    ("add", "drop", "privileged", "want"),
    [
        ((), (), False, DOCKER_DEFAULT),
        (("NET_ADMIN",), ("ALL",), False, 1 << 12),
        (("NET_ADMIN", "SYS_ADMIN", "NET_RAW"), ("ALL",), False, (1 << 12) | (1 << 21) | (1 << 13)),
        ((), ("NET_RAW", "MKNOD"), False, DOCKER_DEFAULT & ~(1 << 13) & ~(1 << 27)),
        (("ALL",), (), False, (1 << 41) - 1),
        ((), ("ALL",), True, (1 << 41) - 1),
        (("BPF",), ("ALL",), False, 0),  # above the kernel's last capability (here 38)
    ],
)
def test_capability_sets(add: Any, drop: Any, privileged: bool, want: int) -> None:
    last = 38 if "BPF" in add else 40
    assert cap_mask(capability_set(add, drop, privileged, last)) == want


def test_capability_names() -> None:
    assert cap_name("CAP_NET_ADMIN", "f") == cap_name("net_admin", "f") == "NET_ADMIN"
    assert cap_name("all", "f") == "ALL"
    assert CAPABILITIES["SYS_ADMIN"] == 21
    with pytest.raises(PodPlanError, match="unknown capability 'NET_MAGIC'"):
        cap_name("NET_MAGIC", "capabilities.add")


PASSWD = "root:x:0:0:root:/root:/bin/sh\nistio-proxy:x:1337:1337::/home/istio:/bin/sh\n"
GROUP = "root:x:0:\nistio-proxy:x:1337:\nnet:x:50:istio-proxy\nops:x:60:\n"


@pytest.mark.parametrize(
    ("plan", "want"),
    [
        (UserPlan(), (0, 0, (0,), "/root")),
        (UserPlan(uid=1337), (1337, 1337, (1337, 50), "/home/istio")),
        (UserPlan(uid=1337, gid=5), (1337, 5, (5, 50), "/home/istio")),
        (UserPlan(uid=4242), (4242, 0, (0,), "/")),
        (UserPlan(user_name="istio-proxy", group_name="ops"), (1337, 60, (60, 50), "/home/istio")),
        (UserPlan(uid=1337, supplemental=(7, 50)), (1337, 1337, (1337, 50, 7), "/home/istio")),
    ],
)
def test_resolve_user(plan: UserPlan, want: tuple[int, int, tuple[int, ...], str]) -> None:
    u = resolve_user(plan, PASSWD, GROUP)
    assert (u.uid, u.gid, u.groups, u.home) == want


@pytest.mark.parametrize(
    ("plan", "error"),
    [
        (UserPlan(user_name="nobody"), "user 'nobody' is not in"),
        (UserPlan(uid=1, group_name="nogroup"), "group 'nogroup' is not in"),
        (UserPlan(user_name="root", non_root=True), "runAsNonRoot"),
    ],
)
def test_resolve_user_refuses(plan: UserPlan, error: str) -> None:
    with pytest.raises(PodPlanError, match=error):
        resolve_user(plan, PASSWD, GROUP)


@pytest.mark.parametrize(
    ("path", "want"),
    [
        ("/var/run/netns", "/var/run/netns"),
        ("/run/netns/", "/run/netns"),
        ("/sys/fs/bpf", "/sys/fs/bpf"),
        ("/lib/modules", "/lib/modules"),
        ("/usr/src", "/usr/src"),
        ("/proc", "/proc"),
        ("/dev/net/tun", "/dev/net/tun"),
        ("/var/run/ztunnel", "/state/nodes/n1/host/var/run/ztunnel"),
        ("/etc/cni/net.d", "/state/nodes/n1/host/etc/cni/net.d"),
        ("/var/run/netns-x", "/state/nodes/n1/host/var/run/netns-x"),
        ("/var/../proc", "/proc"),
        ("/", "/state/nodes/n1/host"),
    ],
)
def test_host_path_mapping(path: str, want: str) -> None:
    assert str(host_path_source(path, Path("/state/nodes/n1/host"))) == want


BUNDLE = ImageBundle(
    ref="ambient-mesh/mesh:0.13.0",
    digest="sha256:x",
    rootfs=Path("/images/mesh/rootfs"),
    env=("PATH=/opt/venv/bin:/bin", "A=image"),
    entrypoint=(),
    cmd=("bash",),
    working_dir="/opt/ambient-mesh",
    user="1337",
)


def pod(container: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    c: dict[str, Any] = {"name": "c", "image": "ambient-mesh/mesh:0.13.0"}
    c.update(container or {})
    return {
        "metadata": {"name": "p", "namespace": "ns", "uid": "u-1"},
        "spec": {"nodeName": "n1", "containers": [c], **spec},
    }


def test_plan_of_an_image_pod() -> None:
    plan = plan_pod(
        pod(
            {
                "command": ["python3", "-m", "ztunnel"],
                "securityContext": {
                    "runAsUser": 0,
                    "readOnlyRootFilesystem": True,
                    "allowPrivilegeEscalation": False,
                    "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "CAP_SYS_ADMIN"]},
                },
                "volumeMounts": [
                    {"name": "zt", "mountPath": "/var/run/ztunnel"},
                    {
                        "name": "netns",
                        "mountPath": "/var/run/netns/",
                        "mountPropagation": "HostToContainer",
                    },
                    {"name": "cfg", "mountPath": "/etc/x.conf", "subPath": "x.conf"},
                    {"name": "tok", "mountPath": "/var/run/secrets/tokens", "readOnly": True},
                ],
            },
            volumes=[
                {
                    "name": "zt",
                    "hostPath": {"path": "/var/run/ztunnel", "type": "DirectoryOrCreate"},
                },
                {"name": "netns", "hostPath": {"path": "/var/run/netns"}},
                {"name": "cfg", "configMap": {"name": "c", "defaultMode": 0o600}},
                {
                    "name": "tok",
                    "projected": {
                        "sources": [
                            {
                                "serviceAccountToken": {
                                    "audience": "istio-ca",
                                    "expirationSeconds": 43200,
                                    "path": "istio-token",
                                }
                            }
                        ]
                    },
                },
            ],
        ),
        BUNDLE,
        "mesh@sha256:x",
    )
    assert plan.problem == ""
    ip = plan.image_plan
    assert ip is not None
    assert (ip.image_argv, ip.pod_argv) == ((), ("python3", "-m", "ztunnel"))
    assert ip.working_dir == "/opt/ambient-mesh"
    assert ip.user == UserPlan(uid=0)
    assert ip.no_new_privs and ip.read_only_root and not ip.privileged
    assert ip.cap_add == ("NET_ADMIN", "SYS_ADMIN") and ip.cap_drop == ("ALL",)
    assert [(m.volume, m.path, m.propagation) for m in ip.mounts] == [
        ("zt", "/var/run/ztunnel", "rprivate"),
        ("netns", "/var/run/netns", "rslave"),
        ("cfg", "/etc/x.conf", "rprivate"),
        ("tok", "/var/run/secrets/tokens", "rprivate"),
    ]
    assert ip.volumes[2].default_mode == 0o600
    tok = ip.volumes[3].sources[0]
    assert (tok.kind, tok.audience, tok.expiration_s, tok.token_path) == (
        "serviceAccountToken",
        "istio-ca",
        43200,
        "istio-token",
    )
    caps = capability_set(ip.cap_add, ip.cap_drop, ip.privileged, 40)
    sources = {"zt": "/h/zt", "netns": "/run/netns", "cfg": "/pod/cfg", "tok": "/pod/tok"}
    etc = {"/etc/hosts": "/pod/etc/hosts"}
    spec = launch_spec(ip, ["python3"], {"A": "1"}, sources, caps, Path("/pod"), etc)
    assert spec["caps"] == [12, 21]
    assert spec["mounts"][2] == {
        "source": "/pod/cfg/x.conf",
        "target": "/etc/x.conf",
        "read_only": False,
        "propagation": "rprivate",
    }
    assert spec["mounts"][3]["read_only"] is True
    assert (spec["upper"], spec["work"], spec["merged"]) == (
        "/pod/upper",
        "/pod/work",
        "/pod/merged",
    )
    assert spec["user"]["uid"] == 0 and spec["no_new_privs"] is True and spec["read_only"] is True
    # The image's user when the pod names none.
    plain = plan_pod(pod(), BUNDLE).image_plan
    assert plain is not None and plain.user == UserPlan(uid=1337)
    assert (plain.image_argv, plain.pod_argv) == (("bash",), ())


@pytest.mark.parametrize(
    ("container", "spec", "error"),
    [
        ({}, {"volumes": [{"name": "v", "nfs": {}}]}, "volume type nfs is not supported"),
        ({"volumeMounts": [{"name": "nope", "mountPath": "/x"}]}, {}, "no volume named 'nope'"),
        (
            {"volumeMounts": [{"name": "v", "mountPath": "/x", "subPath": "../up"}]},
            {"volumes": [{"name": "v", "emptyDir": {}}]},
            "without '..'",
        ),
        (
            {"volumeMounts": [{"name": "v", "mountPath": "rel"}]},
            {"volumes": [{"name": "v", "emptyDir": {}}]},
            "not absolute",
        ),
        ({"securityContext": {"capabilities": {"add": ["FLY"]}}}, {}, "unknown capability"),
        ({"securityContext": {"runAsUser": 0, "runAsNonRoot": True}}, {}, "runAsNonRoot"),
        ({"securityContext": {"runAsUser": -1}}, {}, "not a non-negative integer"),
        ({}, {"volumes": [{"name": "v", "hostPath": {"path": "/x", "type": "Pipe"}}]}, "Pipe"),
        ({}, {"volumes": [{"name": "v", "emptyDir": {"medium": "HugePages"}}]}, "HugePages"),
        (
            {"securityContext": {"privileged": True, "allowPrivilegeEscalation": False}},
            {},
            "allowPrivilegeEscalation false with privileged",
        ),
    ],
)
def test_image_pod_problems(container: dict[str, Any], spec: dict[str, Any], error: str) -> None:
    plan = plan_pod(pod(container, **spec), BUNDLE)
    assert error in plan.problem
    assert plan.image_plan is None


def test_no_command_anywhere_is_a_problem() -> None:
    bare = ImageBundle("x:1", "", Path("/r"), (), (), (), "", "")
    assert "neither the pod nor image x:1" in plan_pod(pod(), bare).problem
    assert "no command" in plan_pod(pod()).problem  # project mode, as before


def test_env_is_image_then_kubernetes() -> None:
    assert merge_env(["PATH=/bin", "A=image", "B=b=c", "junk"], {"A": "pod"}) == {
        "PATH": "/bin",
        "A": "pod",
        "B": "b=c",
    }


def test_env_refs_are_planned() -> None:
    plan = plan_pod(
        pod(
            {
                "command": ["python3"],
                "env": [
                    {"name": "S", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
                    {
                        "name": "C",
                        "valueFrom": {
                            "configMapKeyRef": {"name": "c", "key": "k", "optional": True}
                        },
                    },
                ],
            }
        )
    )
    assert [(v.name, v.ref, v.optional) for v in plan.env] == [
        ("S", ("secret", "s", "k"), False),
        ("C", ("configMap", "c", "k"), True),
    ]


def test_etc_files() -> None:
    assert resolv_conf("shop", "ClusterFirst", False) == (
        "search shop.svc.cluster.local svc.cluster.local cluster.local\n"
        "nameserver 10.10.0.1\noptions ndots:5\n"
    )
    assert resolv_conf("x", "ClusterFirstWithHostNet", True).startswith("search x.svc")
    assert resolv_conf("x", "ClusterFirst", True) == "nameserver 10.10.0.1\n"
    assert hosts_file("web-1", "10.20.0.5").endswith("10.20.0.5\tweb-1\n")


# --- volume files --------------------------------------------------------------------------


def files_volume(*sources: FileSource, mode: int = 0o644) -> Volume:
    return Volume("v", "files", sources=sources, default_mode=mode)


POD = {
    "metadata": {"name": "p", "namespace": "ns", "uid": "u", "labels": {"b": "2", "a": 'x"y'}},
    "spec": {"nodeName": "n1"},
    "status": {"podIP": "10.0.0.5"},
}


def test_volume_files() -> None:
    v = files_volume(
        FileSource("secret", "s", items=(KeyToPath("k", "dir/key", 0o400),)),
        FileSource("configMap", "c"),
        FileSource("configMap", "gone", optional=True),
        FileSource("serviceAccountToken", audience="aud", expiration_s=600, token_path="token"),
        mode=0o640,
    )
    objects = {("secret", "s"): {"k": b"secret", "other": b"x"}, ("configMap", "c"): {"a": b"1"}}
    files = volume_files(v, objects, POD, {("aud", 600, "token"): "jwt"})
    assert files == {"dir/key": (b"secret", 0o400), "a": (b"1", 0o640), "token": (b"jwt", 0o640)}
    with pytest.raises(VolumeNotReady, match="secret 'missing' not found"):
        volume_files(files_volume(FileSource("secret", "missing")), {}, POD, {})
    with pytest.raises(VolumeNotReady, match="has no key 'nokey'"):
        volume_files(
            files_volume(FileSource("secret", "s", items=(KeyToPath("nokey", "f"),))),
            objects,
            POD,
            {},
        )


@pytest.mark.parametrize(
    ("path", "want"),
    [
        ("metadata.labels", 'a="x\\"y"\nb="2"'),
        ("metadata.labels['b']", "2"),
        ("metadata.annotations", ""),
        ("metadata.uid", "u"),
        ("spec.nodeName", "n1"),
        ("status.podIP", "10.0.0.5"),
    ],
)
def test_downward_fields(path: str, want: str) -> None:
    assert pod_field(POD, path) == want


def test_write_files_is_atomic_and_follows_updates(tmp_path: Path) -> None:
    target = tmp_path / "vol"
    assert volumes.write_files(target, {"a": (b"1", 0o644), "d/b": (b"2", 0o600)})
    first = os.readlink(target / "..data")
    assert (target / "a").read_bytes() == b"1" and os.readlink(target / "a") == "..data/a"
    assert (target / "d" / "b").read_bytes() == b"2"
    assert os.stat(target / "d" / "b").st_mode & 0o777 == 0o600
    assert not volumes.write_files(target, {"a": (b"1", 0o644), "d/b": (b"2", 0o600)})
    assert volumes.write_files(target, {"a": (b"3", 0o644)})
    assert (target / "a").read_bytes() == b"3"
    assert not (target / "d").exists() and not (target / first).exists()
    assert sorted(p.name for p in target.iterdir() if not p.name.startswith("..")) == ["a"]
    assert volumes.read_files(target) == {"a": (b"3", 0o644)}


def test_in_root_resolves_links_inside_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "run").mkdir(parents=True)
    (root / "var").mkdir()
    os.symlink("/run", root / "var" / "run")  # absolute: the image's /run, not the machine's
    os.symlink("../../../../..", root / "up")  # cannot climb out of the root
    os.symlink("loop", root / "loop")
    r = str(root)
    assert in_root(r, "/var/run/ztunnel") == f"{r}/run/ztunnel"
    assert in_root(r, "/up/etc/passwd") == f"{r}/etc/passwd"
    assert in_root(r, "/a/../../b") == f"{r}/b"
    assert in_root(r, "/") == r + "/" or in_root(r, "/") == r
    with pytest.raises(RuntimeError, match="too many symbolic links"):
        in_root(r, "/loop/x")


def test_token_renewal_at_80_percent_of_the_granted_lifetime() -> None:
    issued = 1_700_000_000.0  # 2023-11-14T22:13:20Z
    assert renew_at(issued, "2023-11-14T23:13:20Z", 600) == issued + 0.8 * 3600
    assert renew_at(issued, "", 600) == issued + 480


def test_env_from() -> None:
    plan = plan_pod(
        pod(
            {
                "command": ["python3"],
                "envFrom": [
                    {"configMapRef": {"name": "c"}},
                    {"prefix": "S_", "secretRef": {"name": "s", "optional": True}},
                ],
                "env": [{"name": "A", "value": "env-$(B)"}],
            }
        )
    )
    assert plan.env_from == (EnvFrom("configMap", "c"), EnvFrom("secret", "s", "S_", True))
    got = env_from_vars(plan.env_from, {("configMap", "c"): {"A": "cm", "B": "b", "1x": "no"}})
    assert got == {"A": "cm", "B": "b"}  # the optional Secret is missing; `1x` is no name
    # envFrom under env: `env` wins, and may refer to envFrom's variables.
    assert container_env(plan, [], "", "", None, got) == {"A": "env-b", "B": "b"}
    with pytest.raises(PodPlanError, match="configMap 'c' not found"):
        env_from_vars(plan.env_from, {})
    bad = plan_pod(pod({"command": ["python3"], "envFrom": [{"nope": {}}]}))
    assert "only configMapRef and secretRef" in bad.problem
