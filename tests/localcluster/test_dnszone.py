"""The cluster DNS's zone and answers (pure), and its bounds on loopback sockets."""

from __future__ import annotations

import asyncio
import socket
import struct
from ipaddress import IPv4Address
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from localcluster.kube.clusterdns import ClusterDns, DnsLimits, RateLimiter
from localcluster.kube.dnszone import Zone, answer, build_zone, respond
from localcluster.kube.podplan import service_info
from localcluster.kube.proxyplan import endpoint_of, listed_endpoints
from ztunnel.dns import message as m

D = "cluster.local"


def svc(ns: str, name: str, ip: str, selector: dict[str, str] | None, ports: list[Any]) -> Any:
    spec: dict[str, Any] = {"clusterIP": ip, "ports": ports}
    if selector is not None:
        spec["selector"] = selector
    return service_info({"metadata": {"name": name, "namespace": ns}, "spec": spec})


def pod(ns: str, name: str, labels: dict[str, str], ip: str, ready: bool = True) -> Any:
    return endpoint_of(
        {
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"containers": [{"ports": [{"name": "web", "containerPort": 9090}]}]},
            "status": {
                "phase": "Running",
                "podIP": ip,
                "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            },
        }
    )


def zone() -> Zone:
    services = [
        svc("shop", "web", "10.96.0.50", {"app": "web"}, [{"name": "http", "port": 80}]),
        svc(
            "shop",
            "db",
            "None",
            {"app": "db"},
            [{"name": "pg", "port": 5432, "targetPort": "web"}, {"port": 1}],
        ),
        svc("istio-system", "istiod", "10.96.0.60", {"app": "istiod"}, [{"port": 15012}]),
        svc("shop", "ext", "None", None, [{"name": "x", "port": 7}]),
    ]
    pods = [
        pod("shop", "db-0", {"app": "db"}, "10.244.1.20"),
        pod("shop", "db-1", {"app": "db"}, "10.244.2.20"),
        pod("other", "db-x", {"app": "db"}, "10.244.2.21"),  # another namespace
    ]
    listed = [
        listed_endpoints(
            {
                "metadata": {"name": "ext", "namespace": "shop"},
                "subsets": [
                    {"addresses": [{"ip": "192.0.2.7"}], "ports": [{"name": "x", "port": 77}]}
                ],
            }
        )
    ]
    return build_zone(D, services, [p for p in pods if p is not None], listed)


def q(name: str, qtype: int = m.RType.A, qclass: int = m.CLASS_IN) -> m.Question:
    return m.Question(m.name_labels(name), qtype, qclass)


def ips(records: tuple[m.Record, ...]) -> list[str]:
    return [str(IPv4Address(r.rdata)) for r in records if r.rtype == m.RType.A]


@pytest.mark.parametrize(
    ("name", "qtype", "rcode", "want"),
    [
        ("web.shop.svc.cluster.local", m.RType.A, m.Rcode.NOERROR, ["10.96.0.50"]),
        ("WEB.Shop.svc.cluster.local.", m.RType.A, m.Rcode.NOERROR, ["10.96.0.50"]),
        ("web.shop.svc.cluster.local", m.RType.AAAA, m.Rcode.NOERROR, []),
        ("web.shop.svc.cluster.local", m.RType.TXT, m.Rcode.NOERROR, []),
        ("istiod.istio-system.svc.cluster.local", m.RType.A, m.Rcode.NOERROR, ["10.96.0.60"]),
        ("db.shop.svc.cluster.local", m.RType.A, m.Rcode.NOERROR, ["10.244.1.20", "10.244.2.20"]),
        ("10-244-1-20.db.shop.svc.cluster.local", m.RType.A, m.Rcode.NOERROR, ["10.244.1.20"]),
        ("ext.shop.svc.cluster.local", m.RType.A, m.Rcode.NOERROR, ["192.0.2.7"]),
        ("10-1-2-3.any.pod.cluster.local", m.RType.A, m.Rcode.NOERROR, ["10.1.2.3"]),
        ("10-1-2-999.any.pod.cluster.local", m.RType.A, m.Rcode.NXDOMAIN, []),
        ("shop.svc.cluster.local", m.RType.A, m.Rcode.NOERROR, []),
        ("svc.cluster.local", m.RType.A, m.Rcode.NOERROR, []),
        ("cluster.local", m.RType.A, m.Rcode.NOERROR, []),
        ("nope.shop.svc.cluster.local", m.RType.A, m.Rcode.NXDOMAIN, []),
        ("web.nope.svc.cluster.local", m.RType.A, m.Rcode.NXDOMAIN, []),
        ("web.shop.svc.cluster.local.shop.svc.cluster.local", m.RType.A, m.Rcode.NXDOMAIN, []),
        ("istiod.istio-system.svc.svc.cluster.local", m.RType.A, m.Rcode.NXDOMAIN, []),
        ("example.com", m.RType.A, m.Rcode.REFUSED, []),
        ("cluster.local.example.com", m.RType.A, m.Rcode.REFUSED, []),
        ("xcluster.local", m.RType.A, m.Rcode.REFUSED, []),
        ("1.0.96.10.in-addr.arpa", m.RType.PTR, m.Rcode.REFUSED, []),
    ],
)
def test_answers(name: str, qtype: int, rcode: int, want: list[str]) -> None:
    got_rcode, records = answer(zone(), q(name, qtype))
    assert (got_rcode, ips(records)) == (rcode, want)
    # The owner is the name as asked (case kept), so the client matches it.
    assert all(r.labels == m.name_labels(name) for r in records)


