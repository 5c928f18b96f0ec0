"""What a hostile pod may make its DNS proxy do: query floods (a rate per pod), oversized
TCP queries, and amplification (ANY, answers larger than the client's UDP size)."""

from __future__ import annotations

import asyncio
import struct

from meshcore.localtrust import TokenBucket
from tests.support.aio import run
from tests.ztunnel.dns.test_server import rcode, serving, tcp_ask, udp_ask
from ztunnel.dns import message as m
from ztunnel.dns.limits import DnsLimits


def test_the_token_bucket_allows_its_burst_then_its_rate() -> None:
    bucket = TokenBucket(rate_per_s=2.0, burst=3)
    assert [bucket.allow(10.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.allow(10.5)  # half a second: one token back
    assert not bucket.allow(10.5)
    assert [bucket.allow(100.0) for _ in range(4)] == [True, True, True, False]  # capped


def test_any_is_refused_and_never_forwarded() -> None:
    async def main() -> None:
        async with serving() as (p, upstream):
            query = m.build_query(7, m.name_labels("known.example.com"), m.RType.ANY)
            out = await udp_ask(p, query)
            assert out is not None and rcode(out) == m.Rcode.NOTIMP
            assert upstream.seen == []

    run(main)


def test_a_forwarded_answer_never_exceeds_the_clients_udp_size() -> None:
    async def main() -> None:
        async with serving() as (p, upstream):
            query = m.build_query(8, m.name_labels("big.example.com"), m.RType.A)
            out = await udp_ask(p, query)
            assert out is not None and len(out) <= m.MAX_UDP_PLAIN
            assert m.HEADER.unpack_from(out)[1] & m.TC  # the client retries over TCP
            (whole,) = await tcp_ask(p, query)
            assert len(whole) > m.MAX_UDP_PLAIN  # over TCP the whole answer comes back
            assert len(upstream.seen) == 2

    run(main)


def test_a_query_flood_is_cut_to_the_pods_rate_and_counted() -> None:
    limits = DnsLimits(max_queries_per_second=1, max_query_burst=5)

    async def main() -> None:
        async with serving(limits) as (p, _):
            query = m.build_query(9, (b"web",), m.RType.A)  # answered from the mesh state
            answers = await asyncio.gather(*(udp_ask(p, query, wait=0.5) for _ in range(40)))
            answered = [a for a in answers if a is not None]
            # The burst, and perhaps a token or two that came back meanwhile.
            assert 5 <= len(answered) < 20
            assert p.metrics.refused("rate", tcp=False) == 40 - len(answered)
            (refused,) = await tcp_ask(p, query)
            assert rcode(refused) == m.Rcode.REFUSED
            assert len(refused) <= len(query)  # a bare header: no amplification
            assert b'dns_queries_refused_total{reason="rate"' in p.metrics.render()

    run(main)


def test_an_oversized_tcp_query_closes_the_connection() -> None:
    async def main() -> None:
        async with serving() as (p, _):
            assert p.tcp_address is not None
            reader, writer = await asyncio.open_connection(*p.tcp_address)
            writer.write(struct.pack("!H", 65535) + b"\0" * 8192)
            try:
                rest = await reader.read()
            except ConnectionResetError:
                rest = b""  # closed with our bytes unread: the kernel resets
            assert rest == b""  # closed, nothing answered
            writer.close()
            assert p.metrics.refused("size", tcp=True) == 1
            good = await tcp_ask(p, m.build_query(10, (b"web",), m.RType.A))
            assert rcode(good[0]) == m.Rcode.NOERROR

    run(main)
