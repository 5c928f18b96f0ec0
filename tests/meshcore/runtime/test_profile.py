"""The optional CPU profile of a proxy process: off without the variable, written on exit
and on SIGUSR2, started over on SIGUSR1."""

from __future__ import annotations

import os
import pstats
import signal
from pathlib import Path

from meshcore.runtime.profile import (
    CPU_PROFILE_ENV,
    DUMP_SIGNAL,
    RESET_SIGNAL,
    profile_path,
    profiled,
)


def _counted_first() -> int:
    return sum(range(1000))


def _counted_second() -> int:
    return sum(range(2000))


def _functions(path: Path) -> set[str]:
    return {fn for (_file, _line, fn) in pstats.Stats(str(path)).stats}  # type: ignore[attr-defined]


def test_no_variable_no_profile() -> None:
    assert profile_path({}) is None
    assert profile_path({CPU_PROFILE_ENV: ""}) is None
    assert profile_path({CPU_PROFILE_ENV: "/tmp/x.pstats"}) == "/tmp/x.pstats"
    before = signal.getsignal(RESET_SIGNAL)
    with profiled(None):
        assert signal.getsignal(RESET_SIGNAL) is before  # nothing installed


def test_written_on_exit_and_on_dump_signal_reset_starts_over(tmp_path: Path) -> None:
    out = tmp_path / "p.pstats"
    previous = signal.getsignal(DUMP_SIGNAL)
    with profiled(str(out)):
        _counted_first()
        os.kill(os.getpid(), DUMP_SIGNAL)  # handled before the next bytecode
        assert "_counted_first" in _functions(out)
        os.kill(os.getpid(), RESET_SIGNAL)
        _counted_second()
    got = _functions(out)
    assert "_counted_second" in got
    assert "_counted_first" not in got  # counted before the reset
    assert signal.getsignal(DUMP_SIGNAL) is previous  # handlers put back
    assert not list(tmp_path.glob("*.tmp*"))  # written through a renamed temporary
