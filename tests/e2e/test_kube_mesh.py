"""The mesh driven by a real Kubernetes API server, end to end in a local cluster.

`localcluster.kube.cluster.up` brings up two nodes, the API server, the local kubelet and the
mesh (control plane with xDS and the gRPC CA, the node CA, per node a node agent with the
Kubernetes pod source and a tunnel fed over xDS). Then, with kubectl only, as a user would:
the travel manifests are applied, the namespace is labelled, and the bookings go through the
tunnels between the nodes (mutual TLS, seen in both tunnels' metrics); an
AuthorizationPolicy applied with kubectl is enforced (the time it took is printed); a deleted
pod is replaced and served again.
"""

from __future__ import annotations

import json
import secrets
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import nsutil
from kube.podnetns import netns_name
from localcluster import mesh
from localcluster.kube import cluster as kcluster
from localcluster.meshconfig import MeshPaths
from localcluster.state import live_netns, teardown
from meshcore import defaults
from tests.support.failure import print_logs_if_failed

from .kubecommon import (
    apply_waypoint,
    booking,
    kc,
    pods,
    programmed_gateway,
    ready,
    routed_to_v2,
    wait_for,
)

pytestmark = [pytest.mark.kube, pytest.mark.netns, pytest.mark.slow]

DEMO = Path(__file__).resolve().parents[2] / "demo"


@pytest.fixture
def kmesh(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[kcluster.KubeCluster]:
    name = "km" + secrets.token_hex(2)
    cfile = tmp_path / "cluster.yaml"
    cfile.write_text(f"name: {name}\nnodes:\n  - name: n1\n  - name: n2\n")
    state_root = tmp_path / "state"
    c = kcluster.up(cfile, state_root, workdir=DEMO)
    try:
        yield c
    finally:
        stacks = (c.state.pidfile_dir, (kcluster.KUBELET,))
        print_logs_if_failed(request, c.state.log_dir, stacks_of=stacks)
        teardown(name, state_root)
        assert live_netns(name) == []


def enrolled(c: kcluster.KubeCluster) -> set[str]:
    """The names of the pods the node agents report enrolled, over all nodes."""
    out: set[str] = set()
    paths = MeshPaths(c.state.dir / "mesh")
    for node in c.spec.nodes:
        try:
            doc = json.loads(paths.agent_status(node.name).read_text())
        except (OSError, ValueError):
            continue
        out |= {p["name"] for p in doc.get("pods", {}).values() if p["state"] == "enrolled"}
    return out


def is_pricing_v1(p: dict[str, Any]) -> bool:
    labels = p["metadata"].get("labels") or {}
    return bool(labels.get("app") == "pricing" and labels.get("version") == "v1")


def metric_lines(c: kcluster.KubeCluster, node: str, name: str) -> list[str]:
    _, body = mesh.node_http(c.layout, node, defaults.METRICS_PORT, "/metrics")
    return [line for line in body.decode().splitlines() if line.startswith(name + "{")]


def test_kubectl_drives_the_mesh(kmesh: kcluster.KubeCluster) -> None:
    c = kmesh
    assert "deployment.apps/frontend created" in kc(c, "apply", "-f", str(DEMO / "kubernetes"))
    want = 6
    travel = wait_for(
        lambda: (lambda ps: ps if len(ps) == want and all(map(ready, ps)) else None)(
            pods(c, "travel")
        ),
        120,
        "the travel pods Ready",
    )
    legacy = wait_for(lambda: [p for p in pods(c, "legacy") if ready(p)], 60, "the legacy pod")
    client = nsutil.netns_path(netns_name(legacy[0]["metadata"]["uid"]))
    book = booking(c, client)

    # The manifests enrol the travel namespace. Take the label off with kubectl: every pod is
    # released (running on, plain); put it back: every pod is captured again, no restart.
    names = {p["metadata"]["name"] for p in travel}
    wait_for(lambda: names <= enrolled(c), 60, "every travel pod enrolled by the manifests")
    kc(c, "label", "namespace", "travel", "istio.io/dataplane-mode-")
    wait_for(lambda: not (names & enrolled(c)), 60, "every travel pod released")
    assert book() is not None  # the app works without the mesh
    kc(c, "label", "namespace", "travel", "istio.io/dataplane-mode=ambient")
    wait_for(lambda: names <= enrolled(c), 60, "every travel pod enrolled")
    uids = {p["metadata"]["uid"] for p in pods(c, "travel")}
    assert all(
        (p["metadata"].get("annotations") or {}).get("ambient.istio.io/redirection") == "enabled"
        for p in pods(c, "travel")
        if p["metadata"]["uid"] in uids
    )
    answer = wait_for(book, 30, "a booking through the mesh")
    assert [h["service"] for h in answer["chain"]] == ["frontend", "flights", "pricing"]
    # Several bookings: the frontend's flights calls land on both nodes' pods.
    for _ in range(6):
        assert book() is not None

    # The in-mesh hops went through the tunnels, with mutual TLS: each node's tunnel counted
    # connections as a source or a destination with the policy mutual_tls.
    def mtls_on_both() -> bool:
        seen = set()
        for node in c.spec.nodes:
            lines = metric_lines(c, node.name, "istio_tcp_connections_opened_total")
            if any('connection_security_policy="mutual_tls"' in line for line in lines):
                seen.add(node.name)
        return len(seen) == len(c.spec.nodes)

    wait_for(mtls_on_both, 15, "mutual TLS connections counted by both tunnels")

    # The API server through Service `kubernetes`, which has no selector (its Endpoints are
    # the API server's own), from an enrolled pod: as in-cluster clients reach it. The mesh
    # does not publish such a Service, so the tunnel passes the connection through to its
    # virtual IP and the node's service proxy takes it on.
    api = json.loads(kc(c, "get", "svc", "kubernetes", "-o", "json"))["spec"]["clusterIP"]
    inside = next(p for p in pods(c, "travel") if p["metadata"]["name"] in enrolled(c))
    status = api_status_line(nsutil.netns_path(netns_name(inside["metadata"]["uid"])), api)
    assert status.startswith("HTTP/1.1 "), status

    # An AuthorizationPolicy applied with kubectl: pricing refuses flights.
    policy = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "no-flights", "namespace": "travel"},
        "spec": {
            "selector": {"matchLabels": {"app": "pricing"}},
            "action": "DENY",
            "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/travel/sa/*"]}}]}],
        },
    }
    pfile = Path(c.state.dir) / "no-flights.json"
    pfile.write_text(json.dumps(policy))
    t0 = time.monotonic()
    kc(c, "apply", "-f", str(pfile))
    wait_for(lambda: book() is None, 20, "the booking refused by the policy")
    print(f"kubectl apply -> policy enforced: {time.monotonic() - t0:.2f} s")
    kc(c, "delete", "-f", str(pfile))
    wait_for(book, 20, "the booking served again once the policy is gone")

    # A pod deleted: its Deployment makes a new one, which is enrolled and serves.
    old = next(p for p in pods(c, "travel") if is_pricing_v1(p))
    # Its grace period is 5 s; the kubelet then confirms. Asked without kubectl's --wait and
    # then read back, so a slow deletion fails on the pod's own state (and the logs print).
    t0 = time.monotonic()
    kc(c, "-n", "travel", "delete", "pod", old["metadata"]["name"], "--wait=false")
    gone = old["metadata"]["uid"]
    wait_for(
        lambda: all(p["metadata"]["uid"] != gone for p in pods(c, "travel")),
        90,
        "the deleted pod gone",
    )
    print(f"kubectl delete pod -> pod gone: {time.monotonic() - t0:.2f} s")

    def new_pricing() -> str | None:
        for p in pods(c, "travel"):
            fresh_v1 = is_pricing_v1(p) and p["metadata"]["uid"] != old["metadata"]["uid"]
            if fresh_v1 and ready(p):
                return str(p["metadata"]["name"])
        return None

    fresh = wait_for(new_pricing, 60, "a new pricing pod Ready")
    wait_for(lambda: fresh in enrolled(c), 30, "the new pricing pod enrolled")
    answer = wait_for(book, 30, "a booking served by the new pod")
    assert any(h["served_by"] == fresh for h in answer["chain"])


