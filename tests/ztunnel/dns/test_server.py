"""The DNS proxy on loopback (no netns): answers, forwarding, relaying and its bounds.

The upstream resolver is a small server in this process on another loopback port; it
answers `known.example.com` with 192.0.2.1, stays silent for `silent.example.com` and says
NXDOMAIN to anything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshcore.sockets import PlainSocketFactory
from meshcore.state import MeshState, NetworkAddress
from tests.support.aio import run
from tests.support.mesh import service, workload
from ztunnel.dns import message as m
from ztunnel.dns.metrics import REQUESTS, UPSTREAM_FAILURES, UPSTREAM_REQUESTS
from ztunnel.dns.server import DnsLimits, DnsProxy, ForwardError

CLIENT = workload(name="client", namespace="ns1")
STATE = MeshState.build(
    [CLIENT],
    [
        service(
            name="web",
            namespace="ns1",
            vips=(NetworkAddress("", ipaddress.ip_address("10.96.0.9")),),
        )
    ],
    [],
)


class Upstream(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.seen: list[bytes] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a datagram endpoint's

    def reply(self, data: bytes) -> bytes | None:
        self.seen.append(data)
        q = m.parse_query(data)
        if q.question.name == "silent.example.com":
            return None
        if q.question.name == "big.example.com":  # ignores the client's UDP size
            recs = tuple(
                m.a(q.question.labels, ipaddress.IPv4Address(f"192.0.2.{i}"), 60)
                for i in range(1, 61)
            )
            return m.build_response(q, m.Rcode.NOERROR, recs, authoritative=False)
        if q.question.name == "known.example.com":
            rec = m.a(q.question.labels, ipaddress.IPv4Address("192.0.2.1"), 60)
            return m.build_response(q, m.Rcode.NOERROR, (rec,), authoritative=False)
        return m.build_response(q, m.Rcode.NXDOMAIN, authoritative=False)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        out = self.reply(data)
        if out is not None and self.transport is not None:
            self.transport.sendto(out, addr)


@contextlib.asynccontextmanager
async def serving(limits: DnsLimits | None = None) -> AsyncIterator[tuple[DnsProxy, Upstream]]:
    loop = asyncio.get_running_loop()
    upstream = Upstream()

    async def tcp_upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        size = int.from_bytes(await reader.readexactly(2), "big")
        out = upstream.reply(await reader.readexactly(size))
        if out is not None:
            writer.write(struct.pack("!H", len(out)) + out)
            await writer.drain()
        writer.close()

    # TCP first on any free port, then UDP on the same number (rarely taken: try again).
    for _ in range(20):
        tcp = await asyncio.start_server(tcp_upstream, "127.0.0.1", 0)
        port = tcp.sockets[0].getsockname()[1]
        try:
            udp, _ = await loop.create_datagram_endpoint(
                lambda: upstream, local_addr=("127.0.0.1", port)
            )
            break
        except OSError:
            tcp.close()
    else:
        raise AssertionError("no port free for both UDP and TCP")
    limits = limits or DnsLimits(
        max_in_flight=2, attempt_timeout=0.3, forward_timeout=0.5, max_tcp_connections=2
    )
    p = DnsProxy(
        lambda: CLIENT,
        lambda: STATE,
        PlainSocketFactory(),
        (ipaddress.ip_address("127.0.0.1"),),
        limits,
        upstream_port=port,
    )
    await p.start("127.0.0.1", 0)
    try:
        yield p, upstream
    finally:
        await p.close()
        udp.close()
        tcp.close()


Body = Callable[[tuple[DnsProxy, Upstream]], Awaitable[None]]


def scenario(body: Body) -> Callable[[], None]:
    """A test that runs `body` against a fresh proxy and upstream."""

    def test() -> None:
        async def main() -> None:
            async with serving() as both:
                await body(both)

        run(main)

    # Not functools.wraps: pytest would read the body's parameter as a fixture.
    test.__name__, test.__doc__ = body.__name__, body.__doc__
    return test


async def udp_ask(p: DnsProxy, data: bytes, wait: float = 2.0) -> bytes | None:
    loop = asyncio.get_running_loop()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setblocking(False)
    try:
        assert p.udp_address is not None
        await loop.sock_connect(s, p.udp_address)
        await loop.sock_sendall(s, data)
        try:
            async with asyncio.timeout(wait):
                return await loop.sock_recv(s, 65535)
        except TimeoutError:
            return None
    finally:
        s.close()


async def tcp_ask(p: DnsProxy, *queries: bytes) -> list[bytes]:
    assert p.tcp_address is not None
    reader, writer = await asyncio.open_connection(*p.tcp_address)
    out = []
    for q in queries:
        writer.write(struct.pack("!H", len(q)) + q)
        size = int.from_bytes(await reader.readexactly(2), "big")
        out.append(await reader.readexactly(size))
    writer.close()
    return out


def rcode(data: bytes) -> int:
    return int(m.HEADER.unpack_from(data)[1]) & m.RCODE_MASK


@scenario
async def test_service_answered_without_upstream(proxy: tuple[DnsProxy, Upstream]) -> None:
    p, upstream = proxy
    out = await udp_ask(p, m.build_query(11, (b"web",), m.RType.A))
    assert out is not None and rcode(out) == m.Rcode.NOERROR
    assert m.HEADER.unpack_from(out)[0] == 11 and out.endswith(
        ipaddress.ip_address("10.96.0.9").packed
    )
    aaaa = await udp_ask(p, m.build_query(12, (b"web",), m.RType.AAAA))
    assert aaaa is not None and rcode(aaaa) == 0 and m.HEADER.unpack_from(aaaa)[3] == 0
    assert upstream.seen == []


@scenario
async def test_unknown_name_forwarded_and_relayed(proxy: tuple[DnsProxy, Upstream]) -> None:
    p, upstream = proxy
    query = m.build_query(0x4242, m.name_labels("known.example.com"), m.RType.A)
    out = await udp_ask(p, query)
    assert out is not None and m.HEADER.unpack_from(out)[0] == 0x4242  # the client's ID back
    assert out.endswith(ipaddress.ip_address("192.0.2.1").packed)
    # Upstream saw the query with an ID of ours, the rest as the client sent it.
    assert len(upstream.seen) == 1 and upstream.seen[0][2:] == query[2:]
    nx = await udp_ask(p, m.build_query(5, m.name_labels("nope.example.com"), m.RType.A))
    assert nx is not None and rcode(nx) == m.Rcode.NXDOMAIN


@scenario
async def test_metrics_count_requests_forwards_and_failures(
    proxy: tuple[DnsProxy, Upstream],
) -> None:
    p, _ = proxy
    await udp_ask(p, m.build_query(1, (b"web",), m.RType.A))
    await udp_ask(p, m.build_query(2, m.name_labels("known.example.com"), m.RType.A))
    await udp_ask(p, m.build_query(3, m.name_labels("silent.example.com"), m.RType.A))
    await tcp_ask(p, m.build_query(4, m.name_labels("x.example.com"), m.RType.MX))
    who = (CLIENT.canonical_name, CLIENT.canonical_revision)
    udp_a = ("a", "udp", *who)
    assert p.metrics.count(REQUESTS, udp_a) == 3
    assert p.metrics.count(UPSTREAM_REQUESTS, udp_a) == 2
    assert p.metrics.count(UPSTREAM_FAILURES, udp_a) == 1
    assert p.metrics.count(UPSTREAM_REQUESTS, ("mx", "tcp", *who)) == 1
    text = p.metrics.render().decode()
    assert (
        'istio_dns_requests_total{request_protocol="udp",request_query_type="a",'
        f'source_canonical_revision="{who[1]}",source_canonical_service="{who[0]}"}} 3'
    ) in text


@scenario
async def test_tcp_answers_and_forwards(proxy: tuple[DnsProxy, Upstream]) -> None:
    p, _ = proxy
    local, remote = await tcp_ask(
        p,
        m.build_query(1, (b"web", b"ns1"), m.RType.A),
        m.build_query(2, m.name_labels("known.example.com"), m.RType.A),
    )
    assert rcode(local) == 0 and local.endswith(ipaddress.ip_address("10.96.0.9").packed)
    assert m.HEADER.unpack_from(remote)[0] == 2 and remote.endswith(
        ipaddress.ip_address("192.0.2.1").packed
    )


@scenario
async def test_silent_upstream_is_servfail(
    proxy: tuple[DnsProxy, Upstream],
) -> None:
    p, _ = proxy
    out = await udp_ask(p, m.build_query(3, m.name_labels("silent.example.com"), m.RType.A))
    assert out is not None and rcode(out) == m.Rcode.SERVFAIL
    assert p.in_flight == 0


@scenario
async def test_malformed_queries(proxy: tuple[DnsProxy, Upstream]) -> None:
    p, upstream = proxy
    bad = m.HEADER.pack(77, 0, 2, 0, 0, 0) + b"\x03abc"
    out = await udp_ask(p, bad)
    assert out is not None and rcode(out) == m.Rcode.FORMERR and m.HEADER.unpack_from(out)[0] == 77
    assert await udp_ask(p, b"\x01\x02\x03", wait=0.3) is None  # no header: dropped
    notimp = bytearray(m.build_query(8, (b"web",), m.RType.A))
    notimp[2] |= 2 << 3  # opcode STATUS
    out = await udp_ask(p, bytes(notimp))
    assert out is not None and rcode(out) == m.Rcode.NOTIMP
    # Still serving.
    ok = await udp_ask(p, m.build_query(9, (b"web",), m.RType.A))
    assert ok is not None and rcode(ok) == 0
    assert upstream.seen == []


@scenario
async def test_forwards_in_flight_are_bounded(proxy: tuple[DnsProxy, Upstream]) -> None:
    p, upstream = proxy
    silent = m.build_query(1, m.name_labels("silent.example.com"), m.RType.A)
    results = await asyncio.gather(*(udp_ask(p, silent, wait=1.5) for _ in range(5)))
    # Two are forwarded (and time out: SERVFAIL); the others are dropped.
    assert sum(r is not None for r in results) == 2
    assert p.dropped == 3 and len(upstream.seen) == 2 and p.in_flight == 0


@scenario
async def test_tcp_connections_are_bounded(proxy: tuple[DnsProxy, Upstream]) -> None:
    p, _ = proxy
    assert p.tcp_address is not None
    held = [await asyncio.open_connection(*p.tcp_address) for _ in range(2)]
    await asyncio.sleep(0.05)
    reader, writer = await asyncio.open_connection(*p.tcp_address)
    assert await reader.read() == b""  # closed at once
    writer.close()
    for _, w in held:
        w.close()


@scenario
async def test_lookup_for_connections_by_name(proxy: tuple[DnsProxy, Upstream]) -> None:
    p, _ = proxy
    assert await p.lookup("known.example.com") == ipaddress.ip_address("192.0.2.1")
    for host, why in (("nope.example.com", "NXDOMAIN"), ("bad..name", "not a DNS name")):
        with pytest.raises(ForwardError, match=why):
            await p.lookup(host)


NO_UPSTREAM = DnsProxy(lambda: CLIENT, lambda: STATE, PlainSocketFactory(), ())


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=700), st.booleans())
def test_any_bytes_get_an_answer_or_nothing(data: bytes, tcp: bool) -> None:
    """Whatever arrives, the proxy answers a well-formed message or nothing, never raises
    (nothing is forwarded here: with no upstream a forward is SERVFAIL at once)."""
    out = asyncio.run(NO_UPSTREAM.answer(data, tcp))
    if out is None:
        return
    head = m.parse_response_head(out)
    assert head.id == int.from_bytes(data[:2], "big")
    assert len(out) <= (m.MAX_MESSAGE if tcp else m.MAX_UDP_EDNS)
    assert NO_UPSTREAM.in_flight == 0
