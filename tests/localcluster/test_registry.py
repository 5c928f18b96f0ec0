"""Cluster names on one machine: taken names and names whose namespaces could collide."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from localcluster import registry
from localcluster.processes import proc_stat


@pytest.mark.parametrize(
    ("name", "running", "refused"),
    [
        ("uxq-n1", ["uxq"], True),  # its netns uxq-n1-* could be uxq's node n1's pods
        ("uxq", ["uxq-n1"], True),
        ("uxq", ["uxq"], True),
        ("uxq", ["uxqa", "ux", "abc"], False),  # `uxq-...` and `uxqa-...` never collide
        ("a-b-c", ["a"], True),
        ("a", [], False),
    ],
    ids=["prefixed by a running one", "prefixes a running one", "taken", "free", "deep", "none"],
)
def test_conflict(name: str, running: list[str], refused: bool) -> None:
    why = registry.conflict(name, running)
    assert (why is not None) == refused
    if refused and name not in running:
        assert "collides with running cluster" in (why or "")


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(registry, "RUN_DIR", tmp_path / "run")
    return tmp_path / "run" / "clusters"


def test_claim_refuses_a_colliding_name_while_its_claimer_lives(run_dir: Path, tmp_path: Path):
    registry.claim("uxq", tmp_path / "state" / "uxq")
    with pytest.raises(registry.ClusterConflict, match="collides with running cluster 'uxq'"):
        registry.claim("uxq-n1", tmp_path / "state" / "uxq-n1")
    assert [e.name for e in registry.running()] == ["uxq"]
    registry.release("uxq", tmp_path / "other-root" / "uxq")  # not this one: kept
    assert [e.name for e in registry.running()] == ["uxq"]
    registry.release("uxq", tmp_path / "state" / "uxq")
    assert registry.running() == []
    registry.claim("uxq-n1", tmp_path / "state" / "uxq-n1")


def test_an_entry_whose_claimer_died_and_whose_namespaces_are_gone_is_dropped(
    run_dir: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state" / "uxq"
    state.mkdir(parents=True)
    (state / "state.json").write_text(json.dumps({"netns": ["uxq-never-created"]}))
    run_dir.mkdir(parents=True)
    st = proc_stat(os.getpid())
    assert st is not None
    dead = {"name": "uxq", "stateDir": str(state), "pid": os.getpid(), "startTime": st[2] + 1}
    (run_dir / "uxq.json").write_text(json.dumps(dead))
    (run_dir / "junk.json").write_text("{not json")
    assert registry.running() == []
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]
