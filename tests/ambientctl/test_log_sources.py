"""Which log files `ambientctl logs TARGET` reads, on a cluster described by its file (no
cluster is started: the files are named by the cluster's state directory)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ambientctl import logs
from ambientctl.logfilter import LogUsage
from localcluster import gateways as gw
from localcluster import mesh
from localcluster.network import plan_layout
from localcluster.spec import parse_cluster
from localcluster.state import ClusterState

CLUSTER = """
name: logt
nodes: [{name: n1}, {name: n2}]
namespaces:
  - {name: shop, labels: {istio.io/dataplane-mode: ambient}}
  - {name: other}
pods:
  - {name: web-0, namespace: shop, node: n1, command: ["true"]}
  - {name: web-0, namespace: other, node: n2, command: ["true"]}
"""


@pytest.fixture
def cluster(tmp_path: Path) -> mesh.Cluster:
    doc = yaml.safe_load(CLUSTER)
    doc["gateways"] = [
        gw.waypoint_resource("waypoint", "shop"),
        gw.waypoint_resource("wp2", "other"),
    ]
    spec = parse_cluster(yaml.safe_dump(doc), Path("/"))
    return mesh.Cluster(spec, plan_layout(spec), ClusterState("logt", tmp_path / "logt"), True)


def names(found: list[logs.Source]) -> list[tuple[str, str]]:
    return [(s.name, s.path.name) for s in found]


def test_the_mesh_processes_per_node(cluster: mesh.Cluster) -> None:
    assert names(logs.sources(cluster, "ztunnel", None, None)) == [
        ("ztunnel/n1", "ztunnel-n1.log"),
        ("ztunnel/n2", "ztunnel-n2.log"),
    ]
    assert names(logs.sources(cluster, "ztunnel/n2", None, None)) == [
        ("ztunnel/n2", "ztunnel-n2.log")
    ]
    assert names(logs.sources(cluster, "agent", "n1", None)) == [("agent/n1", "agent-n1.log")]
    assert names(logs.sources(cluster, "ca", None, None)) == [("ca", "ca.log")]
    assert all(
        s.path.parent == cluster.state.log_dir for s in logs.sources(cluster, "agent", None, None)
    )


def test_waypoints_by_name_namespace_and_node(cluster: mesh.Cluster) -> None:
    every = names(logs.sources(cluster, "waypoint", None, None))
    assert every == [
        ("waypoint/other/wp2", "waypoint-other-wp2.log"),
        ("waypoint/shop/waypoint", "waypoint-shop-waypoint.log"),
    ]
    assert names(logs.sources(cluster, "waypoint/waypoint", None, None)) == [every[1]]
    assert names(logs.sources(cluster, "waypoint", None, "other")) == [every[0]]
    with pytest.raises(
        logs.LogsError, match=r"no waypoint matches \(waypoints: other/wp2, shop/waypoint\)"
    ):
        logs.sources(cluster, "waypoint/nope", None, None)


def test_pods_by_namespace(cluster: mesh.Cluster) -> None:
    assert names(logs.sources(cluster, "shop/web-0", None, None)) == [
        ("pod/shop/web-0", "app-shop-web-0.log")
    ]
    assert names(logs.sources(cluster, "web-0", None, "other")) == [
        ("pod/other/web-0", "app-other-web-0.log")
    ]
    with pytest.raises(logs.LogsError, match="no pod default/web-0 in cluster logt"):
        logs.sources(cluster, "web-0", None, None)


@pytest.mark.parametrize(
    ("target", "node", "error", "message"),
    [
        ("ztunnel/n9", None, logs.LogsError, "no node 'n9' in cluster logt"),
        ("ztunnel/n1", "n2", logs.LogsError, "name different nodes"),
        ("agent", "n9", logs.LogsError, "no node 'n9'"),
        ("a/b/c", None, LogUsage, "expected ztunnel"),
        ("shop/", None, LogUsage, "expected ztunnel"),
    ],
)
def test_what_names_nothing(
    cluster: mesh.Cluster, target: str, node: str | None, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        logs.sources(cluster, target, node, None)


def test_follow_prints_whole_new_lines_and_ends_when_the_files_are_gone(tmp_path: Path) -> None:
    import queue
    import threading

    from ambientctl.logfilter import Entry

    log = tmp_path / "ztunnel-n1.log"
    log.write_text("old line\n")
    batches: queue.Queue[list[Entry]] = queue.Queue()
    source = logs.Source("ztunnel/n1", log)
    result: list[int] = []
    offsets = {log: log.stat().st_size}  # what was there before following began
    follower = threading.Thread(
        target=lambda: result.append(logs.follow([source], offsets, batches.put, 0.01))
    )
    follower.start()
    got: list[Entry] = []
    with open(log, "a") as f:
        f.write("new line\nhalf a ")
        f.flush()
        got += batches.get(timeout=30)
        f.write("line\n")
    while len(got) < 2:
        got += batches.get(timeout=30)
    log.unlink()  # the cluster was taken down
    follower.join(30)
    assert [e.text for e in got] == ["new line", "half a line"]
    assert [e.source for e in got] == ["ztunnel/n1", "ztunnel/n1"]
    assert result == [0]
