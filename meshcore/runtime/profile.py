"""An optional CPU-time profile of a proxy process, for the benchmarks.

With `MESH_CPU_PROFILE=<path>` in its environment, a proxy runs its event loop under
cProfile with a CPU-time clock (time spent waiting for I/O is not counted; on a shared
machine wall time would measure the neighbours) and writes pstats to `<path>` when it
stops (SIGTERM). SIGUSR1 starts the count over, so a harness can leave start-up and
warm-up out of it; SIGUSR2 writes what was counted so far (and goes on counting).
Without the variable nothing is loaded or installed: cProfile costs several times the
CPU of the code it watches, so it is never on by default.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import cProfile

CPU_PROFILE_ENV = "MESH_CPU_PROFILE"
RESET_SIGNAL = signal.SIGUSR1
DUMP_SIGNAL = signal.SIGUSR2


def profile_path(env: Mapping[str, str]) -> str | None:
    """Where to write the profile, or None (unset or empty: no profile)."""
    path = env.get(CPU_PROFILE_ENV, "")
    return path or None


@contextmanager
def profiled(path: str | None) -> Iterator[None]:
    """Profile the main thread's work in the body (nothing when `path` is None); the stats
    are written to `path` however the body ends, through a temporary file renamed into
    place, so a reader never sees half a file. Main thread only (signal handler)."""
    if path is None:
        yield
        return
    import cProfile  # only when asked: a proxy does not carry it otherwise

    prof = cProfile.Profile(time.process_time)

    def reset(_signum: int, _frame: FrameType | None) -> None:
        # Runs between two bytecodes of the main thread, which is the profiled one.
        prof.disable()
        prof.clear()
        prof.enable()

    def dump(_signum: int, _frame: FrameType | None) -> None:
        _write(prof, path)  # disables it
        prof.enable()

    previous = {
        RESET_SIGNAL: signal.signal(RESET_SIGNAL, reset),
        DUMP_SIGNAL: signal.signal(DUMP_SIGNAL, dump),
    }
    prof.enable()
    try:
        yield
    finally:
        prof.disable()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _write(prof, path)


def _write(prof: cProfile.Profile, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    prof.dump_stats(tmp)
    os.replace(tmp, path)
