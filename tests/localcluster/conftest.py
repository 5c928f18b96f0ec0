"""Fixtures for the localcluster netns tier: a private state root and guaranteed teardown."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroute2 import netns as pr_netns

from localcluster.state import teardown

from .cluster_factory import random_cluster_name


@pytest.fixture
def state_root(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def cluster_name(state_root: Path) -> Iterator[str]:
    """A fresh random cluster name; whatever the test did, its cluster is gone afterwards."""
    name = random_cluster_name()
    yield name
    teardown(name, state_root)
    left = [n for n in pr_netns.listnetns() if n.startswith(f"{name}-")]
    assert not left, f"teardown left namespaces behind: {left}"
