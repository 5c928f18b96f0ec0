"""cProfile over a proxy's run, on request: where its Python time goes, for the benchmarks.

`MESH_PROFILE=<directory>` (absolute, existing; checked at start so a mistake shows at once
and not as a lost profile at the end) runs the proxy's event loop under cProfile with a
CPU-time clock (time spent waiting for I/O is not counted; on a shared machine wall time
would measure the neighbours). The profile is written to `<directory>/<name>-<pid>.prof`
when the run ends (SIGTERM stops a proxy normally), and whenever SIGUSR2 asks (counting goes
on); SIGUSR1 starts the count over, so a harness can leave start-up and warm-up out.
Unset or empty: nothing is imported or installed. cProfile costs several times the CPU of
the code it watches, so a profiled run's throughput is not a measurement; the shares per
function are what it is for.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from meshcore.envconfig import EnvConfigError

if TYPE_CHECKING:
    import cProfile

PROFILE_ENV = "MESH_PROFILE"
RESET_SIGNAL = signal.SIGUSR1
DUMP_SIGNAL = signal.SIGUSR2


def profile_dir(env: Mapping[str, str]) -> Path | None:
    """Where to write profiles, or None when profiling is off."""
    raw = env.get(PROFILE_ENV, "").strip()
    if not raw:
        return None
    path = Path(raw)
    if not path.is_absolute():
        raise EnvConfigError(f"{PROFILE_ENV}={raw!r} must be an absolute directory path")
    if not path.is_dir():
        raise EnvConfigError(f"{PROFILE_ENV}={raw!r} is not an existing directory")
    return path


def profile_file(directory: Path, name: str, pid: int) -> Path:
    """The file the process `name` with `pid` writes its profile to."""
    return directory / f"{name}-{pid}.prof"


@contextmanager
def profiled(name: str, directory: Path | None) -> Iterator[None]:
    """Profile the main thread's work in the body (nothing when `directory` is None); the
    stats are written however the body ends. Main thread only (signal handlers)."""
    if directory is None:
        yield
        return
    import cProfile  # only when asked: a proxy does not carry it otherwise

    out = profile_file(directory, name, os.getpid())
    prof = cProfile.Profile(time.process_time)

    def reset(_signum: int, _frame: FrameType | None) -> None:
        # Runs between two bytecodes of the main thread, which is the profiled one.
        prof.disable()
        prof.clear()
        prof.enable()

    def dump(_signum: int, _frame: FrameType | None) -> None:
        _write(prof, out, name)  # disables it
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
        _write(prof, out, name)


def _write(prof: cProfile.Profile, out: Path, name: str) -> None:
    """Through a temporary file renamed into place, so a reader never sees half a file; a
    failure costs the profile, never the process."""
    prof.disable()
    tmp = out.with_name(f"{out.name}.tmp")
    try:
        prof.dump_stats(tmp)
        os.replace(tmp, out)
    except OSError as e:
        print(f"{name}: could not write the profile {out}: {e}", file=sys.stderr)
