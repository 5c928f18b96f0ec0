"""Inbound HBONE: the answer to a CONNECT, as a table (no sockets).

`decide(workload, headers, peer, client, authorize)` checks the request in order: the
method, the authority, that it names this pod, that it is not a tunnel port, and then
asks the authorizer. Each row expects the whole frozen decision; the authorizer here is a
recording one, so a row also says whether (and with what) authorization was asked.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from meshcore.hbone.conn import Headers
from meshcore.identity.spiffe import SpiffeId
from meshcore.policy.model import Action
from meshcore.policy.verdict import ALLOW_ALL, Verdict
from meshcore.sockets import SocketAddr
from meshcore.state import Workload
from tests.support.mesh import addr, ips, workload
from ztunnel.proxy.common import allow_all
from ztunnel.proxy.inbound import InboundDecision, decide, parse_authority

SERVER = workload(
    name="web-0", namespace="shop", service_account="web", ips=ips("10.244.2.20", "fd00:244::20")
)
CLIENT_ID = SpiffeId("cluster.local", "shop", "client")
CLIENT = addr("10.244.1.10:40000")


def connect(authority: str | None, method: str | None = "CONNECT") -> Headers:
    headers: Headers = []
    if method is not None:
        headers.append((":method", method))
    if authority is not None:
        headers.append((":authority", authority))
    # What our client sends besides; decide must not care.
    headers += [
        ("baggage", "k8s.namespace.name=shop"),
        ("traceparent", "00-" + "1" * 32 + "-" + "2" * 16 + "-00"),
    ]
    return headers


DENIED = Verdict(
    False, "shop/deny-all", 0, Action.DENY, "denied by DENY policy shop/deny-all rule 0"
)


@dataclass
class Authorizer:
    """Answers with `verdict`; records each question."""

    verdict: Verdict = ALLOW_ALL
    asked: list[tuple[str, SpiffeId | None, SocketAddr, SocketAddr]] = field(default_factory=list)

    def __call__(
        self, w: Workload, peer: SpiffeId | None, client: SocketAddr, target: SocketAddr
    ) -> Verdict:
        self.asked.append((w.name, peer, client, target))
        return self.verdict


def ok(target: str) -> InboundDecision:
    return InboundDecision(200, addr(target), "allowed", ALLOW_ALL)


def bad(reason: str, target: str | None = None) -> InboundDecision:
    return InboundDecision(400, addr(target) if target else None, reason)


CASES = [
    # -- allowed
    pytest.param(
        connect("10.244.2.20:8080"),
        ALLOW_ALL,
        ok("10.244.2.20:8080"),
        id="CONNECT to this pod: 200",
    ),
    pytest.param(
        connect("[fd00:244::20]:8080"),
        ALLOW_ALL,
        ok("[fd00:244::20]:8080"),
        id="IPv6 authority: 200",
    ),
    pytest.param(
        connect("10.244.2.20:15021"),
        ALLOW_ALL,
        ok("10.244.2.20:15021"),
        id="a port outside 15001/15006/15008: 200",
    ),
    pytest.param(connect("10.244.2.20:1"), ALLOW_ALL, ok("10.244.2.20:1"), id="lowest port: 200"),
    pytest.param(
        connect("10.244.2.20:65535"), ALLOW_ALL, ok("10.244.2.20:65535"), id="highest port: 200"
    ),
    # -- the request itself: 400
    pytest.param(
        connect("10.244.2.20:8080", method="GET"),
        ALLOW_ALL,
        bad("method 'GET' is not CONNECT"),
        id="GET: 400",
    ),
    pytest.param(
        connect("10.244.2.20:8080", method=None),
        ALLOW_ALL,
        bad("method None is not CONNECT"),
        id="no method: 400",
    ),
    pytest.param(
        connect("not an address", method="POST"),
        ALLOW_ALL,
        bad("method 'POST' is not CONNECT"),
        id="bad method and bad authority: the method is named",
    ),
    pytest.param(
        connect(None), ALLOW_ALL, bad("authority '' is not ip:port"), id="no authority: 400"
    ),
    pytest.param(
        connect("10.244.2.20"),
        ALLOW_ALL,
        bad("authority '10.244.2.20' is not ip:port"),
        id="no port: 400",
    ),
    pytest.param(
        connect("10.244.2.20:"),
        ALLOW_ALL,
        bad("authority '10.244.2.20:' is not ip:port"),
        id="empty port: 400",
    ),
    pytest.param(
        connect("10.244.2.20:+80"),
        ALLOW_ALL,
        bad("authority '10.244.2.20:+80' is not ip:port"),
        id="signed port: 400",
    ),
    pytest.param(
        connect("10.244.2.20:0"),
        ALLOW_ALL,
        bad("authority '10.244.2.20:0' has an invalid port"),
        id="port 0: 400",
    ),
    pytest.param(
        connect("10.244.2.20:65536"),
        ALLOW_ALL,
        bad("authority '10.244.2.20:65536' has an invalid port"),
        id="port 65536: 400",
    ),
    pytest.param(
        connect("web.shop.svc.cluster.local:8080"),
        ALLOW_ALL,
        bad("'web.shop.svc.cluster.local' does not appear to be an IPv4 or IPv6 address"),
        id="a host name: 400 (HBONE targets an address)",
    ),
    pytest.param(
        connect("[fd00:244::20]8080"),
        ALLOW_ALL,
        bad("authority '[fd00:244::20]8080' is not ip:port"),
        id="IPv6 without the colon before the port: 400",
    ),
    pytest.param(
        connect("fd00:244::20:8080"),
        ALLOW_ALL,
        bad("authority 'fd00:244::20:8080' is not ip:port"),
        id="IPv6 without brackets: 400 (ambiguous; upstream refuses it too)",
    ),
    pytest.param(
        connect("[10.244.2.20]:8080"),
        ALLOW_ALL,
        bad("authority '[10.244.2.20]:8080' is not ip:port"),
        id="IPv4 in brackets: 400",
    ),
    pytest.param(
        connect("10.244.2.20:\uff18\uff10"),
        ALLOW_ALL,
        bad("authority '10.244.2.20:\uff18\uff10' is not ip:port"),
        id="a port in non-ASCII digits: 400",
    ),
    # -- not this pod: 400
    pytest.param(
        connect("10.244.2.21:8080"),
        ALLOW_ALL,
        bad("target 10.244.2.21 is not this pod (web-0)", "10.244.2.21:8080"),
        id="another pod's IP: 400",
    ),
    pytest.param(
        connect("10.244.2.21:15008"),
        ALLOW_ALL,
        bad("target 10.244.2.21 is not this pod (web-0)", "10.244.2.21:15008"),
        id="another pod's tunnel port: 400, the address is checked first",
    ),
    # -- a tunnel port: 503 (a self-call)
    pytest.param(
        connect("10.244.2.20:15008"),
        ALLOW_ALL,
        InboundDecision(503, addr("10.244.2.20:15008"), "port 15008 is the tunnel's own"),
        id="port 15008: 503",
    ),
    pytest.param(
        connect("10.244.2.20:15006"),
        ALLOW_ALL,
        InboundDecision(503, addr("10.244.2.20:15006"), "port 15006 is the tunnel's own"),
        id="port 15006: 503",
    ),
    pytest.param(
        connect("[fd00:244::20]:15001"),
        ALLOW_ALL,
        InboundDecision(503, addr("[fd00:244::20]:15001"), "port 15001 is the tunnel's own"),
        id="IPv6, port 15001: 503",
    ),
    # -- authorization: 401
    pytest.param(
        connect("10.244.2.20:8080"),
        DENIED,
        InboundDecision(401, addr("10.244.2.20:8080"), DENIED.reason, DENIED),
        id="denied: 401 with the verdict and its reason",
    ),
]


@pytest.mark.parametrize(("headers", "verdict", "expected"), CASES)
def test_decide(headers: Headers, verdict: Verdict, expected: InboundDecision) -> None:
    authorize = Authorizer(verdict)
    got = decide(SERVER, headers, CLIENT_ID, CLIENT, authorize)
    assert got == expected
    # Authorization is asked exactly when the request itself is sound.
    if expected.status in (200, 401):
        assert authorize.asked == [("web-0", CLIENT_ID, CLIENT, expected.target)]
    else:
        assert authorize.asked == []


def test_a_plaintext_peer_reaches_the_authorizer_without_identity() -> None:
    authorize = Authorizer()
    decide(SERVER, connect("10.244.2.20:8080"), None, CLIENT, authorize)
    assert authorize.asked == [("web-0", None, CLIENT, addr("10.244.2.20:8080"))]


def test_without_an_authorizer_everything_sound_is_allowed() -> None:
    assert decide(SERVER, connect("10.244.2.20:8080"), None, CLIENT) == ok("10.244.2.20:8080")
    assert allow_all(SERVER, None, CLIENT, addr("10.244.2.20:8080")) is ALLOW_ALL


@pytest.mark.parametrize(
    ("authority", "expected"),
    [
        pytest.param("10.1.2.3:80", "10.1.2.3:80", id="IPv4"),
        pytest.param("[fd00::1]:443", "[fd00::1]:443", id="IPv6 in brackets"),
        pytest.param("[::ffff:10.1.2.3]:80", "[::ffff:10.1.2.3]:80", id="IPv4-mapped IPv6"),
    ],
)
def test_parse_authority(authority: str, expected: str) -> None:
    assert parse_authority(authority) == addr(expected)


def test_an_authority_that_repeats_shares_one_address_object() -> None:
    """A tunnel keeps the target of every open connection: the same pod address on
    thousands of them is one object (memory per open connection), equal to a fresh one,
    and another port or IP is another object."""
    first = parse_authority("10.1.2.3:80")
    assert parse_authority("10.1.2.3:80") is first
    assert first == SocketAddr(first.ip, 80)
    assert parse_authority("10.1.2.3:81") is not first
    assert parse_authority("10.1.2.4:80") != first
