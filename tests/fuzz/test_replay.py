"""Every seed of fuzz/corpus/ and every crash kept in fuzz/crashes/, through its target:
the regression cases of the fuzzing (`make fuzz`). A target raises nothing for any input
(its documented errors are the answer to bad input, caught inside), so each case passes by
returning. Atheris is not needed here: the targets are plain functions."""

from __future__ import annotations

from pathlib import Path

import pytest

from fuzz import harness
from fuzz.targets import TARGETS

CASES = harness.replay_files()


@pytest.mark.parametrize(
    ("target", "path"), CASES, ids=[f"{t}/{p.parent.name}/{p.name}" for t, p in CASES]
)
def test_input_is_handled(target: str, path: Path) -> None:
    harness.entry(target)(path.read_bytes())


@pytest.mark.parametrize("target", TARGETS)
def test_every_target_has_a_seed_corpus(target: str) -> None:
    folder = harness.CORPUS / target
    assert folder.is_dir() and any(folder.iterdir()), f"no seeds for {target}"


@pytest.mark.parametrize("target", TARGETS)
def test_committed_seeds_are_the_encoders_output(target: str) -> None:
    """The corpus is what `python -m fuzz.run --write-seeds` writes: a change to an
    encoder shows here, and the seeds are rebuilt rather than left stale."""
    for name, data in harness.seeds(target).items():
        stale = f"{target}/{name}: run `.venv/bin/python -m fuzz.run --write-seeds {target}`"
        assert (harness.CORPUS / target / name).read_bytes() == data, stale


def test_seeds_are_small() -> None:
    for _, path in CASES:
        assert path.stat().st_size <= 16 * 1024, path


def test_summary_of_a_libfuzzer_log() -> None:
    from fuzz.run import summarize

    log = (
        "#2\tINITED cov: 12 ft: 13 corp: 3/200b exec/s: 0 rss: 50Mb\n"
        "#900\tNEW    cov: 40 ft: 77 corp: 9/400b lim: 20 exec/s: 900 rss: 51Mb L: 3/9\n"
        "artifact_prefix='x/'; Test unit written to x/crash-abc\n"
        "stat::number_of_executed_units: 1000\n"
        "stat::average_exec_per_sec:     500\n"
        "stat::slowest_unit_time_sec:    2\n"
    )
    r = summarize("t", log, 1)
    assert (r.executions, r.per_second, r.cov, r.ft, r.slowest) == (1000, 500, 40, 77, 2)
    assert r.crashes == ["x/crash-abc"]