def test_answers_refuse_other_classes() -> None:
    assert answer(zone(), q("web.shop.svc.cluster.local", qclass=3))[0] == m.Rcode.REFUSED


def _srv(record: m.Record) -> tuple[int, int, int, str]:
    prio, weight, port = struct.unpack_from("!HHH", record.rdata)
    labels, pos, rest = [], 6, record.rdata
    while rest[pos]:
        labels.append(rest[pos + 1 : pos + 1 + rest[pos]].decode())
        pos += rest[pos] + 1
    return prio, weight, port, ".".join(labels)


def test_srv_for_named_ports() -> None:
    rcode, records = answer(zone(), q("_http._tcp.web.shop.svc.cluster.local", m.RType.SRV))
    assert rcode == m.Rcode.NOERROR
    assert [_srv(r) for r in records] == [(0, 100, 80, "web.shop.svc.cluster.local")]
    rcode, records = answer(zone(), q("_pg._tcp.db.shop.svc.cluster.local", m.RType.SRV))
    assert sorted(_srv(r) for r in records) == [
        (0, 50, 9090, "10-244-1-20.db.shop.svc.cluster.local"),
        (0, 50, 9090, "10-244-2-20.db.shop.svc.cluster.local"),
    ]
    assert answer(zone(), q("_http._tcp.web.shop.svc.cluster.local"))[0] == m.Rcode.NOERROR
    assert answer(zone(), q("_tcp.web.shop.svc.cluster.local"))[0] == m.Rcode.NOERROR
    assert answer(zone(), q("_x._udp.web.shop.svc.cluster.local"))[0] == m.Rcode.NXDOMAIN


def test_headless_without_ready_pods_exists_with_no_address() -> None:
    services = [svc("a", "h", "None", {"app": "h"}, [{"port": 1}])]
    pods = [pod("a", "p", {"app": "h"}, "10.244.1.9", ready=False)]
    z = build_zone(D, services, [p for p in pods if p is not None])
    assert answer(z, q("h.a.svc.cluster.local")) == (m.Rcode.NOERROR, ())


def test_respond_builds_wire_answers_and_truncates_udp() -> None:
    data = m.build_query(7, m.name_labels("web.shop.svc.cluster.local"), m.RType.A)
    out = respond(zone(), data, udp=True)
    assert out is not None
    head = m.parse_response_head(out)
    assert head.id == 7 and head.rcode == m.Rcode.NOERROR and head.flags & m.AA
    assert m.answer_addresses(out, m.RType.A) == [IPv4Address("10.96.0.50")]
    refused = respond(zone(), m.build_query(8, m.name_labels("example.com"), m.RType.A), udp=True)
    assert refused is not None
    assert m.parse_response_head(refused).rcode == m.Rcode.REFUSED
    # A headless Service with many pods: over UDP the answer is cut (TC), over TCP whole.
    many = [
        pod("big", f"p{i}", {"app": "b"}, f"10.244.{i // 200 + 1}.{i % 200 + 2}") for i in range(60)
    ]
    z = build_zone(D, [svc("big", "b", "None", {"app": "b"}, [])], [p for p in many if p])
    data = m.build_query(9, m.name_labels("b.big.svc.cluster.local"), m.RType.A)
    cut = respond(z, data, udp=True)
    assert cut is not None and m.parse_response_head(cut).flags & m.TC
    whole = respond(z, data, udp=False)
    assert whole is not None and len(m.answer_addresses(whole, m.RType.A)) == 60


def test_respond_to_malformed_and_odd_messages() -> None:
    assert respond(zone(), b"\x00\x01", udp=True) is None  # no header: dropped
    formerr = respond(zone(), b"\x00\x05" + b"\x00" * 10 + b"\xff", udp=True)
    assert formerr is not None and m.parse_response_head(formerr).rcode == m.Rcode.FORMERR
    query = m.build_query(3, m.name_labels("web.shop.svc.cluster.local"), m.RType.A)
    as_answer = query[:2] + struct.pack("!H", m.QR) + query[4:]
    assert respond(zone(), as_answer, udp=True) is None  # never answer an answer
    notify = query[:2] + struct.pack("!H", 4 << m.OPCODE_SHIFT) + query[4:]
    out = respond(zone(), notify, udp=True)
    assert out is not None and m.parse_response_head(out).rcode == m.Rcode.NOTIMP


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_respond_never_raises(data: bytes) -> None:
    out = respond(zone(), data, udp=True)
    assert out is None or len(out) <= m.MAX_UDP_EDNS


