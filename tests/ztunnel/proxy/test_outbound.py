"""Outbound: the routing decision and the CONNECT request, as tables (no sockets).

`decide(state, source, dst)` is what a captured connection becomes; each row is one
situation upstream ztunnel's outbound `build_request` tests cover, with the whole frozen
decision expected. `choose` picks the first candidate, so a row is deterministic; which
candidates it is offered is checked on its own.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace

import pytest

from meshcore.identity.spiffe import SpiffeId
from meshcore.sockets import SocketAddr
from meshcore.state import (
    HealthStatus,
    MeshState,
    Service,
    Workload,
)
from tests.support.mesh import (
    CLIENT_POD,
    LEGACY_POD,
    LEGACY_SERVICE,
    WEB_SERVICE,
    addr,
    ips,
    mesh_state,
    ports,
    serves,
    service,
    vips,
    web_pod,
)
from ztunnel.proxy.outbound import OutboundDecision, Route, connect_headers, decide

CLIENT = CLIENT_POD
WEB = replace(WEB_SERVICE, ports=ports({80: 8080, 443: 8443}))


WEB_0 = web_pod("web-0", "10.244.2.20")
WEB_1 = web_pod("web-1", "10.244.2.21")
SICK_0 = replace(WEB_0, status=HealthStatus.UNHEALTHY)
NO_IP_0 = web_pod("web-0")
OWN_PORT_0 = web_pod("web-0", "10.244.2.20", services=serves((WEB, {80: 9090})))
EXTRA_PORT_0 = web_pod("web-0", "10.244.2.20", services=serves((WEB, {8000: 9000})))
LEGACY_SVC, LEGACY_0 = LEGACY_SERVICE, LEGACY_POD
CANARY = SpiffeId("cluster.local", "shop", "web-canary")
WEB_SANS = replace(WEB, subject_alt_names=(str(CANARY), "web.shop.svc.cluster.local"))
WEB6 = service(name="web6", namespace="shop", vips=vips("fd00:96::20"), ports=ports({80: 8080}))
WEB6_0 = web_pod("web6-0", "fd00:244::20", services=serves((WEB6, {})))
DUAL = service(
    name="dual", namespace="shop", vips=vips("10.96.0.40", "fd00:96::40"), ports=ports({80: 8080})
)
DUAL_0 = web_pod("dual-0", "10.244.2.40", "fd00:244::40", services=serves((DUAL, {})))
WEB_NET2 = replace(WEB, vips=vips("10.96.0.20", network="net2"))
CLIENT_NET2 = replace(CLIENT, network="net2")


def hbone(
    w: Workload,
    port: int,
    svc: Service | None = None,
    sans: frozenset[SpiffeId] = frozenset(),
    ip: str | None = None,
) -> OutboundDecision:
    """HBONE to `w` (at its first IP unless `ip` says which) on `port`."""
    target = SocketAddr(ips(ip)[0] if ip else w.ips[0], port)
    return OutboundDecision(
        Route.HBONE,
        target,
        next_hop=SocketAddr(target.ip, 15008),
        expected_identities=frozenset({w.identity}) | sans,
        destination=w,
        service=svc,
        reason="destination is in the mesh",
    )


def passthrough(
    target: str, w: Workload | None = None, svc: Service | None = None
) -> OutboundDecision:
    reason = (
        "destination is not a known workload"
        if w is None
        else "destination workload does not speak HBONE"
    )
    return OutboundDecision(
        Route.PASSTHROUGH,
        addr(target),
        next_hop=addr(target),
        destination=w,
        service=svc,
        reason=reason,
    )


def refuse(dst: str, reason: str, svc: Service | None = None) -> OutboundDecision:
    return OutboundDecision(Route.REFUSE, addr(dst), service=svc, reason=reason)


def case(
    id: str,
    dst: str,
    expected: OutboundDecision,
    workloads: tuple[Workload, ...] = (WEB_0,),
    services: tuple[Service, ...] = (WEB,),
    source: Workload = CLIENT,
) -> object:
    return pytest.param(source, workloads, services, dst, expected, id=id)


CASES = [
    # -- to a pod IP
    case("pod IP in the mesh: HBONE to its 15008", "10.244.2.20:8080", hbone(WEB_0, 8080)),
    case(
        "pod IP on a port no service declares: HBONE, same port",
        "10.244.2.20:9999",
        hbone(WEB_0, 9999),
    ),
    case(
        "pod IP of a service endpoint: no service, so no service SANs",
        "10.244.2.20:8080",
        hbone(WEB_0, 8080),
        services=(WEB_SANS,),
    ),
    case(
        "pod IP of an unhealthy workload: still HBONE (health only picks endpoints)",
        "10.244.2.20:8080",
        hbone(SICK_0, 8080),
        workloads=(SICK_0,),
    ),
    case(
        "pod IP of a non-mesh workload: PASSTHROUGH to it",
        "10.244.3.30:8080",
        passthrough("10.244.3.30:8080", LEGACY_0),
        workloads=(LEGACY_0,),
        services=(LEGACY_SVC,),
    ),
    case(
        "unknown IP: PASSTHROUGH, no destination",
        "93.184.216.34:443",
        passthrough("93.184.216.34:443"),
    ),
    case(
        "IPv6 pod IP: HBONE to [v6]:15008",
        "[fd00:244::20]:8080",
        hbone(WEB6_0, 8080),
        workloads=(WEB6_0,),
        services=(WEB6,),
    ),
    case(
        "a dual-stack pod's second IP: that IP",
        "[fd00:244::40]:8080",
        hbone(DUAL_0, 8080, ip="fd00:244::40"),
        workloads=(DUAL_0,),
        services=(DUAL,),
    ),
    # -- to a service VIP
    case(
        "service VIP: an endpoint, at the service's target port",
        "10.96.0.20:80",
        hbone(WEB_0, 8080, WEB),
    ),
    case("service VIP, second port", "10.96.0.20:443", hbone(WEB_0, 8443, WEB)),
    case(
        "service VIP on a port it does not declare: REFUSE",
        "10.96.0.20:8080",
        refuse("10.96.0.20:8080", "web.shop.svc.cluster.local has no port 8080", WEB),
    ),
    case(
        "service without endpoints: REFUSE",
        "10.96.0.20:80",
        refuse("10.96.0.20:80", "web.shop.svc.cluster.local has no healthy endpoints", WEB),
        workloads=(),
    ),
    case(
        "only unhealthy endpoints: REFUSE",
        "10.96.0.20:80",
        refuse("10.96.0.20:80", "web.shop.svc.cluster.local has no healthy endpoints", WEB),
        workloads=(SICK_0,),
    ),
    case(
        "an unhealthy endpoint is never chosen",
        "10.96.0.20:80",
        hbone(WEB_1, 8080, WEB),
        workloads=(SICK_0, WEB_1),
    ),
    case(
        "an endpoint without an IP is never chosen",
        "10.96.0.20:80",
        hbone(WEB_1, 8080, WEB),
        workloads=(NO_IP_0, WEB_1),
    ),
    case(
        "the endpoint's own target port wins over the service's",
        "10.96.0.20:80",
        hbone(OWN_PORT_0, 9090, WEB),
        workloads=(OWN_PORT_0,),
    ),
    case(
        "a port only the endpoint maps: HBONE to its target",
        "10.96.0.20:8000",
        hbone(EXTRA_PORT_0, 9000, WEB),
        workloads=(EXTRA_PORT_0,),
    ),
    case(
        "service of non-mesh endpoints: PASSTHROUGH to the endpoint",
        "10.96.0.30:80",
        passthrough("10.244.3.30:8080", LEGACY_0, LEGACY_SVC),
        workloads=(LEGACY_0,),
        services=(LEGACY_SVC,),
    ),
    case(
        "service SANs join the expected identities (SPIFFE ones only)",
        "10.96.0.20:80",
        hbone(WEB_0, 8080, WEB_SANS, sans=frozenset({CANARY})),
        services=(WEB_SANS,),
    ),
    case(
        "IPv6 service VIP: the endpoint's IPv6 address",
        "[fd00:96::20]:80",
        hbone(WEB6_0, 8080, WEB6),
        workloads=(WEB6_0,),
        services=(WEB6,),
    ),
    case(
        "dual-stack endpoint behind the IPv4 VIP: its IPv4 address",
        "10.96.0.40:80",
        hbone(DUAL_0, 8080, DUAL, ip="10.244.2.40"),
        workloads=(DUAL_0,),
        services=(DUAL,),
    ),
    case(
        "dual-stack endpoint behind the IPv6 VIP: its IPv6 address, as upstream",
        "[fd00:96::40]:80",
        hbone(DUAL_0, 8080, DUAL, ip="fd00:244::40"),
        workloads=(DUAL_0,),
        services=(DUAL,),
    ),
    # -- networks
    case(
        "a VIP on another network is not a service here: PASSTHROUGH",
        "10.96.0.20:80",
        passthrough("10.96.0.20:80"),
        services=(WEB_NET2,),
    ),
    case(
        "from another network the pod's IP is someone else's: PASSTHROUGH",
        "10.244.2.20:8080",
        passthrough("10.244.2.20:8080"),
        source=CLIENT_NET2,
    ),
    # -- the tunnel's own ports: a self-call
    case(
        "pod IP, port 15008: REFUSE",
        "10.244.2.20:15008",
        refuse("10.244.2.20:15008", "port 15008 is the tunnel's own"),
    ),
    case(
        "pod IP, port 15001: REFUSE",
        "10.244.2.20:15001",
        refuse("10.244.2.20:15001", "port 15001 is the tunnel's own"),
    ),
    case(
        "service VIP, port 15006: REFUSE before any service lookup",
        "10.96.0.20:15006",
        refuse("10.96.0.20:15006", "port 15006 is the tunnel's own"),
    ),
    case(
        "unknown IP, port 15008: REFUSE",
        "93.184.216.34:15008",
        refuse("93.184.216.34:15008", "port 15008 is the tunnel's own"),
    ),
    case(
        "pod IP, readiness port 15021: not a tunnel data port, HBONE",
        "10.244.2.20:15021",
        hbone(WEB_0, 15021),
    ),
]


def first(candidates: Sequence[Workload]) -> Workload:
    return candidates[0]


@pytest.mark.parametrize(("source", "workloads", "services", "dst", "expected"), CASES)
def test_decide(
    source: Workload,
    workloads: tuple[Workload, ...],
    services: tuple[Service, ...],
    dst: str,
    expected: OutboundDecision,
) -> None:
    state = mesh_state([CLIENT, *workloads], services)
    assert decide(state, source, addr(dst), choose=first) == expected


def test_choose_is_offered_the_healthy_endpoints_with_an_address_in_uid_order() -> None:
    web_2 = web_pod("web-2", "10.244.2.22")
    state = mesh_state([CLIENT, web_2, SICK_0, WEB_1, web_pod("web-3")], [WEB])
    offered: list[list[str]] = []

    def last(candidates: Sequence[Workload]) -> Workload:
        offered.append([w.name for w in candidates])
        return candidates[-1]

    decision = decide(state, CLIENT, addr("10.96.0.20:80"), choose=last)
    assert offered == [["web-1", "web-2"]]
    assert decision == hbone(web_2, 8080, WEB)


def test_a_services_endpoints_are_walked_once_per_mesh_state(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each new connection to a service VIP gets the ready endpoints listed for its mesh
    state, not a walk over all the service's pods (0.2 ms at a thousand); a new state (a
    pod turned unhealthy) is listed again, and its answer is followed."""
    walked: list[str] = []
    endpoints = MeshState.endpoints

    def counted(self: MeshState, service: Service) -> tuple[Workload, ...]:
        walked.append(service.name)
        return endpoints(self, service)

    monkeypatch.setattr(MeshState, "endpoints", counted)
    web_2 = web_pod("web-2", "10.244.2.22")
    state = mesh_state([CLIENT, WEB_1, web_2], [WEB])
    offered: list[list[str]] = []

    def record(candidates: Sequence[Workload]) -> Workload:
        offered.append([w.name for w in candidates])
        return candidates[0]

    for _ in range(3):
        assert decide(state, CLIENT, addr("10.96.0.20:80"), choose=record).route is Route.HBONE
    assert walked == ["web"]
    sick = replace(WEB_1, status=HealthStatus.UNHEALTHY)
    decide(mesh_state([CLIENT, sick, web_2], [WEB]), CLIENT, addr("10.96.0.20:80"), choose=record)
    assert walked == ["web", "web"]
    assert offered == [["web-1", "web-2"]] * 3 + [["web-2"]]


