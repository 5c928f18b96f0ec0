"""Entering network namespaces: the one place that calls setns(2).

Python 3.11 has no os.setns, so libc's setns is called through ctypes. A namespace switch
applies to the calling thread only; every helper here switches back before it returns, so
no thread (the event loop's least of all) stays inside a pod's namespace.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/var/run/netns"

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)
_libc.setns.restype = ctypes.c_int

# Each thread remembers its own original namespace, opened once, so switching back is
# one syscall and never depends on a path that might have been unmounted meanwhile.
_home = threading.local()


class NetnsError(OSError):
    """A namespace could not be entered or left."""


def setns(fd: int) -> None:
    """Move the calling thread into the network namespace behind `fd`."""
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetnsError(err, f"setns(CLONE_NEWNET) failed: {os.strerror(err)}")


def netns_path(name: str) -> str:
    """The bind-mount path of a named namespace (as `ip netns add` creates it)."""
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"invalid network namespace name {name!r}")
    return os.path.join(NETNS_RUN_DIR, name)


def open_netns(path: str) -> int:
    """Open a namespace file (a named netns path or /proc/<pid>/ns/net) as an O_RDONLY fd."""
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as e:
        raise NetnsError(errno.ENOENT, f"network namespace {path} does not exist") from e


def _home_fd() -> int:
    fd: int | None = getattr(_home, "fd", None)
    if fd is None:
        fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        _home.fd = fd
    return fd


@contextmanager
def entered(fd: int) -> Iterator[None]:
    """Run the body of a `with` inside the namespace `fd` on this thread, then switch back.

    Keep the body short and free of awaits: the switch belongs to the thread, not the task.
    """
    home = _home_fd()
    setns(fd)
    try:
        yield
    finally:
        setns(home)


def socket_in(
    fd: int, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM
) -> socket.socket:
    """Create a socket that lives in namespace `fd`. Only creation needs the namespace:
    bind, listen and connect work from any thread afterwards."""
    with entered(fd):
        return socket.socket(family, type)


def sockets_in(
    fd: int,
    count: int,
    family: int = socket.AF_INET,
    type: int = socket.SOCK_STREAM,
    proto: int = 0,
) -> list[socket.socket]:
    """`count` sockets that live in namespace `fd`, made in one visit (one pair of setns
    calls for them all: the switch there and back costs more than making a socket)."""
    made: list[socket.socket] = []
    try:
        with entered(fd):
            for _ in range(count):
                made.append(socket.socket(family, type, proto))
    except BaseException:
        for s in made:
            s.close()
        raise
    return made


def socket_at(
    path: str, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM
) -> socket.socket:
    """`socket_in` for a namespace given by path (opens and closes its fd)."""
    fd = open_netns(path)
    try:
        return socket_in(fd, family, type)
    finally:
        os.close(fd)


def preexec_enter(path: str) -> Callable[[], None]:
    """A subprocess `preexec_fn` that moves the child into the namespace at `path`."""

    def enter() -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            setns(fd)
        finally:
            os.close(fd)

    return enter


def write_sysctl(fd: int, name: str, value: str) -> None:
    """Set a per-namespace sysctl (e.g. `net/ipv4/tcp_migrate_req`) inside the namespace
    behind `fd`: /proc/sys/net resolves against the opening thread's namespace."""
    if not name or name.startswith("/") or ".." in name.split("/"):
        raise ValueError(f"bad sysctl name {name!r}")
    with entered(fd), open(f"/proc/sys/{name}", "w") as f:
        f.write(value)


def read_sysctl(fd: int, name: str) -> str:
    if not name or name.startswith("/") or ".." in name.split("/"):
        raise ValueError(f"bad sysctl name {name!r}")
    with entered(fd), open(f"/proc/sys/{name}") as f:
        return f.read().strip()


def run_in(path: str, *argv: str, timeout: float = 30.0) -> str:
    """Run a command inside the namespace at `path`; its stdout (raises on failure)."""
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=preexec_enter(path),
        check=True,
    ).stdout
