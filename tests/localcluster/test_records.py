"""Policies go through the cluster's records and the mesh config is generated from them:
the file the tunnels read never holds what they would refuse, and a bad hand edit heals.
No root: nothing here touches a namespace."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import yaml

from localcluster import mesh
from localcluster.network import plan_layout
from localcluster.policies import PolicyError
from localcluster.spec import parse_cluster
from localcluster.state import ClusterState
from meshcore.discovery import parse_local_config

CLUSTER = """
name: rec
nodes: [{name: n1}]
namespaces: [{name: mesh, labels: {istio.io/dataplane-mode: ambient}}]
pods: [{name: a, namespace: mesh, node: n1, command: ["{python}", "-c", "pass"]}]
"""


def authz(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": "mesh"},
        "spec": spec or {"action": "DENY", "rules": [{}]},
    }


@pytest.fixture
def cluster(tmp_path: Path) -> mesh.Cluster:
    spec = parse_cluster(CLUSTER, tmp_path)
    layout = plan_layout(spec)
    c = mesh.Cluster(spec, layout, ClusterState("rec", tmp_path / "rec"), True)
    c.paths.root.mkdir(parents=True)
    mesh.write_mesh_config(spec, c.paths)
    mesh.write_pod_source(c.paths, mesh.pod_source_doc(spec, layout))
    return c


def files(c: mesh.Cluster) -> tuple[bytes, bytes | None]:
    p = c.paths.policies
    return c.paths.xds.read_bytes(), p.read_bytes() if p.exists() else None


def test_apply_writes_through_the_records_and_returns_the_digest(cluster: mesh.Cluster) -> None:
    done = mesh.apply_policies(cluster, [authz("deny-all")])
    assert done.lines == ("AuthorizationPolicy mesh/deny-all created",)
    assert done.digest == hashlib.sha256(cluster.paths.xds.read_bytes()).hexdigest()
    state = parse_local_config(cluster.paths.xds.read_text())  # as the tunnel reads it
    assert [p.key for p in state.policies] == ["mesh/deny-all"]
    assert [p["metadata"]["name"] for p in mesh.read_policies(cluster)] == ["deny-all"]


def test_a_refused_batch_writes_nothing(cluster: mesh.Cluster) -> None:
    mesh.apply_policies(cluster, [authz("first")])
    before = files(cluster)
    with pytest.raises(PolicyError):
        mesh.apply_policies(cluster, [authz("ok"), authz("bad", action="ALLOWW")])
    with pytest.raises(PolicyError, match="no AuthorizationPolicy mesh/absent"):
        mesh.delete_policies(cluster, [("AuthorizationPolicy", "mesh", "first"),
                                       ("AuthorizationPolicy", "mesh", "absent")])  # fmt: skip
    assert files(cluster) == before


def test_dry_run_writes_nothing(cluster: mesh.Cluster) -> None:
    before = files(cluster)
    done = mesh.apply_policies(cluster, [authz("p")], dry_run=True)
    assert done.digest is None and done.lines == ("AuthorizationPolicy mesh/p created",)
    assert files(cluster) == before


def test_a_hand_broken_mesh_config_is_regenerated_by_the_next_change(
    cluster: mesh.Cluster,
) -> None:
    mesh.apply_policies(cluster, [authz("kept")])
    doc = yaml.safe_load(cluster.paths.xds.read_text())
    doc["policies"].append({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
                            "metadata": {"name": "vs", "namespace": "mesh"}})  # fmt: skip
    cluster.paths.xds.write_text(yaml.safe_dump(doc))
    mesh.apply_policies(cluster, [authz("next")])
    state = parse_local_config(cluster.paths.xds.read_text())
    assert sorted(p.key for p in state.policies) == ["mesh/kept", "mesh/next"]
    assert [w.protocol.name for w in state.workloads] == ["HBONE"]


@pytest.mark.parametrize(
    ("status", "digest", "problem"),
    [
        ({"config": {"digest": "abc", "rejected": None}}, "abc", None),
        ({"config": {"digest": "abc", "rejected": None}}, None, None),
        ({"config": {"digest": "old", "rejected": None}}, "new", "runs old, not new (yet)"),
        (
            {"config": {"digest": "old", "rejected": {"digest": "new", "error": "kind x"}}},
            None,
            "the tunnel refused the mesh config new: kind x; it keeps running the previous one",
        ),
        (None, "abc", "tunnel unreachable"),
        ({"ready": True}, "abc", "does not report its config"),
    ],
    ids=["runs it", "any", "not yet", "refused", "unreachable", "older tunnel"],
)
def test_config_problem(status: Any, digest: str | None, problem: str | None) -> None:
    got = mesh.config_problem(status, digest)
    assert (got is None) == (problem is None)
    assert problem is None or problem in (got or "")
