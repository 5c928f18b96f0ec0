"""CONNECT header parsing: the request checks of the HBONE server (meshcore.hbone.conn),
the tunnel's inbound authority (ztunnel.proxy.inbound) and the waypoint's
(waypoint.destination).

The input is header lines, `name: value`, in latin-1 as HPACK hands them on. Contract:
`malformed_request` and the waypoint's `parse_authority` never raise; the tunnel's
`parse_authority` raises ValueError only.
"""

from __future__ import annotations

import ipaddress

from meshcore.hbone.conn import Headers, malformed_request
from waypoint.destination import parse_authority as waypoint_authority
from ztunnel.proxy.inbound import parse_authority as tunnel_authority


def _headers(data: bytes) -> Headers:
    out: Headers = []
    for line in data.split(b"\n"):
        name, _, value = line.partition(b": ")
        out.append((name.decode("latin-1"), value.decode("latin-1")))
    return out


def test_one_input(data: bytes) -> None:
    headers = _headers(data)
    malformed_request(headers)
    for name, value in headers:
        if name != ":authority":
            continue
        try:
            addr = tunnel_authority(value)
        except ValueError:
            pass
        else:
            assert 0 < addr.port < 65536
        parsed = waypoint_authority(value)
        if parsed is not None:
            ipaddress.ip_address(parsed[0])  # a destination is always an address
            assert 1 <= parsed[1] <= 65535


def seeds() -> dict[str, bytes]:
    return {
        "connect-v4": b":method: CONNECT\n:authority: 10.0.0.2:8080\nbaggage: k=v",
        "connect-v6": b":method: CONNECT\n:authority: [fd00::2]:80\n:scheme: https",
        "not-connect": b":method: GET\n:path: /\n:authority: example.com:443\nte: trailers",
    }
