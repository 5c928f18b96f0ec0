"""The mesh installed with its Helm charts on the real API server, run by the local kubelet
from the built image, end to end.

`helm install` of the four charts (CRDs, control plane, node agent, tunnel): the DaemonSet
controller makes one node-agent and one tunnel pod per Node, the scheduler binds them, the
local kubelet runs them from the image's file system (each container in its own mount
namespace on the image's root; the tunnel in its own pod netns, receiving the pods' netns
over ZDS; the agent in the node netns). The travel manifests applied with kubectl are
meshed and the bookings cross the nodes through the tunnels with mutual TLS. `helm upgrade`
of the tunnel to a new image replaces every tunnel pod while a client opens a connection
every 20 ms: none fails. `helm uninstall` releases every pod: no capture rule is left in any
pod netns and the pods' traffic goes direct.
"""

from __future__ import annotations

import json
import secrets
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

import nsutil
from kube.client import load_kubeconfig
from kube.podnetns import netns_name
from localcluster.kube import cluster as kcluster
from localcluster.kube import images, meshchart
from localcluster.kube.apiserver import kubectl
from localcluster.state import live_netns, teardown
from tests.localcluster.kube.test_kubelet import http_get

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

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "demo"
HERE = Path(__file__).resolve().parent
NEXT = "-next"


