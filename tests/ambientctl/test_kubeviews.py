"""ambientctl against a Kubernetes cluster, the pure part: the views computed from API
objects (with the control plane's compute and the tunnels' policy and explain), the
cluster selection, and the command line's usage errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ambientctl import cli, kubecmds
from ambientctl import kubeviews as kv
from ambientctl.kubefetch import KubeTarget, KubeUsage, choose
from ambientctl.views import ViewError
from tests.ambientctl.kubesample import daemonset, istiod, snapshot

STATUS_TABLE = """\
COMPONENT           KIND        NAMESPACE     READY  STATUS
istiod              Deployment  istio-system  1/1    Ready
ztunnel             DaemonSet   istio-system  2/2    Ready
ambient-node-agent  DaemonSet   istio-system  1/2    NotReady: 1/2 pods ready

NODE   ZTUNNEL            AMBIENT-NODE-AGENT
node1  ztunnel-1 (Ready)  ambient-node-agent-1 (Ready)
node2  ztunnel-2 (Ready)  ambient-node-agent-2 (NotReady)

AMBIENT NAMESPACE  PODS  CAPTURED  WAYPOINT
shop               4     2         waypoint
"""

WORKLOADS_TABLE = """\
NAMESPACE  POD NAME      ADDRESS    NODE   WAYPOINT      PROTOCOL  IDENTITY
shop       db-0          10.0.0.11  node2  wl (missing)  TCP       spiffe://example.org/ns/shop/sa/db
shop       starting      -          node1  None          TCP       spiffe://example.org/ns/shop/sa/default
shop       waypoint-5d9  10.0.0.30  node1  None          HBONE     spiffe://example.org/ns/shop/sa/waypoint
shop       web-0         10.0.0.10  node1  None          HBONE     spiffe://example.org/ns/shop/sa/web

Not captured yet (no ambient.istio.io/redirection=enabled):
  shop/db-0
"""

POLICIES_TABLE = """\
NAMESPACE  POLICY NAME  ACTION  SCOPE                        DRY-RUN  STATUS
shop       broken       DENY    NAMESPACE                    no       FailClosed
shop       deny-plain   DENY    WORKLOAD_SELECTOR (app=web)  no       Enforced

