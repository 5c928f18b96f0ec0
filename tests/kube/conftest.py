"""The real Kubernetes API server for tests: one per test session (about 5 s to start).

Tests that use it are marked `kube` (root tier: the binaries live in root's cache). Each test
works in namespaces of its own, so sharing one API server across a session is safe.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from localcluster.kube.apiserver import KubeControlPlane


@pytest.fixture(scope="session")
def kube_cp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeControlPlane]:
    cp = KubeControlPlane(Path(tmp_path_factory.mktemp("kube")), die_with_parent=True)
    cp.start()
    try:
        yield cp
    finally:
        cp.stop()
