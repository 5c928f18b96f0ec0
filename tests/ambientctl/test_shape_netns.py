"""The kubectl-shaped commands on a running local cluster of their own (shape.yaml): `use`
then no cluster argument, `--cluster`, the positional file, `get`/`describe`/`delete` by
short names, and `status` (a table; exit 1 on a problem it shows or a cluster that is not
running). In process (`cli.main`), one cluster for the module."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroute2 import netns as pr_netns

from ambientctl import cli
from localcluster import mesh

pytestmark = pytest.mark.netns

SHAPE = Path(__file__).parent / "shape.yaml"
NAME = "shp"
POLICY = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-plain, namespace: shop}
spec:
  action: DENY
  rules: [{from: [{source: {namespaces: [plain]}}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: shop}
spec:
  parentRefs: [{kind: Service, group: "", name: web}]
  rules: [{backendRefs: [{name: web, port: 80}]}]
"""


@pytest.fixture(scope="module")
def cluster() -> Iterator[mesh.Cluster]:
    state_root = tempfile.mkdtemp(prefix="shape-state-")
    try:
        c = mesh.up(SHAPE, state_root)
        try:
            yield c
        finally:
            mesh.down(c.spec.name, state_root)
        assert not [n for n in pr_netns.listnetns() if n.startswith(f"{NAME}-")]
    finally:
        shutil.rmtree(state_root, ignore_errors=True)


