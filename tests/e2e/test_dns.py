"""The DNS proxy end to end: an enrolled pod's DNS is captured and answered by its tunnel.

The cluster (dns.yaml) runs with DNS capture on. Its upstream resolver is a pod of the
test's own outside the mesh (dnsserver.py, 10.244.2.53), which knows only
`external.example.org` and logs every name it is asked. The client pod asks that resolver,
as a pod's resolv.conf would make it; what it gets back, and what the resolver saw, tell
which answers the tunnel gave itself and which it forwarded.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import struct
import time

import pytest

import nsutil
from localcluster import mesh
from meshcore.serviceentry import ALLOCATION_RANGE
from ztunnel.dns import message as m

from .common import HERE, echo, pod_ip, vip

pytestmark = pytest.mark.netns

CLUSTER_FILE = HERE / "dns.yaml"
REDIRECT_MODES = ("iptables", "ebpf")
RESOLVER = "10.244.2.53"


def resolver_log(c: mesh.Cluster) -> str:
    path = c.state.log_dir / "app-plain-resolver.log"
    return path.read_text() if path.exists() else ""


@pytest.fixture(scope="module")
def dns_cluster(cluster: mesh.Cluster) -> mesh.Cluster:
    deadline = time.monotonic() + 15
    while "resolver listening" not in resolver_log(cluster):
        assert time.monotonic() < deadline, "the test resolver never started"
        time.sleep(0.05)
    return cluster


def records(answer: bytes) -> tuple[int, list[tuple[int, str]]]:
    """(rcode, [(type, value)]) of an answer: A as an IP, CNAME as a name."""
    _, flags, qd, an, _, _ = m.HEADER.unpack_from(answer)
    pos = m.HEADER_LEN
    for _ in range(qd):
        pos = m._read_name(answer, pos)[1] + 4
    out: list[tuple[int, str]] = []
    for _ in range(an):
        pos = m._read_name(answer, pos)[1]
        rtype, _cls, _ttl, rdlen = struct.unpack_from("!HHIH", answer, pos)
        pos += 10
        if rtype == m.RType.A:
            out.append((rtype, str(ipaddress.IPv4Address(answer[pos : pos + rdlen]))))
        elif rtype == m.RType.CNAME:
            out.append((rtype, m.name_text(m._read_name(answer, pos)[0])))
        pos += rdlen
    return flags & m.RCODE_MASK, out


def ask_udp(
    c: mesh.Cluster, ns: str, pod: str, name: str, qtype: int = m.RType.A
) -> tuple[bytes, str]:
    """A query from inside the pod to the resolver, as the app's stub sends it: the answer
    and the address it came from."""
    ident = int.from_bytes(struct.pack("!H", hash(name) & 0xFFFF), "big")
    with nsutil.socket_at(c.pod_netns(ns, pod), socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(10)
        s.sendto(m.build_query(ident, m.name_labels(name), qtype), (RESOLVER, 53))
        data, peer = s.recvfrom(65535)
    assert m.HEADER.unpack_from(data)[0] == ident
    return data, peer[0]


def ask_tcp(c: mesh.Cluster, ns: str, pod: str, name: str) -> bytes:
    query = m.build_query(7, m.name_labels(name), m.RType.A)
    with nsutil.socket_at(c.pod_netns(ns, pod)) as s:
        s.settimeout(10)
        s.connect((RESOLVER, 53))
        s.sendall(struct.pack("!H", len(query)) + query)
        f = s.makefile("rb")
        size = struct.unpack("!H", f.read(2))[0]
        return f.read(size)


def test_service_name_answered_by_the_tunnel(dns_cluster: mesh.Cluster) -> None:
    c = dns_cluster
    answer, source = ask_udp(c, "mesh", "client", "server")
    # The answer looks like the resolver's (conntrack undoes the redirect) ...
    assert source == RESOLVER
    assert records(answer) == (0, [(m.RType.A, vip(c, "mesh", "server"))])
    # ... but the resolver never saw the question: the tunnel answered it.
    assert "asked server" not in resolver_log(c)
    # The search path a stub appends: CNAME to the name meant, then its address.
    answer, _ = ask_udp(c, "mesh", "client", "server.mesh.mesh.svc.cluster.local")
    assert records(answer) == (
        0,
        [(m.RType.CNAME, "server.mesh"), (m.RType.A, vip(c, "mesh", "server"))],
    )
    # AAAA of an IPv4-only service: ours to answer, and empty.
    answer, _ = ask_udp(c, "mesh", "client", "server.mesh.svc.cluster.local", m.RType.AAAA)
    assert records(answer) == (0, [])
    assert "asked server" not in resolver_log(c)


def test_over_tcp_too(dns_cluster: mesh.Cluster) -> None:
    answer = ask_tcp(dns_cluster, "mesh", "client", "server.mesh.svc.cluster.local")
    assert records(answer) == (0, [(m.RType.A, vip(dns_cluster, "mesh", "server"))])


def test_service_entry_host_allocated_and_routed(dns_cluster: mesh.Cluster) -> None:
    c = dns_cluster
    answer, _ = ask_udp(c, "mesh", "client", "api.example.org")
    rcode, recs = records(answer)
    assert rcode == 0 and len(recs) == 1
    allocated = recs[0][1]
    assert ipaddress.IPv4Address(allocated) in ALLOCATION_RANGE
    assert "asked api.example.org" not in resolver_log(c)
    # The allocated address is routed like a service: to the entry's endpoint, the server
    # pod, over HBONE (the server sees the client's own pod IP).
    seen, data = echo(c, "mesh", "client", allocated, 80, b"hello entry")
    assert data == b"hello entry"
    assert seen.split(":")[0] == pod_ip(c, "mesh", "client")


def test_service_entry_resolved_by_dns_passes_through(dns_cluster: mesh.Cluster) -> None:
    c = dns_cluster
    answer, _ = ask_udp(c, "mesh", "client", "legacy.example.org")
    rcode, recs = records(answer)
    assert rcode == 0 and len(recs) == 1
    allocated = recs[0][1]
    assert ipaddress.IPv4Address(allocated) in ALLOCATION_RANGE
    # Connecting to the allocated address: the tunnel asks the resolver for the host and
    # passes the connection through, in plain TCP, to what it names (the legacy pod).
    seen, data = echo(c, "mesh", "client", allocated, 80, b"by name")
    assert data == b"by name"
    assert seen.split(":")[0] == pod_ip(c, "mesh", "client")
    assert "asked legacy.example.org 1" in resolver_log(c)


def test_unknown_names_forwarded_to_the_upstream(dns_cluster: mesh.Cluster) -> None:
    c = dns_cluster
    answer, source = ask_udp(c, "mesh", "client", "external.example.org")
    assert source == RESOLVER
    assert records(answer) == (0, [(m.RType.A, "203.0.113.7")])
    assert "asked external.example.org 1" in resolver_log(c)
    answer = ask_tcp(c, "mesh", "client", "missing.example.org")
    assert records(answer) == (m.Rcode.NXDOMAIN, [])
    assert "asked missing.example.org 1" in resolver_log(c)


def test_malformed_query_gets_formerr(dns_cluster: mesh.Cluster) -> None:
    c = dns_cluster
    bad = m.HEADER.pack(0x5151, 0, 3, 0, 0, 0) + b"\x07garbage"
    with nsutil.socket_at(c.pod_netns("mesh", "client"), socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(10)
        s.sendto(bad, (RESOLVER, 53))
        data = s.recv(512)
    ident, flags = struct.unpack_from("!HH", data)
    assert ident == 0x5151 and flags & m.RCODE_MASK == m.Rcode.FORMERR
    # The proxy still serves.
    answer, _ = ask_udp(c, "mesh", "client", "server")
    assert records(answer)[0] == 0


def test_pods_outside_the_mesh_are_not_captured(dns_cluster: mesh.Cluster) -> None:
    c = dns_cluster
    answer, _ = ask_udp(c, "plain", "outsider", "server.mesh.svc.cluster.local")
    # Straight to the resolver, which does not know cluster names.
    assert records(answer) == (m.Rcode.NXDOMAIN, [])
    assert "asked server.mesh.svc.cluster.local 1" in resolver_log(c)


def test_config_dump_shows_the_dns_listener(dns_cluster: mesh.Cluster) -> None:
    status, body = mesh.node_http(dns_cluster.layout, "n1", 15000, "/config_dump")
    assert status == 200
    pods = {p["workload"]: p for p in json.loads(body)["pods"]}
    assert pods["mesh/client"]["listeners"]["dns"] == "127.0.0.1:15053 (udp, tcp)"


def test_dns_metrics_on_15020(dns_cluster: mesh.Cluster) -> None:
    status, body = mesh.node_http(dns_cluster.layout, "n1", 15020, "/metrics")
    assert status == 200
    text = body.decode()
    # The earlier tests' queries from the client pod: some answered, some forwarded.
    for family in ("istio_dns_requests_total", "istio_dns_upstream_requests_total"):
        lines = [
            line
            for line in text.splitlines()
            if line.startswith(family + "{") and 'source_canonical_service="client"' in line
        ]
        assert lines and all(float(line.rsplit(" ", 1)[1]) > 0 for line in lines), family
