"""The tunnel's DNS codec (ztunnel.dns.message): a pod's query as the DNS proxy parses it,
the answer built for it, and an upstream's answer as the proxy reads it back.

Contract: the parsers raise DnsFormatError and nothing else; an answer to a parsed query
is built, fits the client's limit and parses as that query's answer.
"""

from __future__ import annotations

import ipaddress

from ztunnel.dns.message import (
    QR,
    DnsFormatError,
    Rcode,
    RType,
    a,
    aaaa,
    answer_addresses,
    build_error,
    build_query,
    build_response,
    cname,
    name_labels,
    parse_header_id,
    parse_query,
    parse_response_head,
)

_V4 = ipaddress.IPv4Address("10.96.0.11")
_V6 = ipaddress.IPv6Address("fd00::11")


def _answer(data: bytes) -> None:
    try:
        query = parse_query(data)
    except DnsFormatError:
        build_error(data, Rcode.FORMERR)
        return
    labels = query.question.labels
    records = (
        cname(labels, (b"flights", b"travel"), 30),
        a(labels, _V4, 30),
        aaaa(labels, _V6, 30),
    )
    answer = build_response(query, Rcode.NOERROR, records, limit=query.udp_limit())
    assert len(answer) <= query.udp_limit()
    assert parse_response_head(answer).id == query.id


def test_one_input(data: bytes) -> None:
    parse_header_id(data)
    _answer(data)
    if len(data) >= 3 and data[2] & (QR >> 8):
        try:
            parse_response_head(data)
            answer_addresses(data, RType.A)
            answer_addresses(data, RType.AAAA)
        except DnsFormatError:
            pass


def seeds() -> dict[str, bytes]:
    name = name_labels("flights.travel.svc.cluster.local")
    query = build_query(0x1234, name, RType.A)
    # The same query with an EDNS OPT record (UDP size 4096), as dig sends it.
    edns = query[:10] + b"\x00\x01" + query[12:] + b"\x00\x00\x29\x10\x00\x00\x00\x00\x00\x00\x00"
    answer = build_response(
        parse_query(query), Rcode.NOERROR, (cname(name, (b"f", b"travel"), 5), a(name, _V4, 5))
    )
    return {
        "query-a": query,
        "query-aaaa": build_query(7, name, RType.AAAA, rd=False),
        "query-edns": edns,
        "answer": answer,
    }