class Ctl:
    def __init__(self, root: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.root, self.capsys = root, capsys

    def __call__(self, *argv: str) -> tuple[int, str, str]:
        rc = cli.main(["--state-root", str(self.root), *argv])
        out, err = self.capsys.readouterr()
        assert "Traceback" not in err, err
        return rc, out, err


@pytest.fixture
def ctl(cluster: mesh.Cluster, capsys: pytest.CaptureFixture[str]) -> Ctl:
    return Ctl(cluster.state.dir.parent, capsys)


def test_use_then_no_cluster_argument(ctl: Ctl) -> None:
    assert ctl("use", NAME) == (0, f"current cluster: {NAME}\n", "")
    rc, out, _ = ctl("clusters")
    assert rc == 0 and out.splitlines()[1].split()[:4] == ["*", NAME, "Running", "mesh"]
    rc, out, err = ctl("status")
    assert rc == 0, err
    header, row = out.splitlines()
    assert header.split()[:2] == ["NODE", "TUNNEL"]
    # node, tunnel, config digest, agent, enrolled, pending, failed, waypoints
    cells = row.split()
    assert (cells[0], cells[1], cells[3], cells[4:7]) == ("n1", "Ready", "Running", ["2", "0", "0"])
    rc, out, _ = ctl("status", "-o", "json")
    doc = json.loads(out)
    assert rc == 0 and doc["n1"]["tunnel"]["ready"] is True
    assert doc["n1"]["tunnel"]["config"]["digest"].startswith(cells[2])
    rc, out, _ = ctl("get", "svc", "-n", "shop")
    assert rc == 0 and out.splitlines()[1].split() == ["web", "10.96.0.10", "80/TCP", "None", "1/1"]
    rc, out, _ = ctl("get", "ns", "--show-labels")
    assert "istio.io/dataplane-mode=ambient" in out.splitlines()[2]
    rc, out, _ = ctl("get", "wl", "-A", "-o", "wide")
    rows = {tuple(line.split()[:2]): line.split() for line in out.splitlines()[1:]}
    assert set(rows) == {("plain", "out"), ("shop", "client"), ("shop", "web-0")}
    assert rows[("shop", "client")][5] == "HBONE" and rows[("plain", "out")][5] == "TCP"
    rc, out, _ = ctl("get", "nodes")
    assert out.splitlines()[1].split() == ["n1", "Ready", "10.10.0.11", "3"]
    rc, out, _ = ctl("describe", "svc", "shop/web")
    assert rc == 0 and "Endpoints: 1/1 healthy" in out and "- shop/web-0" in out
    rc, _, err = ctl("get", "svc", "nope", "-n", "shop")
    assert rc == 1 and f"no Service shop/nope in cluster {NAME}" in err


def test_apply_get_describe_delete_by_short_names(ctl: Ctl, tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(POLICY)
    rc, out, err = ctl("apply", "-f", str(policy), "--wait", "--cluster", NAME)
    assert rc == 0, err
    try:
        rc, out, _ = ctl("get", "ap", "-n", "shop", "--cluster", NAME)
        assert out == "NAME         ACTION   SELECTOR\ndeny-plain   DENY     <none>\n"
        rc, out, _ = ctl("get", "authorizationpolicies", "deny-plain", "-n", "shop", "-o", "json")
        assert json.loads(out)["spec"]["action"] == "DENY"
        rc, out, _ = ctl("get", "hr", "-A", "--cluster", NAME)
        assert out.splitlines()[1].split()[:3] == ["shop", "web", "Service/web"]
        assert out.splitlines()[1].endswith("Accepted, ResolvedRefs")
        rc, out, _ = ctl("describe", "hr", "web", "-n", "shop", "--cluster", NAME)
        assert rc == 0 and "Kind:        HTTPRoute" in out and "type: ResolvedRefs" in out
    finally:
        assert ctl("delete", "ap", "deny-plain", "-n", "shop", "--cluster", NAME)[0] == 0
        assert ctl("delete", "hr", "shop/web", "--wait", "--cluster", NAME)[0] == 0
    rc, out, _ = ctl("get", "ap", "-n", "shop", "--cluster", NAME)
    assert (rc, out) == (0, "No resources found in shop namespace.\n")
    rc, _, err = ctl("delete", "ap", "deny-plain", "-n", "shop", "--cluster", NAME)
    assert rc == 1 and "no AuthorizationPolicy shop/deny-plain" in err


def test_positional_file_and_cluster_name_are_the_same_cluster(ctl: Ctl) -> None:
    by_file = ctl("get", str(SHAPE), "svc", "-A")
    by_name = ctl("get", "svc", "-A", "--cluster", NAME)
    assert by_file == by_name and by_file[0] == 0
    assert ctl("status", str(SHAPE))[0] == 0
    assert ctl("status", NAME)[0] == 0
    rc, _, err = ctl("status", "--cluster", "nope")
    assert rc == 1 and "cluster nope is not running" in err


def test_status_exits_1_on_a_problem_it_shows(cluster: mesh.Cluster, ctl: Ctl) -> None:
    assert mesh.stop_agent(cluster, "n1")
    try:
        rc, out, err = ctl("status", "--cluster", NAME)
        assert rc == 1
        assert out.splitlines()[1].split()[3] == "NotRunning"
        assert "ambientctl status: node n1: node agent not running" in err
    finally:
        mesh.start_node_agent(cluster, "n1")
    mesh.wait_ready(cluster)
    assert ctl("status", "--cluster", NAME)[0] == 0


def test_a_cluster_that_is_not_running_says_so(ctl: Ctl, tmp_path: Path) -> None:
    stopped = tmp_path / "stopped.yaml"
    stopped.write_text(SHAPE.read_text().replace(f"name: {NAME}", "name: shpstop"))
    for argv in (("status", str(stopped)), ("status", str(stopped), "-o", "json")):
        rc, out, err = ctl(*argv)
        assert (rc, out) == (1, "")
        assert "cluster shpstop is not running under" in err


def test_waypoints_in_status_get_and_describe(ctl: Ctl) -> None:
    rc, _, err = ctl("waypoint", "apply", "-n", "shop", "--wait", "--cluster", NAME)
    assert rc == 0, err
    try:
        rc, out, err = ctl("status", "--cluster", NAME)
        assert rc == 0, err
        assert out.splitlines()[1].split()[-1] == "1/1"  # WAYPOINTS: ready/total on n1
        rc, out, _ = ctl("get", "gw", "-n", "shop", "--cluster", NAME)
        name, klass, address, programmed = out.splitlines()[1].split()
        assert (name, klass, programmed) == ("waypoint", "istio-waypoint", "True")
        rc, out, _ = ctl("get", "wp", "-n", "shop", "--cluster", NAME)
        assert rc == 0 and out.splitlines()[1].split()[:3] == ["waypoint", "service", address]
        rc, out, _ = ctl("describe", "wp", "shop/waypoint", "--cluster", NAME)
        assert rc == 0 and "Programmed: True" in out and f"Address:    {address}" in out
        rc, out, _ = ctl("describe", "gw", "waypoint", "-n", "shop", "--cluster", NAME)
        assert rc == 0 and "type: Programmed" in out
    finally:
        rc, _, err = ctl("waypoint", "delete", "-n", "shop", "waypoint", "--cluster", NAME)
        assert rc == 0, err
    rc, out, _ = ctl("get", "wp", "-A", "--cluster", NAME)
    assert (rc, out) == (0, "No resources found.\n")
