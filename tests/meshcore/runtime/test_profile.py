"""The on-request profile of a proxy's run: checked at start, off without the variable,
written when the run ends (also on error) and on SIGUSR2, started over on SIGUSR1."""

from __future__ import annotations

import os
import pstats
import signal
from pathlib import Path

import pytest

from meshcore.envconfig import EnvConfigError
from meshcore.runtime.profile import (
    DUMP_SIGNAL,
    PROFILE_ENV,
    RESET_SIGNAL,
    profile_dir,
    profile_file,
    profiled,
)


def _counted_first() -> int:
    return sum(range(1000))


def _counted_second() -> int:
    return sum(range(2000))


def _functions(path: Path) -> set[str]:
    return {fn for (_file, _line, fn) in pstats.Stats(str(path)).stats}  # type: ignore[attr-defined]


def test_unset_or_empty_means_off_and_installs_nothing(tmp_path: Path) -> None:
    assert profile_dir({}) is None
    assert profile_dir({PROFILE_ENV: "  "}) is None
    assert profile_dir({PROFILE_ENV: str(tmp_path)}) == tmp_path
    before = signal.getsignal(RESET_SIGNAL)
    with profiled("proxy", None):
        assert signal.getsignal(RESET_SIGNAL) is before
        _counted_first()
    assert not list(tmp_path.iterdir())


def test_a_relative_or_missing_directory_is_refused_naming_the_variable(tmp_path: Path) -> None:
    with pytest.raises(EnvConfigError, match=f"{PROFILE_ENV}=.*absolute"):
        profile_dir({PROFILE_ENV: "profiles"})
    with pytest.raises(EnvConfigError, match=f"{PROFILE_ENV}=.*not an existing directory"):
        profile_dir({PROFILE_ENV: str(tmp_path / "nope")})


def test_written_on_the_dump_signal_and_at_the_end_reset_starts_over(tmp_path: Path) -> None:
    out = profile_file(tmp_path, "proxy", os.getpid())
    previous = signal.getsignal(DUMP_SIGNAL)
    with profiled("proxy", tmp_path):
        _counted_first()
        os.kill(os.getpid(), DUMP_SIGNAL)  # handled before the next bytecode
        assert "_counted_first" in _functions(out)
        os.kill(os.getpid(), RESET_SIGNAL)
        _counted_second()
    got = _functions(out)
    assert "_counted_second" in got
    assert "_counted_first" not in got  # counted before the reset
    assert signal.getsignal(DUMP_SIGNAL) is previous  # handlers put back
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # through a renamed temporary


def _busy_then_fail(directory: Path) -> None:
    with profiled("proxy", directory):
        _counted_first()
        raise RuntimeError("stop")


def test_the_profile_is_written_when_the_run_ends_on_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        _busy_then_fail(tmp_path)
    assert "_counted_first" in _functions(profile_file(tmp_path, "proxy", os.getpid()))


def test_an_unwritable_directory_costs_the_profile_not_the_process(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gone = tmp_path / "gone"
    gone.mkdir()
    with profiled("proxy", gone):
        gone.rmdir()
    assert "could not write the profile" in capsys.readouterr().err
