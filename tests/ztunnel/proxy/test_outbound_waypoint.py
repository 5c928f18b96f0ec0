"""Outbound through waypoints: upstream ztunnel's `build_request` waypoint cases as a table,
plus ours (fail closed, failOpen), each with the whole frozen decision expected."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import pytest

from meshcore.identity.spiffe import SpiffeId
from meshcore.sockets import SocketAddr
from meshcore.state import (
    GatewayAddress,
    HealthStatus,
    IPAddress,
    NetworkAddress,
    Service,
    TunnelProtocol,
    WaypointEndpoint,
    Workload,
)
from tests.support.mesh import (
    CLIENT_POD,
    WEB_SERVICE,
    addr,
    ips,
    mesh_state,
    ports,
    serves,
    service,
    vips,
    web_pod,
    workload,
)
from ztunnel.proxy.outbound import OutboundDecision, Route, connect_headers, decide
from ztunnel.proxy.waypoint import Binding, WaypointHop

CLIENT = CLIENT_POD
WP_SVC = service(
    name="waypoint", namespace="shop", vips=vips("10.96.0.99"), ports=ports({15008: 15008})
)
WP_ADDR = GatewayAddress(hostname="shop/waypoint.shop.svc.cluster.local")
WP_0 = workload(
    name="waypoint-0",
    namespace="shop",
    service_account="waypoint",
    ips=ips("10.244.1.99", "fd00:244::99"),
    node="node1",
    services=serves((WP_SVC, {})),
)
WP_SICK = replace(WP_0, status=HealthStatus.UNHEALTHY)

WEB = replace(WEB_SERVICE, vips=vips("10.96.0.20", "fd00:96::20"), waypoint=WP_ADDR)
WEB_PLAIN = replace(WEB, waypoint=None)
WEB_0 = web_pod("web-0", "10.244.2.20", services=serves((WEB, {})))
WEB_0_BOUND = replace(WEB_0, waypoint=WP_ADDR)

# A waypoint in another namespace, on another HBONE port, with a SAN of its own.
INFRA_SVC = service(
    name="waypoint",
    namespace="infra",
    vips=vips("10.96.1.99"),
    subject_alt_names=("spiffe://cluster.local/ns/infra/sa/waypoint-canary", "not-spiffe"),
)
INFRA_ADDR = GatewayAddress(hostname="infra/waypoint.infra.svc.cluster.local", hbone_port=15009)
INFRA_0 = workload(
    name="waypoint-0",
    namespace="infra",
    service_account="waypoint",
    ips=ips("10.244.3.99"),
    services=serves((INFRA_SVC, {})),
)
CANARY = SpiffeId("cluster.local", "infra", "waypoint-canary")
BY_IP = GatewayAddress(address=NetworkAddress("", ips("10.244.1.99")[0]))

WAYPOINT_ID = WP_0.identity


def via(
    endpoint: Workload,
    binding: Binding,
    dst: str,
    svc: Service | None,
    gw: GatewayAddress = WP_ADDR,
    ip: str = "10.244.1.99",
    port: int = 15008,
    behind: Workload | None = None,
    extra: frozenset[SpiffeId] = frozenset(),
) -> OutboundDecision:
    bound = f"service {svc.key}" if svc is not None else f"workload shop/{behind and behind.name}"
    hop = WaypointHop(
        binding, gw, bound, WaypointEndpoint(endpoint, ips(ip)[0], port), behind=behind
    )
    return OutboundDecision(
        Route.HBONE,
        addr(dst),
        next_hop=SocketAddr(ips(ip)[0], port),
        expected_identities=frozenset({endpoint.identity}) | extra,
        destination=endpoint,
        service=svc,
        reason=hop.describe(),
        waypoint=hop,
    )


def direct(w: Workload, target: str, svc: Service | None = None) -> OutboundDecision:
    t = addr(target)
    return OutboundDecision(
        Route.HBONE,
        t,
        next_hop=SocketAddr(t.ip, 15008),
        expected_identities=frozenset({w.identity}),
        destination=w,
        service=svc,
        reason="destination is in the mesh",
    )


def unavailable(
    dst: str, binding: Binding, bound: str, problem: str, svc: Service | None = None,
    gw: GatewayAddress = WP_ADDR, behind: Workload | None = None,
) -> OutboundDecision:  # fmt: skip
    hop = WaypointHop(binding, gw, bound, None, behind, problem)
    return OutboundDecision(
        Route.REFUSE, addr(dst), service=svc, reason=hop.describe(), waypoint=hop
    )


def failed_open(decision: OutboundDecision, hop: WaypointHop) -> OutboundDecision:
    return replace(decision, waypoint=hop, reason=f"{hop.describe()}: {decision.reason}")


OPEN = replace(WP_ADDR, fail_open=True)
WEB_OPEN = replace(WEB, waypoint=OPEN)
WEB_0_OPEN = replace(WEB_0, waypoint=OPEN)
WAYPOINT_SOURCE = replace(WP_0, uid="source-is-waypoint")  # the waypoint's identity and IPs
SAME_SA = workload(
    name="other", namespace="shop", service_account="waypoint", ips=ips("10.244.1.50")
)
SAME_IP = replace(CLIENT, ips=ips("10.244.1.99"))  # another identity at the waypoint's IP


def case(
    id: str,
    dst: str,
    expected: OutboundDecision,
    workloads: tuple[Workload, ...] = (WP_0, WEB_0),
    services: tuple[Service, ...] = (WEB, WP_SVC),
    source: Workload = CLIENT,
    client: IPAddress | None = None,
) -> object:
    return pytest.param(source, client, workloads, services, dst, expected, id=id)


CASES = [
    # -- rule 1: a service with a waypoint
    case(
        "service with waypoint: HBONE to the waypoint, authority the original VIP:port",
        "10.96.0.20:80",
        via(WP_0, Binding.SERVICE, "10.96.0.20:80", WEB),
    ),
    case(
        "service with waypoint, IPv6 VIP: the waypoint's IPv6 address",
        "[fd00:96::20]:80",
        via(WP_0, Binding.SERVICE, "[fd00:96::20]:80", WEB, ip="fd00:244::99"),
    ),
    case(
        "service with waypoint, a port it does not declare: the waypoint's to answer",
        "10.96.0.20:9999",
        via(WP_0, Binding.SERVICE, "10.96.0.20:9999", WEB),
    ),
    case(
        "service with waypoint and no endpoints of its own: still the waypoint",
        "10.96.0.20:80",
        via(WP_0, Binding.SERVICE, "10.96.0.20:80", WEB),
        workloads=(WP_0,),
    ),
    case(
        "waypoint in another namespace, HBONE port 15009, its service's SANs expected",
        "10.96.0.20:80",
        via(
            INFRA_0,
            Binding.SERVICE,
            "10.96.0.20:80",
            replace(WEB, waypoint=INFRA_ADDR),
            gw=INFRA_ADDR,
            ip="10.244.3.99",
            port=15009,
            extra=frozenset({CANARY}),
        ),
        workloads=(INFRA_0, WEB_0),
        services=(replace(WEB, waypoint=INFRA_ADDR), INFRA_SVC),
    ),
    case(
        "waypoint named by its workload's address: that address",
        "10.96.0.20:80",
        via(WP_0, Binding.SERVICE, "10.96.0.20:80", replace(WEB, waypoint=BY_IP), gw=BY_IP),
        services=(replace(WEB, waypoint=BY_IP), WP_SVC),
    ),
    # -- rule 2: a pod with a waypoint
    case(
        "workload with waypoint: HBONE to the waypoint, authority the original podIP:port",
        "10.244.2.20:8080",
        via(WP_0, Binding.WORKLOAD, "10.244.2.20:8080", None, behind=WEB_0_BOUND),
        workloads=(WP_0, WEB_0_BOUND),
    ),
    case(
        "workload with waypoint that does not speak HBONE: still the waypoint, as upstream",
        "10.244.2.20:8080",
        via(
            WP_0,
            Binding.WORKLOAD,
            "10.244.2.20:8080",
            None,
            behind=replace(WEB_0_BOUND, protocol=TunnelProtocol.NONE),
        ),
        workloads=(WP_0, replace(WEB_0_BOUND, protocol=TunnelProtocol.NONE)),
    ),
    case(
        "waypoint-for service only: the pod IP goes direct",
        "10.244.2.20:8080",
        direct(WEB_0, "10.244.2.20:8080"),
    ),
    case(
        "a bound service VIP goes through the service's waypoint, not the pod's",
        "10.96.0.20:80",
        via(WP_0, Binding.SERVICE, "10.96.0.20:80", WEB),
        workloads=(WP_0, replace(WEB_0_BOUND, waypoint=INFRA_ADDR), INFRA_0),
        services=(WEB, WP_SVC, INFRA_SVC),
    ),
    case(
        "the source's own waypoint is not used (upstream build_request_source_waypoint)",
        "10.244.2.20:8080",
        direct(WEB_0, "10.244.2.20:8080"),
        source=replace(CLIENT, waypoint=WP_ADDR),
    ),
    # -- from the waypoint itself: its upstream leg, rule 3
    case(
        "source is the waypoint (identity and IP): pod IP direct",
        "10.244.2.20:8080",
        direct(WEB_0_BOUND, "10.244.2.20:8080"),
        workloads=(WP_0, WEB_0_BOUND),
        source=WAYPOINT_SOURCE,
    ),
    case(
        "source is the waypoint by identity: direct",
        "10.244.2.20:8080",
        direct(WEB_0_BOUND, "10.244.2.20:8080"),
        workloads=(WP_0, WEB_0_BOUND),
        source=SAME_SA,
    ),
    case(
        "source is the waypoint by IP (the connection's address): direct",
        "10.244.2.20:8080",
        direct(WEB_0_BOUND, "10.244.2.20:8080"),
        workloads=(WP_0, WEB_0_BOUND),
        source=CLIENT,
        client=ips("10.244.1.99")[0],
    ),
    case(
        "source is the waypoint by IP (its workload's address): direct",
        "10.244.2.20:8080",
        direct(WEB_0_BOUND, "10.244.2.20:8080"),
        workloads=(WP_0, WEB_0_BOUND),
        source=SAME_IP,
    ),
    case(
        "the waypoint calling the bound service's VIP: to an endpoint, not back to itself",
        "10.96.0.20:80",
        direct(WEB_0, "10.244.2.20:8080", WEB),
        source=WAYPOINT_SOURCE,
    ),
    # -- unavailable waypoints: ours fails closed
    case(
        "service's waypoint has no ready endpoint: REFUSE, naming it",
        "10.96.0.20:80",
        unavailable("10.96.0.20:80", Binding.SERVICE, f"service {WEB.key}", "not ready", svc=WEB),
        workloads=(WP_SICK, WEB_0),
    ),
    case(
        "service's waypoint is missing: REFUSE, naming it",
        "10.96.0.20:80",
        unavailable("10.96.0.20:80", Binding.SERVICE, f"service {WEB.key}", "missing", svc=WEB),
        workloads=(WEB_0,),
        services=(WEB,),
    ),
    case(
        "pod's waypoint is missing: REFUSE",
        "10.244.2.20:8080",
        unavailable(
            "10.244.2.20:8080",
            Binding.WORKLOAD,
            "workload shop/web-0",
            "missing",
            behind=WEB_0_BOUND,
        ),
        workloads=(WEB_0_BOUND,),
        services=(WEB_PLAIN,),
    ),
    case(
        "waypoint that does not speak HBONE is not ready: REFUSE",
        "10.96.0.20:80",
        unavailable("10.96.0.20:80", Binding.SERVICE, f"service {WEB.key}", "not ready", svc=WEB),
        workloads=(replace(WP_0, protocol=TunnelProtocol.NONE), WEB_0),
    ),
    # -- failOpen: straight to the destination, as upstream
    case(
        "failOpen, service's waypoint not ready: to an endpoint directly",
        "10.96.0.20:80",
        failed_open(
            direct(WEB_0, "10.244.2.20:8080", WEB_OPEN),
            WaypointHop(Binding.SERVICE, OPEN, f"service {WEB.key}", None, None, "not ready"),
        ),
        workloads=(WP_SICK, WEB_0),
        services=(WEB_OPEN, WP_SVC),
    ),
    case(
        "failOpen, pod's waypoint missing: to the pod directly",
        "10.244.2.20:8080",
        failed_open(
            direct(WEB_0_OPEN, "10.244.2.20:8080"),
            WaypointHop(Binding.WORKLOAD, OPEN, "workload shop/web-0", None, WEB_0_OPEN, "missing"),
        ),
        workloads=(WEB_0_OPEN,),
        services=(WEB_PLAIN,),
    ),
    case(
        "failOpen with a ready waypoint: the waypoint",
        "10.96.0.20:80",
        via(WP_0, Binding.SERVICE, "10.96.0.20:80", WEB_OPEN, gw=OPEN),
        services=(WEB_OPEN, WP_SVC),
    ),
    # -- before any waypoint
    case(
        "the tunnel's own port is refused before any waypoint",
        "10.96.0.20:15008",
        OutboundDecision(
            Route.REFUSE, addr("10.96.0.20:15008"), reason="port 15008 is the tunnel's own"
        ),
    ),
]


def first(candidates: Sequence[Workload]) -> Workload:
    return candidates[0]


@pytest.mark.parametrize(("source", "client", "workloads", "services", "dst", "expected"), CASES)
def test_decide_with_waypoints(
    source: Workload,
    client: IPAddress | None,
    workloads: tuple[Workload, ...],
    services: tuple[Service, ...],
    dst: str,
    expected: OutboundDecision,
) -> None:
    state = mesh_state([CLIENT, *workloads], services)
    got = decide(state, source, addr(dst), choose=first, client=client)
    assert got == expected
    if got.waypoint is not None:
        assert got.waypoint.name in got.reason  # every outcome names the waypoint


def test_refusals_and_fail_open_say_why() -> None:
    state = mesh_state([CLIENT, WP_SICK, WEB_0], [WEB, WP_SVC])
    got = decide(state, CLIENT, addr("10.96.0.20:80"), choose=first)
    assert got.reason == (
        "waypoint shop/waypoint.shop.svc.cluster.local of service "
        "shop/web.shop.svc.cluster.local is not ready; refused (fail closed)"
    )
    state = mesh_state([CLIENT, WEB_0_OPEN], [WEB_PLAIN])
    got = decide(state, CLIENT, addr("10.244.2.20:8080"), choose=first)
    assert got.reason.startswith(
        "waypoint shop/waypoint.shop.svc.cluster.local of workload shop/web-0 is missing; "
        "failOpen is set, so straight to the destination"
    )


def test_the_waypoint_endpoint_is_chosen_among_the_ready_ones() -> None:
    wp_1 = replace(WP_0, uid="wp-1", name="waypoint-1", ips=ips("10.244.2.98"))
    wp_2 = replace(WP_0, uid="wp-2", name="waypoint-2", ips=ips("10.244.2.97"))
    state = mesh_state([CLIENT, WP_SICK, wp_1, wp_2, WEB_0], [WEB, WP_SVC])
    offered: list[list[str]] = []

    def last(candidates: Sequence[Workload]) -> Workload:
        offered.append([w.name for w in candidates])
        return candidates[-1]

    got = decide(state, CLIENT, addr("10.96.0.20:80"), choose=last)
    assert offered == [["waypoint-1", "waypoint-2"]]  # the web endpoints are not offered
    assert got.next_hop == addr("10.244.2.97:15008")


def test_connect_headers_through_a_waypoint_carry_the_original_destination() -> None:
    state = mesh_state([CLIENT, WP_0, WEB_0_BOUND], [WEB, WP_SVC])
    to_vip = decide(state, CLIENT, addr("10.96.0.20:80"), choose=first)
    headers = dict(connect_headers(CLIENT, to_vip, addr("10.244.1.10:40000")))
    assert headers[":authority"] == "10.96.0.20:80"
    assert headers["forwarded"] == 'for="10.244.1.10:40000";host=web.shop.svc.cluster.local'
    to_pod = decide(state, CLIENT, addr("10.244.2.20:8080"), choose=first)
    headers = dict(connect_headers(CLIENT, to_pod, addr("10.244.1.10:40000")))
    assert headers[":authority"] == "10.244.2.20:8080"
    assert headers["forwarded"] == 'for="10.244.1.10:40000"'
    assert to_pod.expected_identities == frozenset({WAYPOINT_ID})
