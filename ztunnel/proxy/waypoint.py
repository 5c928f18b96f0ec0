"""Waypoints as the tunnel sees them: which one a connection goes through, and who may
reach a pod that is bound to one. Pure: no I/O.

Outbound (`through_waypoint`, used by `outbound.decide`), as upstream ztunnel's
`build_request`: a service VIP whose service has a waypoint goes to that waypoint; a pod IP
whose workload has one goes to it too, unless the connection comes from the waypoint
itself (its upstream leg). A bound waypoint that is missing or has no ready endpoint fails
closed here (the connection is refused, naming the waypoint) unless its address says
`failOpen`, which goes straight to the destination as if no waypoint were bound.

Inbound (`waypoint_gate`): a pod bound to a waypoint (a workload binding) accepts
connections only from that waypoint's identity. Upstream leaves this to a hand-written
DENY policy on every such pod; here the binding itself is the policy, so a client that
dials the pod directly cannot bypass the waypoint's L7 rules.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from meshcore.identity.spiffe import SpiffeId
from meshcore.policy.verdict import Verdict
from meshcore.sockets import SocketAddr
from meshcore.state import (
    GatewayAddress,
    IPAddress,
    MeshState,
    WaypointEndpoint,
    Workload,
)
from ztunnel.proxy.common import Authorizer

# The response flag of a connection refused because its waypoint is unavailable (in the
# metrics' `response_flags` and the access-log line's error).
WAYPOINT_UNAVAILABLE = "WAYPOINT_UNAVAILABLE"


class Binding(enum.Enum):
    """Why a connection goes through a waypoint."""

    SERVICE = "service"  # the destination is a service VIP; the service is bound
    WORKLOAD = "workload"  # the destination is a pod IP; the pod is bound


@dataclass(frozen=True, slots=True)
class WaypointHop:
    """The waypoint a connection is bound to, and where it goes (`endpoint`), or why not."""

    binding: Binding
    address: GatewayAddress
    # What is bound: "service shop/web.shop.svc.cluster.local" or "workload shop/web-0".
    bound: str
    # The waypoint endpoint chosen; None when none is ready (refused, or failed open).
    endpoint: WaypointEndpoint | None = None
    # The pod behind the waypoint (workload binding): where the bytes finally go.
    behind: Workload | None = None
    # "missing" (the mesh does not know it) or "not ready" (no ready endpoint); "" if used.
    problem: str = ""

    @property
    def name(self) -> str:
        return str(self.address)

    @property
    def failed_open(self) -> bool:
        return self.endpoint is None and self.address.fail_open

    def describe(self) -> str:
        """One sentence for logs, `explain` and refusals."""
        if self.endpoint is not None:
            return f"through waypoint {self.name} ({self.bound} is bound to it)"
        what = f"waypoint {self.name} of {self.bound} is {self.problem}"
        if self.failed_open:
            return f"{what}; failOpen is set, so straight to the destination"
        return f"{what}; refused (fail closed)"


def is_from_waypoint(
    state: MeshState, waypoint: GatewayAddress, source: Workload, client: IPAddress | None
) -> bool:
    """The connection comes from the waypoint itself: its identity, or its address, is one
    of the waypoint's workloads'. Such traffic (the waypoint's own upstream leg) is never
    sent back to the waypoint. Upstream ztunnel needs both to match; either is enough here,
    so a waypoint is never looped to itself (a workload holding the waypoint's identity can
    pass the waypoint's inbound check anyway)."""
    addresses = (client,) if client is not None else source.ips
    for w in state.waypoint_workloads(waypoint):
        if w.identity == source.identity or any(ip in w.ips for ip in addresses):
            return True
    return False


def choose_waypoint(
    state: MeshState,
    waypoint: GatewayAddress,
    binding: Binding,
    bound: str,
    dst: SocketAddr,
    choose: Callable[[Sequence[Workload]], Workload],
    behind: Workload | None = None,
) -> WaypointHop:
    """The hop through `waypoint`: one of its ready endpoints (picked by `choose`, as the
    destination's endpoints are), at the caller's address family; or no endpoint, and why."""
    endpoints = state.waypoint_endpoints(waypoint, dst.ip.version)
    if not endpoints:
        problem = "not ready" if state.waypoint_workloads(waypoint) else "missing"
        return WaypointHop(binding, waypoint, bound, None, behind, problem)
    picked = choose([e.workload for e in endpoints])
    endpoint = next((e for e in endpoints if e.workload is picked), endpoints[0])
    return WaypointHop(binding, waypoint, bound, endpoint, behind)


def waypoint_sans(state: MeshState, waypoint: GatewayAddress) -> frozenset[SpiffeId]:
    """The SPIFFE SANs of the waypoint's service (hostname form), as upstream adds a
    service's SANs to what its endpoints may prove."""
    if waypoint.hostname is None:
        return frozenset()
    svc = state.service_by_key(waypoint.hostname)
    if svc is None:
        return frozenset()
    out = set()
    for san in svc.subject_alt_names:
        try:
            out.add(SpiffeId.parse(san))
        except ValueError:
            continue  # a SAN that is not a SPIFFE id can never match a peer
    return frozenset(out)


# -- inbound ----------------------------------------------------------------------------------


def waypoint_gate(state: MeshState, workload: Workload, peer: SpiffeId | None) -> Verdict | None:
    """None when `peer` may reach `workload` as far as waypoints go; else the denial.

    A workload bound to a waypoint accepts only that waypoint's identities (any of its
    workloads, ready or not: a replica being drained still finishes its connections). A
    plaintext client (no identity) is refused. When the waypoint is unavailable and its
    address says `failOpen`, clients go direct, so they are let through (policy still
    applies); when it is unavailable and fails closed, nobody else gets in either."""
    waypoint = workload.waypoint
    if waypoint is None:
        return None
    members = state.waypoint_workloads(waypoint)
    if peer is not None and any(w.identity == peer for w in members):
        return None
    if waypoint.fail_open and not state.waypoint_endpoints(waypoint):
        return None
    who = f"peer {peer}" if peer is not None else "a plaintext client"
    return Verdict(
        False,
        None,
        None,
        None,
        f"denied: {workload.namespace}/{workload.name} is bound to waypoint {waypoint}, "
        f"which alone may reach it; {who} tried to bypass it",
    )


def gated(authorize: Authorizer, state: Callable[[], MeshState]) -> Authorizer:
    """`authorize` behind the waypoint gate: what the inbound listeners (15008, 15006, the
    in-process hop) and the re-check of open connections after a config change call, so
    a pod bound to a waypoint later also loses its direct connections."""

    def check(
        workload: Workload, peer: SpiffeId | None, client: SocketAddr, target: SocketAddr
    ) -> Verdict:
        denied = waypoint_gate(state(), workload, peer)
        return denied if denied is not None else authorize(workload, peer, client, target)

    return check
