"""Fixtures of the codec tests."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from tests.support.aio import Loop, wait_until
from tests.support.fds import fd_target, open_fds
from tests.waypoint.http.loopback import tasks_left


@pytest.fixture
def no_leaks(aio: Loop) -> Iterator[Loop]:
    """`aio`, plus: at the end no task is left on the loop and no fd is left open. Tests
    run their servers and clients in `async with` blocks inside the scenario, so all is
    closed by the time this looks."""
    aio._runner.get_loop()  # the loop's own fds exist before the count
    before = open_fds()
    yield aio
    assert not tasks_left(aio)

    def leaked() -> dict[int, str]:
        # gRPC's runtime keeps its own fds for the process once loaded (an eventfd, a unix
        # socketpair), uvloop a /dev/null; these tests run on TCP, so sockets other than
        # unix ones are what a codec could leak.
        with open("/proc/net/unix") as f:
            unix = {f"socket:[{line.split()[6]}]" for line in list(f)[1:]}
        found = {}
        for fd in open_fds() - before:
            with contextlib.suppress(FileNotFoundError):  # closed meanwhile
                found[fd] = fd_target(fd)
        return {
            fd: what
            for fd, what in found.items()
            if not what.startswith("anon_inode:") and what not in unix and what != "/dev/null"
        }

    # Closed sockets may take a moment to leave the table: asyncio closes them on the loop.
    with contextlib.suppress(AssertionError):
        aio.run(wait_until(lambda: not leaked(), "fds to close", limit=5.0))
    assert not leaked()
