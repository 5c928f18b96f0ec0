"""Inbound: a pod bound to a waypoint accepts only the waypoint (no bypass), as a table of
the pure gate and through the inbound decision and the authorizer the listeners use."""

from __future__ import annotations

from dataclasses import replace

import pytest

from meshcore.identity.spiffe import SpiffeId
from meshcore.policy.verdict import ALLOW_ALL, Verdict
from meshcore.sockets import SocketAddr
from meshcore.state import GatewayAddress, HealthStatus, MeshState, Workload
from tests.support.mesh import addr, ips, mesh_state, ports, serves, service, vips, workload
from ztunnel.proxy.common import allow_all
from ztunnel.proxy.inbound import decide
from ztunnel.proxy.waypoint import gated, waypoint_gate

WP_SVC = service(
    name="waypoint", namespace="shop", vips=vips("10.96.0.99"), ports=ports({15008: 15008})
)
WP_ADDR = GatewayAddress(hostname="shop/waypoint.shop.svc.cluster.local")
WP_0 = workload(
    name="waypoint-0",
    namespace="shop",
    service_account="waypoint",
    ips=ips("10.244.1.99"),
    services=serves((WP_SVC, {})),
)
WP_SICK = replace(WP_0, status=HealthStatus.UNHEALTHY)
INFRA_SVC = service(name="waypoint", namespace="infra", vips=vips("10.96.1.99"))
INFRA_0 = workload(
    name="waypoint-0",
    namespace="infra",
    service_account="waypoint",
    ips=ips("10.244.3.99"),
    services=serves((INFRA_SVC, {})),
)
WEB = workload(name="web-0", namespace="shop", service_account="web", ips=ips("10.244.2.20"))
BOUND = replace(WEB, waypoint=WP_ADDR)
OPEN = replace(WEB, waypoint=replace(WP_ADDR, fail_open=True))
INFRA_BOUND = replace(
    WEB, waypoint=GatewayAddress(hostname="infra/waypoint.infra.svc.cluster.local")
)

WAYPOINT_ID = WP_0.identity
CLIENT_ID = SpiffeId("cluster.local", "shop", "client")
INFRA_ID = INFRA_0.identity


def case(
    id: str,
    pod: Workload,
    peer: SpiffeId | None,
    allowed: bool,
    others: tuple[Workload, ...] = (WP_0,),
) -> object:
    return pytest.param(pod, peer, others, allowed, id=id)


CASES = [
    case("unbound pod: any client", WEB, CLIENT_ID, True),
    case("unbound pod: plaintext", WEB, None, True),
    case("bound pod: its waypoint", BOUND, WAYPOINT_ID, True),
    case("bound pod: a client going straight to it is refused", BOUND, CLIENT_ID, False),
    case("bound pod: plaintext (15006) is refused", BOUND, None, False),
    case("bound: another waypoint refused", BOUND, INFRA_ID, False, (WP_0, INFRA_0)),
    case("bound: unready replica gets in", BOUND, WAYPOINT_ID, True, (WP_SICK,)),
    case("other-ns waypoint: it", INFRA_BOUND, INFRA_ID, True, (INFRA_0,)),
    case("other-ns waypoint: not ours", INFRA_BOUND, WAYPOINT_ID, False, (INFRA_0, WP_0)),
    case("bound to a missing waypoint (fail closed): nobody", BOUND, CLIENT_ID, False, ()),
    case("missing waypoint: not its name", BOUND, WAYPOINT_ID, False, ()),
    case("failOpen, waypoint ready: still only the waypoint", OPEN, CLIENT_ID, False),
    case("failOpen, waypoint not ready: clients come direct", OPEN, CLIENT_ID, True, (WP_SICK,)),
    case("failOpen, waypoint missing: plaintext too", OPEN, None, True, ()),
]  # fmt: skip


def state_with(pod: Workload, others: tuple[Workload, ...]) -> MeshState:
    return mesh_state([pod, *others], [WP_SVC, INFRA_SVC])


@pytest.mark.parametrize(("pod", "peer", "others", "allowed"), CASES)
def test_waypoint_gate(
    pod: Workload, peer: SpiffeId | None, others: tuple[Workload, ...], allowed: bool
) -> None:
    denied = waypoint_gate(state_with(pod, others), pod, peer)
    assert (denied is None) is allowed
    if denied is not None:
        assert not denied.allowed
        assert str(pod.waypoint) in denied.reason  # names the waypoint
        assert "bypass" in denied.reason


@pytest.mark.parametrize(("pod", "peer", "others", "allowed"), CASES)
def test_the_inbound_decision_answers_401_to_a_bypass(
    pod: Workload, peer: SpiffeId | None, others: tuple[Workload, ...], allowed: bool
) -> None:
    state = state_with(pod, others)
    headers = [(":method", "CONNECT"), (":authority", "10.244.2.20:8080")]
    got = decide(pod, headers, peer, addr("10.244.1.10:40000"), gated(allow_all, lambda: state))
    assert got.status == (200 if allowed else 401)
    if not allowed:
        assert str(pod.waypoint) in got.reason


def test_the_gate_comes_before_policy_and_policy_still_applies_to_the_waypoint() -> None:
    state = state_with(BOUND, (WP_0,))
    seen: list[SpiffeId | None] = []
    deny = Verdict(False, "shop/deny", 0, None, "denied by DENY policy shop/deny rule 0")

    def policy(w: Workload, peer: SpiffeId | None, c: SocketAddr, t: SocketAddr) -> Verdict:
        seen.append(peer)
        return deny if peer == WAYPOINT_ID else ALLOW_ALL

    check = gated(policy, lambda: state)
    client, target = addr("10.244.1.10:1"), addr("10.244.2.20:8080")
    assert not check(BOUND, CLIENT_ID, client, target).allowed
    assert seen == []  # a bypass never reaches the policy engine
    assert check(BOUND, WAYPOINT_ID, client, target) == deny
    assert seen == [WAYPOINT_ID]


def test_the_gate_follows_the_current_state() -> None:
    states = [state_with(WEB, (WP_0,))]
    check = gated(allow_all, lambda: states[-1])
    client, target = addr("10.244.1.10:1"), addr("10.244.2.20:8080")
    assert check(WEB, CLIENT_ID, client, target).allowed
    states.append(state_with(BOUND, (WP_0,)))  # the pod is bound while connections are open
    assert not check(BOUND, CLIENT_ID, client, target).allowed
