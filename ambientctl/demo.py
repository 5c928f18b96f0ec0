"""`ambientctl demo`: the travel-booking app on two nodes, through the mesh, with evidence.

Brings the cluster up, sends bookings from a client outside the mesh and calls from inside
it, then prints each hop's SPIFFE identities from the tunnels' access logs and what a
packet capture on the link between the nodes saw (TLS records only, no app bytes), and
tears everything down.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import nsutil
from localcluster import mesh
from localcluster.capture import Capture
from localcluster.wire import NotTLS, negotiated_version, read_pcap, reassemble, tls_records

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


def run_demo(state_root: str | None) -> int:
    print(f"== bringing up {CLUSTER_FILE.name}: 2 nodes, namespace travel enrolled in the mesh")
    cluster = mesh.up(CLUSTER_FILE, state_root)
    ok = True
    try:
        node1 = cluster.layout.node("node1")
        pcap = Path(tempfile.mkdtemp(prefix="ambient-demo-")) / "node-link.pcap"
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
    finally:
        print("== tearing down")
        mesh.down(cluster.spec.name, state_root)
    left = [n for n in _netns_names() if n.startswith(f"{cluster.spec.name}-")]
    print(f"   network namespaces left behind: {len(left)}")
    ok &= not left
    print("== demo " + ("succeeded" if ok else "FAILED"))
    return 0 if ok else 1


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
        ok &= not leaked and 15008 in ports
    if not streams:
        print("   no traffic crossed the link (unexpected)")
        ok = False
    return ok