@settings(deadline=None)
@given(st.binary(min_size=12, max_size=64))
def test_respond_to_mutated_queries_never_raises(tail: bytes) -> None:
    base = m.build_query(1, m.name_labels("web.shop.svc.cluster.local"), m.RType.A)
    for data in (base[:12] + tail, base + tail, base[: len(tail)] + tail):
        respond(zone(), data, udp=False)


def test_rate_limiter_buckets_per_source_and_bounded() -> None:
    rl = RateLimiter(rate=10.0, burst=3.0, max_sources=2)
    assert [rl.allow("a", 0.0) for _ in range(4)] == [True, True, True, False]
    assert rl.allow("b", 0.0)  # another source has its own bucket
    assert not rl.allow("a", 0.05)  # half a token back
    assert rl.allow("a", 0.2)
    rl.allow("c", 0.2)
    assert len(rl) == 2  # the least recently used ("b") went


# ---- the listeners, on loopback ------------------------------------------------------------


def _udp_query(port: int, data: bytes, timeout: float = 2.0) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(data, ("127.0.0.1", port))
        try:
            return s.recv(65535)
        except TimeoutError:
            return None


async def _serve(limits: DnsLimits) -> tuple[ClusterDns, int, int]:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(16)
    dns = ClusterDns(zone, limits)
    await dns.start(udp, tcp)
    return dns, udp.getsockname()[1], tcp.getsockname()[1]


def test_udp_and_tcp_listeners_answer_and_survive_garbage() -> None:
    asyncio.run(_test_udp_and_tcp_listeners_answer_and_survive_garbage())


async def _test_udp_and_tcp_listeners_answer_and_survive_garbage() -> None:
    dns, uport, tport = await _serve(DnsLimits())
    try:
        query = m.build_query(11, m.name_labels("web.shop.svc.cluster.local"), m.RType.A)
        out = await asyncio.to_thread(_udp_query, uport, query)
        assert out is not None and m.answer_addresses(out, m.RType.A) == [IPv4Address("10.96.0.50")]
        assert await asyncio.to_thread(_udp_query, uport, b"\x01", 0.3) is None
        formerr = await asyncio.to_thread(_udp_query, uport, b"\x00\x09\x01\x00" + b"\xff" * 40)
        assert formerr is not None and m.parse_response_head(formerr).rcode == m.Rcode.FORMERR
        r, w = await asyncio.open_connection("127.0.0.1", tport)
        for ident in (1, 2):
            qd = m.build_query(ident, m.name_labels("db.shop.svc.cluster.local"), m.RType.A)
            w.write(struct.pack("!H", len(qd)) + qd)
            (n,) = struct.unpack("!H", await r.readexactly(2))
            answer_bytes = await r.readexactly(n)
            assert m.parse_response_head(answer_bytes).id == ident
            assert len(m.answer_addresses(answer_bytes, m.RType.A)) == 2
        # A length beyond what a query needs: the connection ends, nothing is read.
        w.write(struct.pack("!H", 60000))
        assert await r.read() == b""
        w.close()
        out = await asyncio.to_thread(_udp_query, uport, query)
        assert out is not None  # still serving
    finally:
        await dns.close()


def test_rate_limit_drops_a_flood_from_one_source() -> None:
    asyncio.run(_test_rate_limit_drops_a_flood_from_one_source())


async def _test_rate_limit_drops_a_flood_from_one_source() -> None:
    dns, uport, _ = await _serve(DnsLimits(rate=0.001, burst=5))
    try:
        query = m.build_query(1, m.name_labels("web.shop.svc.cluster.local"), m.RType.A)
        got = [await asyncio.to_thread(_udp_query, uport, query, 0.3) for _ in range(7)]
        assert [g is not None for g in got] == [True] * 5 + [False] * 2
        assert dns.limited == 2
    finally:
        await dns.close()


def test_tcp_connection_cap() -> None:
    asyncio.run(_test_tcp_connection_cap())


async def _test_tcp_connection_cap() -> None:
    dns, _, tport = await _serve(DnsLimits(max_tcp_connections=2))
    try:
        held = [await asyncio.open_connection("127.0.0.1", tport) for _ in range(2)]
        await asyncio.sleep(0.1)
        r, w = await asyncio.open_connection("127.0.0.1", tport)
        assert await r.read() == b""  # closed at once
        w.close()
        for _, hw in held:
            hw.close()
    finally:
        await dns.close()