def test_ports_a_service_lacks_leave_nothing_behind() -> None:
    """A client trying every port of a VIP is refused on each one the service lacks, and
    the mesh state keeps no view per such port (only per port that leads somewhere)."""
    state = mesh_state([CLIENT, WEB_1], [WEB])
    for port in range(1000, 1200):
        assert decide(state, CLIENT, addr(f"10.96.0.20:{port}")).route is Route.REFUSE
    assert decide(state, CLIENT, addr("10.96.0.20:80")).route is Route.HBONE
    assert len(state._derived) == 2  # the service's ports, and its ready pods on port 80


def test_no_candidate_means_choose_is_never_called() -> None:
    def never(_: Sequence[Workload]) -> Workload:
        raise AssertionError("choose called without candidates")

    state = mesh_state([CLIENT, SICK_0], [WEB])
    assert decide(state, CLIENT, addr("10.96.0.20:80"), choose=never).route is Route.REFUSE


def test_the_authority_is_the_target() -> None:
    assert hbone(WEB_0, 8080).authority == "10.244.2.20:8080"
    assert hbone(WEB6_0, 8080).authority == "[fd00:244::20]:8080"


# -- the CONNECT request ----------------------------------------------------------------------

BAGGAGE = (
    "k8s.cluster.name=Kubernetes,k8s.namespace.name=shop,k8s.deployment.name=client,"
    "service.name=client,service.version=v1"
)


