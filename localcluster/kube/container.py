"""The container launcher: `python -m localcluster.kube.container LAUNCH_JSON` (I/O).

The kubelet starts it in the pod's netns (the node's for hostNetwork); it builds the
container's world and then execs the container's command, so the pid the kubelet records is
the container's own process. It does, in order (the JSON, from `containerplan.launch_spec`,
says what):

1. its own mount and UTS namespaces; `/` made rslave, so nothing mounted here reaches the
   machine while the machine's new mounts (a netns bound under /run/netns) still reach us;
2. the root filesystem: an overlay of the image's rootfs (lower) and the pod's own upper and
   work directories; `/proc`, `/dev` (a tmpfs with the usual device nodes; the machine's /dev
   when privileged), `/dev/pts`, `/dev/shm`, `/sys` (read-only unless privileged), the
   kubelet's /etc/resolv.conf, /etc/hosts, /etc/hostname, then the volumes (bind mounts with
   their propagation, read-only when asked); every mount point is found inside the rootfs
   with its symlinks resolved against the rootfs (`in_root`), never against the machine's;
3. the root made read-only when `readOnlyRootFilesystem`; chroot; the working directory;
4. the capability bounding set cut to the container's set, the ambient set cleared, groups,
   gid, uid (a non-root uid loses permitted and effective capabilities, as under Docker),
   root's permitted/effective set to the container's set, no_new_privs when asked;
5. exec of argv with the container's environment (PATH searched in the container's PATH).

Any failure before the exec is written to the container's log (stderr) and to the error file
the kubelet reads, and the launcher exits with `LAUNCH_FAILED`: the kubelet reports the
message as CreateContainerError. The mounts all live in the container's mount namespace and
go when its last process does: none is ever left in the machine's.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import socket
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from localcluster.kube.containerplan import PodPlanError, resolve_user, user_plan_of

LAUNCH_FAILED = 125
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
PROPAGATION_FLAGS = {"rprivate": MS_PRIVATE, "rslave": MS_SLAVE, "rshared": MS_SHARED}
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")

_libc = ctypes.CDLL(None, use_errno=True)


class LaunchError(RuntimeError):
    pass


def _check(rc: int, what: str) -> None:
    if rc != 0:
        e = ctypes.get_errno()
        raise LaunchError(f"{what}: {os.strerror(e)}")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    def b(s: str | None) -> bytes | None:
        return s.encode() if s is not None else None

    rc = _libc.mount(b(source), b(target), b(fstype), ctypes.c_ulong(flags), b(data or None))
    _check(rc, f"mount {source or fstype} on {target}")


def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def prctl(option: int, arg2: int = 0, arg3: int = 0) -> None:
    rc = _libc.prctl(
        ctypes.c_int(option),
        ctypes.c_ulong(arg2),
        ctypes.c_ulong(arg3),
        ctypes.c_ulong(0),
        ctypes.c_ulong(0),
    )
    _check(rc, f"prctl {option}")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def capset(effective: int, permitted: int, inheritable: int) -> None:
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in range(2):
        shift = 32 * i
        data[i].effective = (effective >> shift) & 0xFFFFFFFF
        data[i].permitted = (permitted >> shift) & 0xFFFFFFFF
        data[i].inheritable = (inheritable >> shift) & 0xFFFFFFFF
    _check(_libc.capset(ctypes.byref(header), data), "capset")


def in_root(root: str, path: str) -> str:
    """The machine path of `path` in a filesystem rooted at `root`, its symlinks resolved as
    if `root` were `/` (an absolute link restarts at root, `..` stops at root); a missing
    component ends the resolution and the rest is appended as written."""
    parts = [p for p in path.split("/") if p and p != "."]
    resolved: list[str] = []
    hops = 0
    while parts:
        p = parts.pop(0)
        if p == "..":
            if resolved:
                resolved.pop()
            continue
        current = os.path.join(root, *resolved, p)
        if os.path.islink(current):
            hops += 1
            if hops > 40:
                raise LaunchError(f"too many symbolic links resolving {path} in the image")
            link = os.readlink(current)
            if link.startswith("/"):
                resolved = []
            parts = [x for x in link.split("/") if x and x != "."] + parts
            continue
        resolved.append(p)
    return os.path.join(root, *resolved)


def _mount_point(target: str, is_dir: bool) -> None:
    if is_dir:
        os.makedirs(target, exist_ok=True)
    elif not os.path.exists(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "a"):
            pass


def bind(source: str, target: str, read_only: bool, propagation: str) -> None:
    _mount_point(target, os.path.isdir(source))
    mount(source, target, None, MS_BIND | MS_REC)
    mount(None, target, None, MS_REC | PROPAGATION_FLAGS[propagation])
    if read_only:
        mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY)


def _dev(merged: str, privileged: bool) -> None:
    dev = in_root(merged, "/dev")
    os.makedirs(dev, exist_ok=True)
    if privileged:
        mount("/dev", dev, None, MS_BIND | MS_REC)
        mount(None, dev, None, MS_REC | MS_SLAVE)
        return
    mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=755,size=65536k")
    for name in DEVICES:
        bind(f"/dev/{name}", os.path.join(dev, name), False, "rprivate")
    for name, to in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ):
        os.symlink(to, os.path.join(dev, name))
    os.makedirs(os.path.join(dev, "pts"))
    mount(
        "devpts",
        os.path.join(dev, "pts"),
        "devpts",
        MS_NOSUID | MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620",
    )
    os.makedirs(os.path.join(dev, "shm"))
    mount("shm", os.path.join(dev, "shm"), "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=1777")


def build_root(spec: Mapping[str, Any]) -> str:
    """Steps 1-3 up to the chroot; returns the merged root's path."""
    unshare(CLONE_NEWNS | CLONE_NEWUTS)
    mount(None, "/", None, MS_REC | MS_SLAVE)
    merged, upper, work = spec["merged"], spec["upper"], spec["work"]
    for d in (merged, upper, work):
        os.makedirs(d, exist_ok=True)
    for p in (spec["rootfs"], upper, work):
        if any(c in p for c in ",:"):
            raise LaunchError(f"path {p} holds ',' or ':', which an overlay mount cannot take")
    mount(
        "overlay",
        merged,
        "overlay",
        MS_NODEV,
        f"lowerdir={spec['rootfs']},upperdir={upper},workdir={work}",
    )
    proc = in_root(merged, "/proc")
    os.makedirs(proc, exist_ok=True)
    mount("proc", proc, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _dev(merged, bool(spec["privileged"]))
    sys_dir = in_root(merged, "/sys")
    os.makedirs(sys_dir, exist_ok=True)
    ro = 0 if spec["privileged"] else MS_RDONLY
    mount("sysfs", sys_dir, "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | ro)
    for target, source in sorted(spec["etc_files"].items()):
        bind(source, in_root(merged, target), False, "rprivate")
    # Parents before children, whatever order the pod lists them in.
    for m in sorted(spec["mounts"], key=lambda m: m["target"].rstrip("/").count("/")):
        if not os.path.exists(m["source"]):
            raise LaunchError(f"volume source {m['source']} of {m['target']} does not exist")
        bind(m["source"], in_root(merged, m["target"]), m["read_only"], m["propagation"])
    os.makedirs(in_root(merged, spec["cwd"]), exist_ok=True)
    if spec["read_only"]:
        mount(None, merged, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
    return str(merged)


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def last_cap() -> int:
    try:
        return int(_read("/proc/sys/kernel/cap_last_cap").strip())
    except ValueError:
        return 40


def own_capabilities() -> int:
    """This process's permitted set: the most a container can be given (a machine that is
    itself a container may lack some)."""
    for line in _read("/proc/self/status").splitlines():
        if line.startswith("CapPrm:"):
            return int(line.split()[1], 16)
    return 0


def drop_privileges(spec: Mapping[str, Any], uid: int, gid: int, groups: Sequence[int]) -> None:
    caps = {int(c) for c in spec["caps"]}
    for c in range(last_cap() + 1):
        if c not in caps:
            prctl(PR_CAPBSET_DROP, c)
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    # Ids first, while CAP_SETUID/CAP_SETGID are still effective.
    os.setgroups(list(groups))
    os.setgid(gid)
    os.setuid(uid)  # to a non-root uid: the kernel clears permitted and effective
    mask = sum(1 << c for c in caps) & own_capabilities() if uid == 0 else 0
    capset(mask, mask, 0)  # inheritable empty, as runtimes since CVE-2022-24769
    if spec["no_new_privs"]:
        prctl(PR_SET_NO_NEW_PRIVS, 1)


def launch(spec: Mapping[str, Any]) -> None:
    """Build, chroot, drop and exec; returns only by raising."""
    merged = build_root(spec)
    user = resolve_user(
        user_plan_of(spec),
        _read(in_root(merged, "/etc/passwd")),
        _read(in_root(merged, "/etc/group")),
    )
    socket.sethostname(spec["hostname"])
    os.chdir(merged)
    os.chroot(".")
    os.chdir(spec["cwd"])
    env = dict(spec["env"])
    env.setdefault("PATH", DEFAULT_PATH)
    env.setdefault("HOME", user.home)
    drop_privileges(spec, user.uid, user.gid, user.groups)
    argv = list(spec["argv"])
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as e:
        raise LaunchError(f"exec {argv[0]!r}: {e.strerror} (PATH={env['PATH']})") from e


def main(argv: Sequence[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m localcluster.kube.container LAUNCH_JSON", file=sys.stderr)
        return 2
    error_fd = -1
    try:
        with open(argv[0], encoding="utf-8") as f:
            spec = json.load(f)
        # Opened now: after the chroot its path means nothing; the exec closes it (CLOEXEC).
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        error_fd = os.open(str(spec["error_file"]), flags, 0o600)
        launch(spec)
    except (OSError, LaunchError, PodPlanError, KeyError, ValueError) as e:
        message = f"{type(e).__name__}: {e}" if not isinstance(e, LaunchError) else str(e)
        print(f"container launcher: {message}", file=sys.stderr, flush=True)
        if error_fd >= 0:
            with contextlib.suppress(OSError):
                os.write(error_fd, message.encode())
        return LAUNCH_FAILED
    return 0  # not reached: launch() execs or raises


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
