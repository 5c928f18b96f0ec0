"""Fixtures of the codec tests."""

from __future__ import annotations

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
    leaked = open_fds() - before
    # Closed sockets may take a moment to leave the table: asyncio closes them on the loop.
    aio.run(wait_until(lambda: not (open_fds() - before), "fds to close", limit=5.0))
    assert not (open_fds() - before), {fd: fd_target(fd) for fd in leaked}