def test_a_gateway_and_route_applied_with_kubectl_give_a_working_waypoint(
    kmesh: kcluster.KubeCluster,
) -> None:
    c = kmesh
    kc(c, "apply", "-f", str(DEMO / "kubernetes"))
    wait_for(
        lambda: (lambda ps: len(ps) == 6 and all(map(ready, ps)))(pods(c, "travel")),
        120,
        "the travel pods Ready",
    )
    legacy = wait_for(lambda: [p for p in pods(c, "legacy") if ready(p)], 60, "the legacy pod")
    book = booking(c, nsutil.netns_path(netns_name(legacy[0]["metadata"]["uid"])))
    apply_waypoint(c)

    gw = wait_for(lambda: programmed_gateway(c), 90, "the waypoint Gateway Programmed")
    assert gw["status"]["addresses"], "the Gateway names its address"
    # The control plane made the waypoint's Deployment; the kubelet runs its pod.
    deploy = json.loads(kc(c, "-n", "travel", "get", "deployment", "waypoint", "-o", "json"))
    assert deploy["metadata"]["ownerReferences"][0]["kind"] == "Gateway"

    def via_v2() -> dict[str, Any] | None:
        return routed_to_v2(book())

    wait_for(via_v2, 60, "a booking routed to flights-v2 by the waypoint")
    for _ in range(5):
        assert via_v2() is not None, "every booking goes to v2 while the route holds"
    route = json.loads(kc(c, "-n", "travel", "get", "httproute", "flights-to-v2", "-o", "json"))
    parents = (route.get("status") or {}).get("parents") or []
    assert any(
        x["type"] == "Accepted" and x["status"] == "True"
        for p in parents
        for x in p.get("conditions", [])
    ), route.get("status")


def api_status_line(netns: str, ip: str) -> str:
    """The status line the API server answers `GET /version` with, from a pod's netns
    (captured: an app's socket)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # only the path is under test, not the server's name
    with nsutil.socket_at(netns) as raw:
        raw.settimeout(10)
        raw.connect((ip, 443))
        with ctx.wrap_socket(raw) as s:
            s.sendall(b"GET /version HTTP/1.1\r\nHost: kubernetes\r\nConnection: close\r\n\r\n")
            return s.recv(4096).split(b"\r\n", 1)[0].decode()