def require_image(tag: str) -> None:
    """The image of this tree in the store: setup builds the default tag; the script is a
    no-op (about a second) when the stored image was built from the same files."""
    r = subprocess.run(
        ["bash", str(ROOT / "scripts" / "image-build.sh"), "--tag", tag, "--version", tag],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    assert r.returncode == 0, f"image-build {tag}: {r.stderr[-3000:]}"
    assert images.lookup(meshchart.image_ref(tag)) is not None


@pytest.fixture
def helm_mesh(tmp_path: Path) -> Iterator[kcluster.KubeCluster]:
    require_image(meshchart.chart_version())
    name = "kh" + secrets.token_hex(2)
    cfile = tmp_path / "cluster.yaml"
    cfile.write_text(f"name: {name}\nnodes:\n  - name: n1\n  - name: n2\n")
    state_root = tmp_path / "state"
    c = kcluster.up(cfile, state_root, workdir=DEMO, with_mesh=False)
    try:
        meshchart.install(c.kubeconfig)
        meshchart.wait_rolled_out(kubectl(), c.kubeconfig, nodes=2, timeout=240)
        yield c
    finally:
        for line in _logs_tail(c):
            print(line)
        # The pods' and components' logs outlive the cluster, as test artefacts.
        shutil.copytree(c.state.log_dir, tmp_path / "logs", dirs_exist_ok=True)
        teardown(name, state_root)
        assert live_netns(name) == []


def _logs_tail(c: kcluster.KubeCluster) -> list[str]:
    out = []
    for log in sorted(c.state.log_dir.glob("*.log")):
        text = log.read_text(errors="replace")
        if "error" in text.lower():
            out.append(f"--- {log.name}: {text[-1500:]}")
    return out


def marked(p: dict[str, Any]) -> bool:
    annotations = p["metadata"].get("annotations") or {}
    return bool(annotations.get("ambient.istio.io/redirection") == "enabled")


def capture_rules(uid: str) -> list[str]:
    """Our chains' lines in a pod netns's iptables-save (none: nothing captures it)."""
    out = subprocess.run(
        ["ip", "netns", "exec", netns_name(uid), "iptables-save"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    return [line for line in out.splitlines() if "ISTIO" in line]


# CAP_NET_ADMIN (12) and CAP_SYS_ADMIN (21).
TUNNEL_CAPS = (1 << 12) | (1 << 21)


def tunnel_caps(uid: str) -> set[int]:
    """The effective capability sets of the processes in a tunnel pod's netns."""
    pids = subprocess.run(
        ["ip", "netns", "pids", netns_name(uid)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.split()
    caps = set()
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue  # a short-lived child (the certificate worker) that just ended
        for line in status.splitlines():
            if line.startswith("CapEff:"):
                caps.add(int(line.split()[1], 16))
    assert caps, f"no process in {netns_name(uid)}"
    return caps


def tunnel_metrics(c: kcluster.KubeCluster, node: str) -> str:
    tunnel = next(
        p for p in pods(c, "istio-system", "app=ztunnel") if p["spec"]["nodeName"] == node
    )
    node_ns = c.layout.node(node).netns_path
    status, body = http_get(node_ns, tunnel["status"]["podIP"], 15020, "/metrics")
    assert status == 200
    return body.decode()


def test_helm_installs_the_mesh_which_meshes_the_travel_app(
    helm_mesh: kcluster.KubeCluster,
) -> None:
    c = helm_mesh
    tag = meshchart.chart_version()
    bundle = images.lookup(meshchart.image_ref(tag))
    assert bundle is not None
    # One tunnel and one node agent per node; the tunnel in a pod netns of its own, the
    # agent on the node's network; every container from the image.
    tunnels = pods(c, "istio-system", "app=ztunnel")
    agents = pods(c, "istio-system", "app=ambient-node-agent")
    istiod = pods(c, "istio-system", "app=istiod")
    assert sorted(p["spec"]["nodeName"] for p in tunnels) == ["n1", "n2"]
    assert sorted(p["spec"]["nodeName"] for p in agents) == ["n1", "n2"]
    node_ips = {str(c.layout.node(n.name).ip) for n in c.spec.nodes}
    assert all(p["status"]["podIP"] not in node_ips for p in tunnels)
    assert all(p["status"]["podIP"] in node_ips for p in agents)
    for p in [*tunnels, *agents, *istiod]:
        (status,) = p["status"]["containerStatuses"]
        assert status["ready"], p["metadata"]["name"]
        assert bundle.digest in status.get("imageID", ""), status
    print(f"\nmesh pods run from image {bundle.ref} ({bundle.digest[:19]})")
    # The tunnel runs with the two capabilities its chart gives it, and no more.
    for p in tunnels:
        assert tunnel_caps(p["metadata"]["uid"]) == {TUNNEL_CAPS}, p["metadata"]["name"]

    kc(c, "apply", "-f", str(DEMO / "kubernetes"))
    travel = wait_for(
        lambda: (lambda ps: ps if len(ps) == 6 and all(map(ready, ps)) else None)(
            pods(c, "travel")
        ),
        120,
        "the travel pods Ready",
    )
    wait_for(lambda: all(map(marked, pods(c, "travel"))), 60, "every travel pod captured")
    assert all(capture_rules(p["metadata"]["uid"]) for p in travel)
    # The marks went through istiod's webhook, which refuses the agents anything else.
    _agents_are_held_to_their_mark(c, agents, travel)
    legacy = wait_for(lambda: [p for p in pods(c, "legacy") if ready(p)], 60, "the legacy pod")
    assert not capture_rules(legacy[0]["metadata"]["uid"])
    client = nsutil.netns_path(netns_name(legacy[0]["metadata"]["uid"]))
    book = booking(c, client)

    answer = wait_for(book, 60, "a booking through the mesh")
    assert [h["service"] for h in answer["chain"]] == ["frontend", "flights", "pricing"]
    for _ in range(6):
        assert book() is not None

    def mtls_on_both() -> bool:
        return all(
            'connection_security_policy="mutual_tls"' in tunnel_metrics(c, n.name)
            for n in c.spec.nodes
        )

    wait_for(mtls_on_both, 30, "mutual TLS connections counted by both tunnels")

    # A waypoint, as a user adds one: the control plane deploys it (from the same image, as
    # istio-proxy, certificates from istiod's gRPC CA with its own projected token, config
    # over xDS from istiod's Service) and its route sends the flights calls to v2.
    _waypoint_routes_to_v2(c, book)

    # helm uninstall: the agents release every pod before they go; nothing captures any
    # pod afterwards, the annotation is gone, and the app answers directly.
    uninstalled_at = datetime.now(UTC)
    meshchart.uninstall(c.kubeconfig)
    wait_for(
        lambda: not pods(c, "istio-system", "app in (ztunnel,ambient-node-agent,istiod)"),
        120,
        "the mesh's pods gone",
    )
    # (The ambient.istio.io/redirection annotation may stay: helm deletes the agent's
    # ServiceAccount right after its DaemonSet, so its token is refused by then. It is only
    # what users see; a later agent clears stale marks.)
    for p in pods(c, "travel"):
        assert capture_rules(p["metadata"]["uid"]) == [], p["metadata"]["name"]
    answer = wait_for(book, 30, "a booking without the mesh")
    assert [h["service"] for h in answer["chain"]] == ["frontend", "flights", "pricing"]
    # The components are gone, so their watches have ended: the API server logs a watch when
    # it first writes to it, an idle one only at its end.
    _rbac_as_used(c, uninstalled_at)


# The User-Agent of this test's own calls with a component's token, which the audit of the
# component's rights leaves out (they are refused on purpose).
PROBE_AGENT = "mesh-e2e-probe"


def _api(c: kcluster.KubeCluster, method: str, path: str, body: object, token: str = "") -> Any:
    """(status, decoded answer) of one API call, as the admin or with `token`."""
    config = load_kubeconfig(c.kubeconfig)
    req = urllib.request.Request(
        config.server + path,
        data=json.dumps(body).encode(),
        method=method,
        headers={
            "Authorization": f"Bearer {token or config.token}",
            "User-Agent": PROBE_AGENT,
            "Content-Type": "application/merge-patch+json"
            if method == "PATCH"
            else "application/json",
        },
    )
    ctx = config.ssl_context()
    assert isinstance(ctx, ssl.SSLContext)
    try:
        with urllib.request.urlopen(req, timeout=30, context=ctx) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _agents_are_held_to_their_mark(
    c: kcluster.KubeCluster, agents: list[dict[str, Any]], travel: list[dict[str, Any]]
) -> None:
    """istiod's webhook, reached by the API server through the kubelet's forward: with a
    token bound to a node agent's pod (as its kubelet mounts), a label change of a pod on
    its own node and a mark of a pod on the other node are refused by the webhook."""
    config = json.loads(
        kc(c, "get", "validatingwebhookconfiguration", "ambient-node-agent", "-o", "json")
    )
    (hook,) = config["webhooks"]
    assert hook["clientConfig"]["url"].startswith("https://127.0.0.1:"), hook["clientConfig"]
    wait_for(
        lambda: json.loads(
            kc(c, "get", "validatingwebhookconfiguration", "ambient-node-agent", "-o", "json")
        )["webhooks"][0]["clientConfig"].get("caBundle"),
        60,
        "istiod writing the webhook's caBundle",
    )
    target = travel[0]
    node = target["spec"]["nodeName"]
    by_node = {a["spec"]["nodeName"]: a for a in agents}
    other_node = next(n for n in by_node if n != node)

    def token_of(agent: dict[str, Any]) -> str:
        md = agent["metadata"]
        body = {
            "spec": {
                "expirationSeconds": 600,
                "boundObjectRef": {
                    "kind": "Pod",
                    "apiVersion": "v1",
                    "name": md["name"],
                    "uid": md["uid"],
                },
            }
        }
        path = "/api/v1/namespaces/istio-system/serviceaccounts/ambient-node-agent/token"
        status, answer = _api(c, "POST", path, body)
        assert status == 201, answer
        return str(answer["status"]["token"])

    path = f"/api/v1/namespaces/travel/pods/{target['metadata']['name']}/status"
    relabel = {"metadata": {"labels": {"app": "relabelled"}}}
    unmark = {"metadata": {"annotations": {"ambient.istio.io/redirection": None}}}

    def refused(token: str, patch: object, says: str) -> bool:
        status, answer = _api(c, "PATCH", path, patch, token)
        message = str(answer.get("message", ""))
        return status == 403 and "admission webhook" in message and says in message

    own, other = token_of(by_node[node]), token_of(by_node[other_node])
    wait_for(lambda: refused(own, relabel, "metadata.labels[app]"), 30, "a relabel refused")
    assert refused(
        other, unmark, f"may mark only its own node's pods; this pod is on node {node!r}"
    )
    assert marked(pods(c, "travel", f"app={target['metadata']['labels']['app']}")[0])


def _waypoint_routes_to_v2(
    c: kcluster.KubeCluster, book: Callable[[], dict[str, Any] | None]
) -> None:
    apply_waypoint(c)
    cls = json.loads(kc(c, "get", "gatewayclass", "istio-waypoint", "-o", "json"))
    assert any(
        x["type"] == "Accepted" and x["status"] == "True"
        for x in (cls.get("status") or {}).get("conditions", [])
    ), cls.get("status")

    wait_for(lambda: programmed_gateway(c), 120, "the waypoint Gateway Programmed")
    (wp,) = pods(c, "travel", "gateway.networking.k8s.io/gateway-name=waypoint")
    (status,) = wp["status"]["containerStatuses"]
    assert "sha256:" in status.get("imageID", ""), "the waypoint runs from the image"

    def via_v2() -> dict[str, Any] | None:
        return routed_to_v2(book())

    wait_for(via_v2, 90, "a booking routed to flights-v2 by the waypoint")
    for _ in range(3):
        assert via_v2() is not None, "every booking goes to v2 while the route holds"


# Rights a component holds for a path this test does not take, each with the reason.
NOT_EXERCISED = {
    "istiod": {
        # Only an edited or deleted copy of istio-ca-root-cert is rewritten.
        ("", "configmaps", "update"),
        # Server-side apply is authorised as a create the first time and audited as patch.
        ("", "services", "create"),
        ("", "serviceaccounts", "create"),
        ("apps", "deployments", "create"),
        # Events only for an object the mesh cannot use; statuses of kinds not applied here.
        ("", "events", "create"),
        ("security.istio.io", "peerauthentications/status", "patch"),
        ("security.istio.io", "requestauthentications/status", "patch"),
        ("security.istio.io", "authorizationpolicies/status", "patch"),
        ("networking.istio.io", "destinationrules/status", "patch"),
        ("networking.istio.io", "virtualservices/status", "patch"),
        ("gateway.networking.k8s.io", "grpcroutes/status", "patch"),
        # A pod the CA's informer has not seen yet is read with a GET.
        ("", "pods", "get"),
        # The CA Secret is created once: here by the first start, so it is never read.
        ("", "secrets", "get"),
    },
    "ambient-node-agent": {
        # The uninstall check reads its DaemonSet at SIGTERM; under helm uninstall the Role
        # is usually gone by then (refused, and the watch answers), so the right serves a
        # DaemonSet deleted by hand, with the rights still in place.
        ("apps", "daemonsets", "get"),
    },
}


def _rbac_as_used(c: kcluster.KubeCluster, uninstalled_at: datetime) -> None:
    """Every call each component made was allowed, and every right it holds was used (or is
    listed above with the path that needs it): the charts' rules against the API server's
    audit log of this very run. Refusals count until the uninstall began: from then on helm
    deletes the components' rights while they are still stopping."""
    from localcluster.kube import audit, helm

    log = kcluster.kube_dir(c.state) / "logs" / "audit.log"
    events = audit.parse_events(log.read_text(encoding="utf-8").splitlines())
    rendered = []
    for release in meshchart.RELEASES:
        rendered += helm.template(
            meshchart.CHARTS / release.chart, release.name, meshchart.NAMESPACE, None, []
        )
    for sa in ("istiod", "ambient-node-agent", "ztunnel"):
        user = f"system:serviceaccount:{meshchart.NAMESPACE}:{sa}"
        used = audit.calls(events, user, not_by=PROBE_AGENT)
        denied = sorted(
            x
            for x in audit.calls(events, user, before=uninstalled_at, not_by=PROBE_AGENT)
            if x.denied
        )
        assert not denied, f"{sa} was refused: {denied}"
        rules = audit.rules_of(rendered, sa, meshchart.NAMESPACE)
        assert all(audit.allowed(rules, x) for x in used), sa
        extra = set(audit.unused(rules, used)) - NOT_EXERCISED.get(sa, set())
        assert not extra, f"{sa} holds rights it never used: {sorted(extra)}"
        print(f"{sa}: {len(used)} distinct API calls, all allowed; no unused right")


def _echo_pods(c: kcluster.KubeCluster) -> tuple[dict[str, Any], dict[str, Any]]:
    ns = "echo"
    docs = [
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": ns, "labels": {"istio.io/dataplane-mode": "ambient"}},
        },
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "server", "namespace": ns, "labels": {"app": "server"}},
            "spec": {
                "nodeName": "n2",
                "automountServiceAccountToken": False,
                "containers": [
                    {
                        "name": "echo",
                        "image": "test/echo",
                        "command": ["python", str(HERE / "testapp.py")],
                        "readinessProbe": {"tcpSocket": {"port": 9000}, "periodSeconds": 1},
                    }
                ],
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "client", "namespace": ns, "labels": {"app": "client"}},
            "spec": {
                "nodeName": "n1",
                "automountServiceAccountToken": False,
                "containers": [
                    {
                        "name": "idle",
                        "image": "test/idle",
                        "command": ["python", "-c", "import signal; signal.pause()"],
                    }
                ],
            },
        },
    ]
    f = Path(c.state.dir) / "echo.json"
    f.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}))
    kc(c, "apply", "-f", str(f))

    def both() -> tuple[dict[str, Any], dict[str, Any]] | None:
        ps = {p["metadata"]["name"]: p for p in pods(c, ns)}
        if len(ps) == 2 and all(ready(p) and marked(p) for p in ps.values()):
            return ps["client"], ps["server"]
        return None

    return wait_for(both, 90, "the echo client and server Ready and captured")


