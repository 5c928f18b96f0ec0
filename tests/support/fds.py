"""File descriptors: what this process holds, and a plain fd opened for a test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


def open_fds(pid: int | None = None) -> set[int]:
    """This process's open fds (or those of `pid`, a process the test started). Compare a
    set taken before with one taken after, once everything the test started has ended (a
    leak shows as a new number)."""
    return {int(n) for n in os.listdir(f"/proc/{'self' if pid is None else pid}/fd")}


def fd_target(fd: int) -> str:
    """What an fd refers to (a path, `socket:[ino]`, `net:[ino]`), for failure messages."""
    return os.readlink(f"/proc/self/fd/{fd}")


@contextmanager
def opened(path: str) -> Iterator[int]:
    """A plain fd on `path` (/dev/null, a netns file), closed afterwards."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def new_fds(before: set[int]) -> dict[int, str]:
    """The fds opened since `before` and still open, with what they refer to; leaving out
    the ones on this process's own netns: nsutil keeps one per thread for good, opened the
    first time the thread enters another netns, and a thread pool may start a new thread
    at any time."""
    home = os.readlink("/proc/self/ns/net")
    out = {}
    for fd in open_fds() - before:
        try:
            target = fd_target(fd)
        except OSError:
            continue  # closed meanwhile
        if target != home:
            out[fd] = target
    return out
