"""Helpers shared by the ZDS tests."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import uvloop

# The agent may run on either loop; the tunnel runs on uvloop. Wire-level tests run on both.
LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def run(main: Callable[[], Awaitable[Any]], loop: str = "asyncio") -> Any:
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        return runner.run(asyncio.wait_for(main(), 60))


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def fd_target(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


async def until(cond: Callable[[], bool], what: str, limit: float = 20.0) -> None:
    """Wait for a condition (a bound on a hang, not a timing assertion)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


@contextmanager
def opened(path: str) -> Iterator[int]:
    """A plain fd on `path` (/dev/null, a netns file), closed afterwards."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)
