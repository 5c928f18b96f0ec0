"""What the waypoint reads from a CONNECT's own headers (the client's address, the tunnel's
trace context): read once per stream, the same answer for every request it carries."""

from __future__ import annotations

import ipaddress

import pytest

from meshcore.identity.spiffe import SpiffeId
from meshcore.sockets import SocketAddr
from waypoint.destination import Destination, L7Protocol
from waypoint.server import Inbound

PEER = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/client")
TUNNEL = SocketAddr(ipaddress.ip_address("10.0.0.2"), 40000)
TRACE = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"


def inbound(headers: list[tuple[str, str]]) -> Inbound:
    dest = Destination("10.96.0.10", 80, None, None, L7Protocol.HTTP)
    return Inbound(PEER, TUNNEL, dest, headers)


@pytest.mark.parametrize(
    ("forwarded", "ip", "addr"),
    [
        ('for="10.1.2.3:5555"', "10.1.2.3", ipaddress.ip_address("10.1.2.3")),
        ('for="[fd00::7]:5555"', "fd00::7", ipaddress.ip_address("fd00::7")),
        ("proto=http;for=10.1.2.4", "10.1.2.4", ipaddress.ip_address("10.1.2.4")),
        ('for="unknown"', "unknown", None),
        (None, "10.0.0.2", ipaddress.ip_address("10.0.0.2")),
    ],
    ids=["v4 with port", "v6 with port", "no quotes, other keys", "not an address", "absent"],
)
def test_the_clients_address(forwarded: str | None, ip: str, addr: object) -> None:
    inb = inbound([("forwarded", forwarded)] if forwarded is not None else [])
    assert inb.source_ip == ip
    assert inb.source_addr == addr


def test_read_once_for_every_request_of_the_stream() -> None:
    headers = [("forwarded", 'for="10.1.2.3:1"'), ("traceparent", TRACE)]
    inb = inbound(headers)
    first = (inb.source_ip, inb.source_addr, inb.trace_parent)
    headers.clear()  # the answers were taken when first asked, not again
    assert (inb.source_ip, inb.source_addr, inb.trace_parent) == first
    assert first[2] is not None and first[2].trace_id.hex() == "ab" * 16


@pytest.mark.parametrize("value", [None, "00-bad", "ff-" + "ab" * 16 + "-" + "cd" * 8 + "-01"])
def test_no_trace_context_without_a_valid_traceparent(value: str | None) -> None:
    inb = inbound([("traceparent", value)] if value is not None else [])
    assert inb.trace_parent is None
    assert inb.trace_parent is None  # asked again: still parsed once, still None
