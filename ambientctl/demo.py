"""`ambientctl demo`: the travel-booking app on two nodes, through the mesh, with evidence.

Brings the cluster up, sends bookings from a client outside the mesh and calls from inside
it, then prints each hop's SPIFFE identities from the tunnels' access logs and what a
packet capture on the link between the nodes saw (TLS records only, no app bytes); applies
an AuthorizationPolicy to the running mesh, explains a call it denies, shows the data path
and the metrics agreeing, and tears everything down.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import nsutil
from ambientctl import demo_l7
from localcluster import mesh
from localcluster.capture import Capture
from localcluster.wire import NotTLS, negotiated_version, read_pcap, reassemble, tls_records
from meshcore.defaults import ADMIN_PORT, HBONE_PORT, METRICS_PORT

DEMO_DIR = Path(__file__).resolve().parent.parent / "demo"
CLUSTER_FILE = DEMO_DIR / "travel-cluster.yaml"
MARKERS = (b"AMS", b"LIS", b"booking", b"GET /")


def _fetch(cluster: mesh.Cluster, ns: str, pod: str, url: str) -> tuple[int, str]:
    proc = subprocess.run(
        [sys.executable, str(DEMO_DIR / "travel" / "fetch.py"), url],
        preexec_fn=nsutil.preexec_enter(cluster.pod_netns(ns, pod)),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return proc.returncode, proc.stdout or proc.stderr


def _vip(cluster: mesh.Cluster, name: str) -> str:
    return str(cluster.spec.service("travel", name).vip)


def _access_lines(cluster: mesh.Cluster) -> list[dict[str, object]]:
    lines = []
    for node in cluster.spec.nodes:
        for raw in cluster.tunnel_log(node.name).read_text().splitlines():
            try:
                doc = json.loads(raw)
            except ValueError:
                continue
            if doc.get("event") == "connection complete":
                lines.append(doc)
    return lines


def run_demo(state_root: str | None, progress: mesh.ProgressFn = None) -> int:
    """`progress`: where the steps of bringing the cluster up and down are reported."""
    print(f"== bringing up {CLUSTER_FILE.name}: 2 nodes, namespace travel enrolled in the mesh")
    cluster = mesh.up(CLUSTER_FILE, state_root, progress=progress)
    ok = True
    # The node-link capture lives as long as the demo reads it, then goes.
    scratch = tempfile.TemporaryDirectory(prefix="ambient-demo-")
    try:
        node1 = cluster.layout.node("node1")
        pcap = Path(scratch.name) / "node-link.pcap"
        with Capture(cluster.layout.cluster_netns_path, node1.bridge_port, pcap):
            url = f"http://{_vip(cluster, 'frontend')}/book?from=AMS&to=LIS"
            print(f"== legacy/legacy-client (outside the mesh) -> GET {url}")
            for _ in range(3):
                rc, out = _fetch(cluster, "legacy", "legacy-client", url)
                ok &= rc == 0
            if rc == 0:
                for hop in json.loads(out)["chain"]:
                    print(
                        f"   {hop['service']:9} served by {hop['served_by']:11} on {hop['node']}"
                        f" saw client {hop['seen_client']}"
                    )
            else:
                print(f"   FAILED: {out}")
        print("== hops, as the node tunnels logged them (one line per connection)")
        seen = set()
        for line in _access_lines(cluster):
            if line.get("direction") != "outbound":
                continue
            key = (line.get("src.identity"), line.get("dst.identity"))
            if key in seen:
                continue
            seen.add(key)
            print(
                f"   {line.get('src.identity')}\n     -> {line.get('dst.identity')}"
                f"  via {line.get('dst.hbone_addr')}  ({line.get('dst.service')})"
            )
        ok &= bool(seen)
        ok &= _report_wire(pcap)
        ok &= _policy_chapter(cluster)
        ok &= demo_l7.l7_act(cluster)
    finally:
        scratch.cleanup()
        print("== tearing down")
        mesh.down(cluster.spec.name, state_root, progress)
    left = [n for n in _netns_names() if n.startswith(f"{cluster.spec.name}-")]
    print(f"   network namespaces left behind: {len(left)}")
    ok &= not left
    print("== demo " + ("succeeded" if ok else "FAILED"))
    return 0 if ok else 1


PRICING_POLICY = {
    "apiVersion": "security.istio.io/v1",
    "kind": "AuthorizationPolicy",
    "metadata": {"name": "pricing-from-flights", "namespace": "travel"},
    "spec": {
        "selector": {"matchLabels": {"app": "pricing"}},
        "action": "ALLOW",
        "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/travel/sa/flights"]}}]}],
    },
}


def _admin(cluster: mesh.Cluster, node: str, path: str) -> Any:
    _, body = mesh.node_http(cluster.layout, node, ADMIN_PORT, path)
    return json.loads(body)


def _policy_chapter(cluster: mesh.Cluster) -> bool:
    """Apply an L4 policy to the running mesh, explain a call it denies, show the data path
    agreeing, and the denial in the destination's metrics."""
    key = "travel/pricing-from-flights"
    print(f"== policy: AuthorizationPolicy {key} (pricing accepts only flights' identity)")
    done = mesh.apply_policies(cluster, [PRICING_POLICY])
    assert done.digest is not None  # not a dry run: the mesh config was written
    try:
        mesh.wait_config(cluster, done.digest, timeout=15)
    except mesh.ConfigNotInForce as e:
        print(f"   FAILED: the tunnels never loaded the policy: {e}")
        return False
    ok = True
    why = _admin(
        cluster, "node1", "/debug/explain?source=travel/frontend-0&destination=pricing.travel:80"
    )
    for ep in why.get("endpoints", []):
        verdict = ep["authorization"]
        print(
            f"   explain travel/frontend-0 -> pricing.travel:80: {why['route']} to {ep['workload']}"
            f" ({ep['hbone']})\n     {verdict['reason']}"
        )
        ok &= not verdict["allowed"]
    rc, _ = _fetch(
        cluster, "travel", "frontend-0", f"http://{_vip(cluster, 'pricing')}/quote?flight=KL1"
    )
    print(
        f"   frontend-0 -> pricing directly: {'refused, as explained' if rc == 2 else f'rc {rc}'}"
    )
    ok &= rc == 2
    rc, _ = _fetch(
        cluster,
        "legacy",
        "legacy-client",
        f"http://{_vip(cluster, 'frontend')}/book?from=AMS&to=LIS",
    )
    print(
        f"   a booking (frontend -> flights -> pricing) still works: {'yes' if rc == 0 else 'NO'}"
    )
    ok &= rc == 0
    _, body = mesh.node_http(cluster.layout, "node2", METRICS_PORT, "/metrics")
    denied = [
        line
        for line in body.decode().splitlines()
        if line.startswith("istio_tcp_connections_closed_total") and 'response_flags="DENY"' in line
    ]
    print(f"   node2 /metrics, denied connections: {len(denied)} series")
    for line in denied[:1]:
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
        print(
            f"     {labels.get('source_principal')} -> {labels.get('destination_workload')}"
            f" reporter={labels.get('reporter')}: {line.rsplit(' ', 1)[-1]}"
        )
    ok &= bool(denied)
    return ok


def _netns_names() -> list[str]:
    try:
        return [p.name for p in Path(nsutil.NETNS_RUN_DIR).iterdir()]
    except FileNotFoundError:
        return []


def _report_wire(pcap: Path) -> bool:
    streams = reassemble(read_pcap(str(pcap)))
    print(f"== capture on the link between the nodes: {len(streams)} TCP byte streams")
    ok = True
    for (src, dst), data in sorted(streams.items()):
        ports = {src[1], dst[1]}
        try:
            records = tls_records(data)
        except NotTLS as e:
            print(f"   {src} -> {dst}: NOT TLS ({e})")
            ok = False
            continue
        leaked = [m.decode() for m in MARKERS if m in data]
        kinds = sorted({r.content_type for r in records})
        version = negotiated_version(records)
        vtext = {0x0304: "TLS 1.3"}.get(version or 0, "")
        print(
            f"   {src[0]}:{src[1]} -> {dst[0]}:{dst[1]}: {len(data)} bytes in {len(records)} "
            f"TLS records (types {kinds}) {vtext}" + (f" LEAKED {leaked}" if leaked else "")
        )
        ok &= not leaked and HBONE_PORT in ports
    if not streams:
        print("   no traffic crossed the link (unexpected)")
        ok = False
    return ok
