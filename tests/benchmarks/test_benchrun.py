"""What the cluster benchmarks share: the cluster torn down however the work ends, and the
results file's header. The cluster itself is a stand-in (no root, no namespaces)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import benchrun

from localcluster.mesh import MeshUpError


class BenchError(Exception):
    pass


@pytest.fixture
def ends(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """The end_run calls made, with `up` giving a stand-in cluster."""
    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(benchrun, "up", lambda file, root, mesh: ("cluster", file, mesh))
    monkeypatch.setattr(benchrun, "end_run", lambda *a: calls.append(a))
    return calls


def test_the_work_runs_on_the_cluster_and_the_cluster_goes_down_after(
    ends: list[tuple[Any, ...]], tmp_path: Path
) -> None:
    got = benchrun.on_cluster("t", Path("c.yaml"), tmp_path, lambda c: ["ran on", c], BenchError)
    cluster = ("cluster", Path("c.yaml"), True)
    assert got == ["ran on", cluster]
    assert ends == [("t", cluster, tmp_path, True, False)]


@pytest.mark.parametrize("error", [BenchError("no echo"), MeshUpError("no tunnel")])
def test_a_failed_run_is_none_says_why_and_keeps_its_logs(
    ends: list[tuple[Any, ...]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    error: Exception,
) -> None:
    def work(c: Any) -> int:
        raise error

    assert benchrun.on_cluster("t", Path("c.yaml"), tmp_path, work, BenchError) is None
    assert capsys.readouterr().err == f"t: {error}\n"
    assert [(ok, interrupted) for *_, ok, interrupted in ends] == [(False, False)]


def test_a_failed_bring_up_still_ends_the_run_without_a_cluster(
    monkeypatch: pytest.MonkeyPatch, ends: list[tuple[Any, ...]], tmp_path: Path
) -> None:
    def up(*a: Any, **kw: Any) -> Any:
        raise MeshUpError("no node")

    monkeypatch.setattr(benchrun, "up", up)
    assert benchrun.on_cluster("t", Path("c.yaml"), tmp_path, lambda c: 1, BenchError) is None
    assert ends == [("t", None, tmp_path, False, False)]


def test_an_interrupt_goes_on_after_the_cluster_is_down(
    ends: list[tuple[Any, ...]], tmp_path: Path
) -> None:
    def work(c: Any) -> int:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        benchrun.on_cluster("t", Path("c.yaml"), tmp_path, work, BenchError)
    assert [(ok, interrupted) for *_, ok, interrupted in ends] == [(False, True)]


def test_another_error_is_not_swallowed(ends: list[tuple[Any, ...]], tmp_path: Path) -> None:
    def work(c: Any) -> int:
        raise KeyError("bug")

    with pytest.raises(KeyError):
        benchrun.on_cluster("t", Path("c.yaml"), tmp_path, work, BenchError)
    assert [(ok, interrupted) for *_, ok, interrupted in ends] == [(False, False)]


def test_a_results_file_starts_with_the_header_and_holds_the_document(tmp_path: Path) -> None:
    doc = {**benchrun.header("b", "python b.py --x"), "figures": [1, 2]}
    path = benchrun.write_results(doc, "b", tmp_path / "results")
    assert path.parent == tmp_path / "results"
    assert path.name.startswith("b-") and path.suffix == ".json"
    back = json.loads(path.read_text(encoding="utf-8"))
    assert list(back)[:4] == ["benchmark", "time", "command", "host"]
    assert back["benchmark"] == "b" and back["command"] == "python b.py --x"
    assert set(back["host"]) == {"kernel", "cpus", "usable_cpus", "python"}
    assert back["host"]["usable_cpus"] <= back["host"]["cpus"]
    assert back["figures"] == [1, 2]
