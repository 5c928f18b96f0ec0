"""`mesh.up` never tears down a cluster it did not build."""

from __future__ import annotations

from pathlib import Path

import pytest
from pyroute2 import netns

from localcluster import mesh

pytestmark = pytest.mark.netns

CLUSTER = """
name: upguard
nodes: [{name: n1}]
namespaces: [{name: plain}]
pods: [{name: p, namespace: plain, node: n1, command: ["{python}", "-c", "pass"]}]
"""


def test_up_refuses_a_cluster_that_is_already_up_and_leaves_it_alone(tmp_path: Path) -> None:
    cfile = tmp_path / "cluster.yaml"
    cfile.write_text(CLUSTER)
    netns.create("upguard-c")  # stands for the running cluster of another run
    try:
        with pytest.raises(mesh.MeshUpError, match="already up"):
            mesh.up(cfile, tmp_path / "state")
        assert "upguard-c" in netns.listnetns()
    finally:
        netns.remove("upguard-c")