@pytest.mark.parametrize(
    ("source", "decision", "client", "authority", "baggage", "forwarded"),
    [
        pytest.param(
            CLIENT,
            hbone(WEB_0, 8080),
            "10.244.1.10:40000",
            "10.244.2.20:8080",
            BAGGAGE,
            'for="10.244.1.10:40000"',
            id="to a pod IP: no host in forwarded",
        ),
        pytest.param(
            CLIENT,
            hbone(WEB_0, 8080, WEB),
            "10.244.1.10:40000",
            "10.244.2.20:8080",
            BAGGAGE,
            'for="10.244.1.10:40000";host=web.shop.svc.cluster.local',
            id="to a service: the authority is the endpoint, forwarded names the service",
        ),
        pytest.param(
            replace(CLIENT, ips=ips("fd00:244::10")),
            hbone(WEB6_0, 8080, WEB6),
            "[fd00:244::10]:40000",
            "[fd00:244::20]:8080",
            BAGGAGE,
            'for="[fd00:244::10]:40000";host=web6.shop.svc.cluster.local',
            id="IPv6: bracketed authority and client",
        ),
        pytest.param(
            replace(CLIENT, workload_type="", workload_name="client-0"),
            hbone(WEB_0, 8080),
            "10.244.1.10:40000",
            "10.244.2.20:8080",
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=shop,k8s.pod.name=client-0,"
            "service.name=client,service.version=v1",
            'for="10.244.1.10:40000"',
            id="no workload type: named as a pod",
        ),
        pytest.param(
            replace(CLIENT, cluster_id="", canonical_revision=""),
            hbone(WEB_0, 8080),
            "10.244.1.10:40000",
            "10.244.2.20:8080",
            "k8s.namespace.name=shop,k8s.deployment.name=client,service.name=client",
            'for="10.244.1.10:40000"',
            id="empty values are left out of baggage",
        ),
    ],
)
def test_connect_headers(
    source: Workload,
    decision: OutboundDecision,
    client: str,
    authority: str,
    baggage: str,
    forwarded: str,
) -> None:
    headers = connect_headers(source, decision, addr(client))
    names = [name for name, _ in headers]
    # Pseudo-headers come first in HTTP/2, and nothing is sent twice.
    assert names == [":method", ":authority", "baggage", "forwarded", "traceparent"]
    got = dict(headers)
    assert got[":method"] == "CONNECT"
    assert got[":authority"] == authority
    assert got["baggage"] == baggage
    assert got["forwarded"] == forwarded


def test_traceparent_is_w3c_and_new_per_connection() -> None:
    def trace() -> str:
        return dict(connect_headers(CLIENT, hbone(WEB_0, 8080), addr("10.244.1.10:1")))[
            "traceparent"
        ]

    seen = {trace() for _ in range(20)}
    assert len(seen) == 20
    for value in seen:
        assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-00", value), value
        _, trace_id, span_id, _ = value.split("-")
        # W3C: an all-zero trace or span id is invalid.
        assert trace_id != "0" * 32 and span_id != "0" * 16
