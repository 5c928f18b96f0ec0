"""The on-request profile of a proxy's run: checked at start, written when the run ends."""

from __future__ import annotations

import os
import pstats
from pathlib import Path

import pytest

from meshcore.envconfig import EnvConfigError
from meshcore.runtime.profiling import PROFILE_ENV, profile_dir, profiled


def test_unset_or_empty_means_off() -> None:
    assert profile_dir({}) is None
    assert profile_dir({PROFILE_ENV: "  "}) is None


def test_a_relative_or_missing_directory_is_refused_naming_the_variable(tmp_path: Path) -> None:
    with pytest.raises(EnvConfigError, match=f"{PROFILE_ENV}=.*absolute"):
        profile_dir({PROFILE_ENV: "profiles"})
    with pytest.raises(EnvConfigError, match=f"{PROFILE_ENV}=.*not an existing directory"):
        profile_dir({PROFILE_ENV: str(tmp_path / "nope")})


def _busy() -> int:
    return sum(i * i for i in range(20_000))


def _busy_then_fail(directory: Path) -> None:
    with profiled("proxy", directory):
        _busy()
        raise RuntimeError("stop")


def test_the_profile_is_written_when_the_run_ends_even_on_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        _busy_then_fail(tmp_path)
    out = tmp_path / f"proxy-{os.getpid()}.prof"
    stats = pstats.Stats(str(out))
    assert any(func[2] == "_busy" for func in stats.stats)  # type: ignore[attr-defined]


def test_off_writes_nothing(tmp_path: Path) -> None:
    with profiled("proxy", None):
        _busy()
    assert not list(tmp_path.iterdir())


def test_an_unwritable_directory_costs_the_profile_not_the_process(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gone = tmp_path / "gone"
    gone.mkdir()
    with profiled("proxy", gone):
        gone.rmdir()
    assert "could not write the profile" in capsys.readouterr().err
