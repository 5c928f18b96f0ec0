"""SIGTERM and SIGINT for a long-running process that forks helpers.

pyroute2 forks a helper per socket it opens in another network namespace, stops it with
SIGTERM and then waits for it without a timeout. A forked child keeps its parent's
Python-level signal handlers: a helper that has not exited yet takes that SIGTERM as a stop
request for its copy of the parent (it sets a stop event nobody waits on) and lives on, and
if it was stuck the parent's thread waits for it for ever. A node agent or kubelet that
does netns work on one thread then stops doing any.

So, here: in a forked child the signals get their default action back at once (an at-fork
hook), and a handler that still runs in a child (a signal that arrived between the fork and
the hook) ends the child by the default action instead of calling the parent's callback.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _Installed:
    """What this process handles, for the at-fork hook (registered once)."""

    signals: tuple[signal.Signals, ...] = ()
    hooked = False


def _in_child() -> None:
    """After a fork, in the child: the default action again for what we handle."""
    for s in _Installed.signals:
        signal.signal(s, signal.SIG_DFL)
    _Installed.signals = ()


def on_stop_signal(
    callback: Callable[[int], object], signals: tuple[signal.Signals, ...] = STOP_SIGNALS
) -> None:
    """Call `callback(signum)` on each of `signals`, in this process only; a forked child
    dies of them as if no handler were set. Call from the main thread (as `signal.signal`).
    The callback runs in the main thread between bytecodes: keep it to setting a flag or
    `loop.call_soon_threadsafe`."""
    owner = os.getpid()

    def handler(signum: int, _frame: FrameType | None) -> None:
        if os.getpid() != owner:  # a child the hook has not reached: die of it all the same
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        callback(signum)

    for s in signals:
        signal.signal(s, handler)
    _Installed.signals = tuple(signals)
    if not _Installed.hooked:
        os.register_at_fork(after_in_child=_in_child)
        _Installed.hooked = True