Failed closed (denying every connection in their scope until fixed):
  shop/broken: AuthorizationPolicy shop/broken: spec.rules[0].from[0].source.nmespaces: """


# ---- status ---------------------------------------------------------------------------------


def test_status_table_and_problems() -> None:
    st = kv.status(snapshot(node_agent_ready=1))
    assert kv.render_status(st) == STATUS_TABLE
    assert st.problems == [
        "DaemonSet istio-system/ambient-node-agent: 1/2 pods ready",
        "node node2: ambient-node-agent pod ambient-node-agent-2 is not ready",
    ]
    assert kv.status(snapshot(node_agent_ready=2)).problems == []


def test_status_missing_and_unscheduled_components_are_not_ready() -> None:
    snap = snapshot(2)
    objects = dict(snap.objects)
    objects["pods"] = [p for p in snap.of("pods") if p["metadata"]["name"] != "ztunnel-1"]
    bare = kv.Snapshot(objects, snap.nodes, [], [daemonset("ztunnel", 0, 0)])
    st = kv.status(bare)
    assert [(c.name, c.ok, c.message) for c in st.components] == [
        ("istiod", False, "not found"),
        ("ztunnel", False, "scheduled on no node"),
        ("ambient-node-agent", False, "not found"),
    ]
    # Nodes where a DaemonSet has a pod (the DaemonSet's own count says what is missing).
    assert [(n.node, n.pods) for n in st.nodes] == [("node2", (("ztunnel", "ztunnel-2", True),))]
    assert len(st.problems) == 3
    doc = st.to_json()
    assert doc["components"][0] == {
        "name": "istiod",
        "kind": "Deployment",
        "namespace": "istio-system",
        "found": False,
        "desired": 0,
        "ready": 0,
        "ok": False,
        "message": "not found",
    }
    assert doc["ambientNamespaces"] == [
        {"name": "shop", "pods": 4, "captured": 2, "waypoint": "waypoint"}
    ]


def test_status_istiod_not_ready() -> None:
    snap = snapshot(2)
    st = kv.status(kv.Snapshot(snap.objects, snap.nodes, [istiod(ready=0)], snap.daemonsets))
    assert st.problems == ["Deployment istio-system/istiod: 0/1 replicas ready"]


def test_settings_from_the_control_planes_args() -> None:
    assert snapshot().settings().trust_domain == "example.org"
    s = kv.settings_from_args(["--trust-domain=td", "--root-namespace", "mesh", "--cluster-id"])
    assert (s.trust_domain, s.root_namespace, s.cluster_id) == ("td", "mesh", "Kubernetes")


# ---- workloads and policies -------------------------------------------------------------------


def test_workloads_table() -> None:
    snap = snapshot()
    rows = kv.workloads(snap, kv.compute_mesh(snap), "shop")
    assert kv.render_workloads(rows) == WORKLOADS_TABLE
    db = next(r for r in rows if r.name == "db-0")
    assert db.to_json()["configProtocol"] == "HBONE" and db.protocol == "TCP"
    assert kv.render_workloads([]) == "No workloads found.\n"


def test_workload_waypoint_names() -> None:
    names = {"10.96.0.30": "shop/waypoint"}
    assert kv.waypoint_of({"address": "10.96.0.30"}, names, "shop") == "waypoint"
    assert kv.waypoint_of({"address": "10.96.0.30"}, names, "other") == "shop/waypoint"
    missing = {"hostname": "shop/wl.shop.svc.cluster.local"}
    assert kv.waypoint_of(missing, names, "other") == "shop/wl (missing)"
    assert kv.waypoint_of(None, names, "shop") == ""


def test_policies_fail_closed_with_why() -> None:
    mesh = kv.compute_mesh(snapshot())
    data = kv.policies(mesh)
    assert kv.render_policies(data).startswith(POLICIES_TABLE)
    broken = next(p for p in data["policies"] if p["name"] == "broken")
    assert broken["status"] == kv.FAIL_CLOSED and "nmespaces" in broken["problems"][0]
    assert kv.policies(mesh, "plain")["policies"] == []
    json.dumps(data)  # -o json


# ---- explain ----------------------------------------------------------------------------------


def _explain(src: str, dst: str, default_ns: str = "default") -> dict[str, Any]:
    snap = snapshot()
    return kv.explain(snap, kv.compute_mesh(snap), src, dst, default_ns)


def test_explain_pod_to_pod_is_denied_by_the_fail_closed_policy() -> None:
    doc = _explain("shop/db-0", "shop/web-0")  # the port: web-0's first container port
    assert doc["destination"]["ip"] == "10.0.0.10" and doc["destination"]["port"] == 8080
    assert doc["route"] == "HBONE"
    (ep,) = doc["endpoints"]
    assert ep["authorization"]["allowed"] is False
    assert ep["authorization"]["policy"] == "shop/broken"
    assert ep["delivery"] == "hbone"  # another node
    text = kv.render_explain_kube(doc)
    assert "authorization:  DENIED by policy shop/broken" in text


def test_explain_to_a_pod_bound_to_a_missing_waypoint_is_refused() -> None:
    doc = _explain("shop/web-0", "shop/db-0:5432")
    assert doc["route"] == "REFUSE"
    assert doc["waypoint"]["status"] == "refused"
    assert doc["endpoints"] == []
    assert "Capture:      the source is captured by its node agent" in kv.render_explain_kube(doc)


def test_explain_service_goes_through_its_waypoint() -> None:
    doc = _explain("db-0", "web.shop", default_ns="shop")
    assert doc["destination"]["via"] == "service shop/web.shop.svc.cluster.local"
    assert doc["destination"]["port"] == 80
    assert doc["waypoint"]["status"] == "used"
    assert [e["workload"] for e in doc["endpoints"]] == ["shop/waypoint-5d9"]
    assert "its node agent has not captured it yet" in kv.render_explain_kube(doc)
    # The ClusterIP is the same service.
    assert _explain("10.0.0.11", "10.96.0.10")["waypoint"]["status"] == "used"


def test_explain_source_outside_the_mesh() -> None:
    doc = _explain("plain/client", "shop/web-0:8080")
    assert doc["route"] == "NOT_CAPTURED"
    assert "not in the mesh" in kv.render_explain_kube(doc)


@pytest.mark.parametrize(
    ("src", "dst", "message"),
    [
        ("shop/nope", "shop/web-0", "no pod shop/nope"),
        ("shop/starting", "shop/web-0", "not a workload of the mesh config"),
        ("10.9.9.9", "shop/web-0", "no workload of the mesh config has IP 10.9.9.9"),
        ("shop/web-0", "shop/nope", "no pod shop/nope"),
        ("shop/web-0", "10.9.9.9", "give a port"),
        ("shop/web-0", "web.shop:http", "the port must be a number"),
        ("shop/web-0", "nosuch.shop:80", "neither an IP address nor a known service"),
    ],
)
def test_explain_errors(src: str, dst: str, message: str) -> None:
    with pytest.raises(ViewError, match=message):
        _explain(src, dst)


# ---- waypoints --------------------------------------------------------------------------------


def _gateway(name: str, programmed: str | None, address: str = "") -> dict[str, Any]:
    g: dict[str, Any] = {
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"gatewayClassName": "istio-waypoint"},
    }
    if programmed is not None:
        g["status"] = {
            "addresses": [{"type": "IPAddress", "value": address}] if address else [],
            "conditions": [
                {"type": "Programmed", "status": programmed, "reason": "R", "message": "m"}
            ],
        }
    return g


def _deployment(name: str, ready: int) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"replicas": 1},
        "status": {"readyReplicas": ready},
    }


def test_waypoint_rows_and_tables() -> None:
    other = {
        "metadata": {"name": "ingress", "namespace": "shop"},
        "spec": {"gatewayClassName": "x"},
    }
    rows = kv.waypoint_rows(
        [_gateway("waypoint", "True", "10.96.0.30"), _gateway("new", None), other],
        [_deployment("waypoint", 1)],
    )
    assert [(r.name, r.ready) for r in rows] == [("new", False), ("waypoint", True)]
    assert kv.render_waypoint_status(rows) == (
        "NAMESPACE  NAME      PROGRAMMED  DEPLOYMENT  REASON   MESSAGE\n"
        "shop       new       Unknown     none        Pending  the control plane has not "
        "written a status (is istiod running?)\n"
        "shop       waypoint  True        1/1 ready   R        m\n"
    )
    assert kv.render_waypoint_list(rows, with_namespace=False) == (
        "NAME      FOR      ADDRESS     PROGRAMMED  READY\n"
        "new       service  -           Unknown     -\n"
        "waypoint  service  10.96.0.30  True        1/1\n"
    )
    # Programmed but its Deployment has no ready replica (a restart): not ready.
    (row,) = kv.waypoint_rows([_gateway("waypoint", "True")], [_deployment("waypoint", 0)])
    assert not row.ready
    assert kv.render_waypoint_list([], True) == "No waypoints found.\n"


def test_waypoint_resource_is_istioctls() -> None:
    doc = kv.waypoint_resource("waypoint", "shop", "service")
    assert doc["spec"] == {
        "gatewayClassName": "istio-waypoint",
        "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
    }
    assert doc["metadata"] == {"name": "waypoint", "namespace": "shop"}


# ---- which cluster ----------------------------------------------------------------------------


def test_choose_the_cluster(tmp_path: Path) -> None:
    missing = tmp_path / "none"
    assert choose("c.yaml", None, None, {}, missing) is None
    assert choose("c.yaml", None, None, {"KUBECONFIG": "k"}, missing) is None
    assert choose(None, "k", "ctx", {}, missing) == KubeTarget(Path("k"), "ctx")
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("contexts: [{name: one}]\n")
    b.write_text("contexts: [{name: two}]\n")
    env = {"KUBECONFIG": f"{a}:{b}"}
    assert choose(None, None, None, env, missing) == KubeTarget(a, None)
    assert choose(None, None, "two", env, missing) == KubeTarget(b, "two")
    default = tmp_path / "config"
    default.write_text("{}\n")
    assert choose(None, None, None, {}, default) == KubeTarget(default, None)
    with pytest.raises(KubeUsage, match="not both"):
        choose("c.yaml", "k", None, {}, missing)
    with pytest.raises(KubeUsage, match="--kubeconfig PATH"):
        choose(None, None, None, {}, missing)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--kubeconfig", "k", "status", "c.yaml"], "not both"),
        (["status", "c.yaml", "--context", "x"], "not both"),
        (["--kubeconfig", "k", "label", "c.yaml", "namespace", "a", "k=v"], "local cluster"),
        (["--kubeconfig", "k", "workloads", "--node", "n1"], "--node goes with a local"),
    ],
)
def test_usage_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == cli.EXIT_USAGE
    assert message in capsys.readouterr().err


def test_kubeconfig_that_does_not_exist(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # No root needed against a Kubernetes cluster: the error is the kubeconfig's.
    assert cli.main(["--kubeconfig", str(tmp_path / "nope"), "status"]) == cli.EXIT_RUNTIME
    assert "cannot read kubeconfig" in capsys.readouterr().err


def test_waypoint_delete_names_before_the_namespace(tmp_path: Path) -> None:
    kubeconfig = str(tmp_path / "k")
    args = cli.build_parser().parse_args(
        ["--kubeconfig", kubeconfig, "waypoint", "delete", "wp1", "-n", "shop"]
    )
    target = cli._kube_target(args)
    assert target == KubeTarget(Path(kubeconfig), None)
    assert (args.cluster_file, args.names) == (None, ["wp1"])
    # After the subcommand too; a local command keeps its own handler.
    args = cli.build_parser().parse_args(["workloads", "--context", "c", "--kubeconfig", "k"])
    assert cli._kube_target(args) == KubeTarget(Path("k"), "c")
    args = cli.build_parser().parse_args(["workloads", "c.yaml"])
    assert cli._kube_target(args) is None and args.fn is cli._cmd_view


@pytest.mark.parametrize(
    ("ref", "via", "authority"),
    [
        ("web.shop", "service shop/web", "web.shop:80"),
        ("web.shop:8080", "service shop/web", "web.shop:8080"),
        ("shop/db-0", "address", "10.0.0.11:80"),
        ("db-0", "address", "10.0.0.11:80"),
        ("10.96.0.10", "address", "10.96.0.10:80"),
        ("[fd00::1]", "address", "[fd00::1]:80"),
    ],
)
def test_default_authority(ref: str, via: str, authority: str) -> None:
    doc = {"destination": {"ip": "10.0.0.11", "port": 80, "via": via}}
    assert kv.default_authority(ref, doc) == authority


def test_explain_http_through_the_waypoint(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The command's wiring, on the sample instead of an API server: the tunnel's answer,
    then the waypoint's decision for the request."""
    monkeypatch.setattr(kubecmds, "_snapshot", lambda *_: snapshot())
    argv = ["--kubeconfig", "k", "explain", "-n", "shop", "db-0", "web", "--http", "GET /a"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "Waypoint:     /10.96.0.30 (used)" in out
    assert "GET /a" in out
    assert cli.main([*argv, "-o", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["http"]["request"]["authority"] == "web:80"
    assert cli.main(["--kubeconfig", "k", "explain", "shop/db-0", "web.shop", "-H", "a: b"]) == 2
