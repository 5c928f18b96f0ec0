"""SIGINT and SIGTERM as an exception in the main thread, so the teardown paths run.

A program that builds a cluster (`ambientctl up`, `ambientctl demo`, the benchmarks) runs
its work inside `run_interruptible`: the first SIGINT or SIGTERM raises `Interrupted` where
the main thread is, every `except BaseException` / `finally` on the way out tears down what
that run built, and the program ends with "interrupted by SIGTERM: tore down cluster X (N
namespaces, M processes)" and 128 + the signal's number (130, 143), as a shell reports it.

Invariants:
- only the first signal raises; later ones are ignored, so a second Ctrl-C cannot cut the
  teardown short that the first one started;
- only in the process that installed the handlers: a child forked from it (pyroute2 forks
  helpers and stops them with SIGTERM) gets the default disposition back at once (an
  at-fork hook), so it dies of the signal instead of unwinding a copy of the parent's
  stack and tearing down the parent's cluster, and without the window a Python-level
  handler has before a blocking call;
- a teardown runs `shielded`: a signal arriving during it is held and raised when it ends,
  so a teardown in progress (a normal one, at the end of a run) is never left half done.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The run was asked to stop by a signal. A KeyboardInterrupt, so code that lets Ctrl-C
    through (everything that catches only Exception) lets this through too."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def signame(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@dataclass(frozen=True, slots=True)
class TornDown:
    """What one teardown removed (reported by `localcluster.state.teardown`)."""

    cluster: str
    netns: int
    processes: int


class _Guard:
    """The process-wide state of the handlers (signals only ever run in the main thread)."""

    def __init__(self) -> None:
        self.installed = False
        self.owner = 0  # pid of the process that installed the handlers
        self.fired = False  # an Interrupted was raised: ignore further signals
        self.shield = 0  # depth of shielded sections in progress
        self.held: int | None = None  # a signal that arrived while shielded
        self.torn_down: list[TornDown] = []
        self.mark = 0  # len(torn_down) when the signal arrived: later ones are its doing


_GUARD = _Guard()


def _in_child() -> None:
    """After os.fork, in the child: the signals' default actions again."""
    if _GUARD.installed:
        _GUARD.installed = False
        for s in SIGNALS:
            signal.signal(s, signal.SIG_DFL)


os.register_at_fork(after_in_child=_in_child)


def _handler(signum: int, _frame: FrameType | None) -> None:
    g = _GUARD
    if os.getpid() != g.owner:  # a child forked without the hook: die of it all the same
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    if g.fired or g.held is not None:
        return
    g.mark = len(g.torn_down)  # what is torn down from now on is this signal's doing
    if g.shield:
        g.held = signum
        return
    g.fired = True
    raise Interrupted(signum)


@contextmanager
def shielded() -> Iterator[None]:
    """A section a signal must not cut short (a teardown): one that arrives meanwhile is
    raised when the section ends."""
    g = _GUARD
    g.shield += 1
    try:
        yield
    finally:
        g.shield -= 1
        if g.shield == 0 and g.held is not None and g.installed and not g.fired:
            signum, g.held = g.held, None
            g.fired = True
            raise Interrupted(signum)


def note_teardown(report: TornDown) -> None:
    """Called by every teardown, so an interrupted run can say what it removed."""
    if _GUARD.installed and os.getpid() == _GUARD.owner:
        _GUARD.torn_down.append(report)


def describe(signame: str, torn_down: list[TornDown]) -> str:
    """The line an interrupted program ends with. Pure."""
    done = [t for t in torn_down if t.netns or t.processes]
    if not done:
        return f"interrupted by {signame}: nothing of this run was left to tear down"
    parts = [f"cluster {t.cluster} ({t.netns} namespaces, {t.processes} processes)" for t in done]
    return f"interrupted by {signame}: tore down {', '.join(parts)}"


def run_interruptible(main: Callable[[], int], prog: str) -> int:
    """Run `main` with SIGINT and SIGTERM raising `Interrupted`; on one, print what was
    torn down and return 128 + the signal number. Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("run_interruptible must run in the main thread")
    g = _GUARD
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    g.installed, g.fired, g.shield, g.held, g.torn_down, g.mark = True, False, 0, None, [], 0
    g.owner = os.getpid()
    for s in SIGNALS:
        signal.signal(s, _handler)
    try:
        return main()
    except Interrupted as e:
        print(f"{prog}: {describe(e.signame, g.torn_down[g.mark :])}", file=sys.stderr)
        return e.exit_code
    finally:
        g.installed = False
        for s, h in previous.items():
            signal.signal(s, h)
        sys.stderr.flush()
