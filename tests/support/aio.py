"""The async runner and the wait-until helpers every test uses.

`Loop` runs a test's coroutines on one event loop and keeps the test's cleanups: each
`defer`red call runs on that loop when the test ends, whether it passed or failed (the
`aio` fixture closes it). A bare `run` is a `Loop` for one scenario with nothing to clean.

Every run has a limit. It is not a timing assertion: it only turns a hang into a failure
that names where the test stood.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

import uvloop

T = TypeVar("T")

# The agent may run on either loop; the tunnel runs on uvloop. Protocol tests run on both.
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}
RUN_LIMIT = 60.0
WAIT_LIMIT = 20.0
# A deferred cleanup that hangs must not hang the suite; the test has already failed or
# passed by then.
CLEANUP_LIMIT = 20.0


class Closable(Protocol):
    def close(self) -> object: ...


C = TypeVar("C", bound=Closable)

Scenario = Callable[[], Awaitable[T]] | Awaitable[T]
Cleanup = Callable[[], Awaitable[object] | object]


class Loop:
    """One event loop for one test, and the cleanups of what the test started on it."""

    def __init__(self, kind: str = "asyncio") -> None:
        self.kind = kind
        self._runner = asyncio.Runner(loop_factory=LOOPS[kind])
        self._cleanups: list[Cleanup] = []

    def run(self, main: Scenario[T], limit: float = RUN_LIMIT) -> T:
        """Run `main` (a coroutine function or an awaitable) to its end on this loop."""
        aw = main() if callable(main) else main
        return self._runner.run(asyncio.wait_for(aw, limit))

    def defer(self, cleanup: Cleanup) -> None:
        """Call `cleanup()` when the test ends, pass or fail, on this loop; an awaitable it
        returns is awaited. Last deferred, first run (as an ExitStack)."""
        self._cleanups.append(cleanup)

    def closing(self, thing: C) -> C:
        """Defer `thing.close()` and return `thing`: `agent = aio.closing(await start())`."""
        self.defer(thing.close)
        return thing

    def close(self) -> None:
        """Run the deferred cleanups (every one, even if an earlier one fails), then close
        the loop. The first failure is raised afterwards."""
        first: BaseException | None = None
        while self._cleanups:
            cleanup = self._cleanups.pop()
            try:
                self._runner.run(_call(cleanup, CLEANUP_LIMIT))
            except BaseException as e:  # every cleanup runs; the first error is raised
                first = first or e
        self._runner.close()
        if first is not None:
            raise first

    def __enter__(self) -> Loop:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


async def _call(cleanup: Cleanup, limit: float) -> None:
    result = cleanup()
    if inspect.isawaitable(result):
        await asyncio.wait_for(result, limit)


def run(main: Scenario[T], *, loop: str = "asyncio", limit: float = RUN_LIMIT) -> T:
    """Run one scenario on a fresh loop (for tests with nothing to clean up)."""
    with Loop(loop) as runner:
        return runner.run(main, limit)


async def wait_until(
    cond: Callable[[], bool], what: str, limit: float = WAIT_LIMIT, interval: float = 0.005
) -> None:
    """Wait until `cond()` holds; `what` names it in the failure if it never does."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(interval)


def wait_until_sync(
    cond: Callable[[], bool], what: str, limit: float = WAIT_LIMIT, interval: float = 0.02
) -> None:
    """`wait_until` for tests without an event loop (processes, files, other netns)."""
    deadline = time.monotonic() + limit
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


__all__ = [
    "LOOPS",
    "Loop",
    "run",
    "wait_until",
    "wait_until_sync",
]