AFTER_UPGRADE_SECONDS = 4


def test_helm_upgrade_of_the_tunnel_fails_no_connection(
    helm_mesh: kcluster.KubeCluster,
) -> None:
    c = helm_mesh
    new_tag = meshchart.chart_version() + NEXT
    require_image(new_tag)
    client, server = _echo_pods(c)
    before = {p["metadata"]["uid"] for p in pods(c, "istio-system", "app=ztunnel")}
    client_ns = nsutil.netns_path(netns_name(client["metadata"]["uid"]))
    seconds = 240  # an upper bound: the load is stopped once the upgrade is over
    load = subprocess.Popen(
        [sys.executable, str(HERE / "loadgen.py"), server["status"]["podIP"], "9000",
         "--seconds", str(seconds), "--interval-ms", "20", "--long", "0",
         "--connect-timeout", "20"],
        preexec_fn=nsutil.preexec_enter(client_ns),
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        time.sleep(3)
        t0 = time.monotonic()
        meshchart.upgrade(c.kubeconfig, "tunnel", new_tag)

        def replaced() -> bool:
            ts = pods(c, "istio-system", "app=ztunnel")
            return (
                len(ts) == 2
                and all(ready(p) for p in ts)
                and not ({p["metadata"]["uid"] for p in ts} & before)
                and all(new_tag in p["spec"]["containers"][0]["image"] for p in ts)
            )

        wait_for(replaced, 180, "every tunnel pod replaced by the new version")
        took = time.monotonic() - t0
        # A few more seconds of connections through the new tunnels only, then the summary.
        time.sleep(AFTER_UPGRADE_SECONDS)
        load.terminate()
        out, _ = load.communicate(timeout=60)
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
    result = json.loads(out)
    slowest = max(result.get("connect_s", [0.0]))
    print(
        f"\nhelm upgrade of the tunnel: both nodes replaced in {took:.1f} s; "
        f"{result['attempts']} new connections, {len(result['failures'])} failed; "
        f"slowest connect {slowest:.2f} s"
    )
    assert result["attempts"] > 300
    assert result["failures"] == []
    # The connections keep going through the new tunnels: every node serves the pods again.
    for p in pods(c, "echo"):
        assert capture_rules(p["metadata"]["uid"])
