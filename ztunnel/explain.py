"""`explain`: what would happen to a connection from this pod to that address, without
sending anything.

It calls the very functions the data path calls: `outbound.decide` for the route (once per
candidate endpoint, since the data path picks one at random) and `authorize` for the
destination tunnel's verdict (behind the same waypoint gate the inbound listeners apply).

Waypoints: `waypoint` says which waypoint the connection goes through and why (a service
or a workload binding), the `:authority` sent to it, or that it is missing or not ready
(refused, or `failOpen`); `waypoint_reason` says, in one sentence, why a waypoint is or is
not used, since "my waypoint is not used" is the question operators ask most.

A source outside the mesh: its connection is not captured, so no tunnel routes it; each
endpoint it could reach shows what the destination's tunnel decides for a plaintext client
(it proves no identity), and `warning` says that rules on namespaces or principals cannot
match such a client.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from typing import Any

from meshcore.policy.authz import authorize
from meshcore.policy.index import PolicyIndex
from meshcore.policy.verdict import Verdict
from meshcore.sockets import SocketAddr
from meshcore.state import HealthStatus, MeshState, TunnelProtocol, Workload
from ztunnel.proxy.outbound import OutboundDecision, Route, decide
from ztunnel.proxy.waypoint import WaypointHop, is_from_waypoint, waypoint_gate


def _find_source(state: MeshState, ref: str) -> Workload:
    ns, sep, name = ref.partition("/")
    if not sep or not ns or not name:
        raise ValueError(f"source {ref!r} must be <namespace>/<pod name>")
    for w in state.workloads:
        if w.namespace == ns and w.name == name:
            return w
    raise ValueError(f"no workload {ref} in the mesh config")


def _resolve(state: MeshState, source: Workload, destination: str) -> tuple[SocketAddr, str]:
    """`ip:port`, `[v6]:port` or `<service host>:<port>` (short names resolve like DNS
    search paths from the source's namespace). Returns the address and how it was found."""
    host, sep, port_text = destination.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"destination {destination!r} must be <host or ip>:<port>")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        # "fd00::20:8080" could be an address with no port: ask, as the data path would.
        raise ValueError(
            f"destination {destination!r} must be <host or ip>:<port> (an IPv6 address in "
            "brackets: [fd00::1]:80)"
        )
    port = int(port_text)
    host = host.strip("[]")
    try:
        return SocketAddr(ipaddress.ip_address(host), port), "address"
    except ValueError:
        pass
    names = [host]
    if host.count(".") == 0:
        names.append(f"{host}.{source.namespace}.svc.cluster.local")
    elif host.count(".") == 1:
        names.append(f"{host}.svc.cluster.local")
    elif host.endswith(".svc"):
        names.append(f"{host}.cluster.local")
    for name in names:
        svc = state.service_by_hostname(name)
        if svc is None:
            continue
        for vip in svc.vips:
            if vip.network == source.network:
                return SocketAddr(vip.ip, port), f"service {svc.namespace}/{svc.hostname}"
        raise ValueError(f"service {svc.hostname} has no VIP on network {source.network!r}")
    raise ValueError(f"{host!r} is neither an IP address nor a known service host name")


def _verdict(
    state: MeshState,
    policies: PolicyIndex,
    w: Workload,
    peer: Workload,
    client: Any,
    target: SocketAddr,
) -> Verdict:
    """What `w`'s tunnel decides for `peer`: the waypoint gate, then policy."""
    denied = waypoint_gate(state, w, peer.identity)
    return denied if denied is not None else authorize(policies, w, peer.identity, client, target)


def _endpoint_json(
    state: MeshState,
    policies: PolicyIndex,
    source: Workload,
    d: OutboundDecision,
    in_process: Callable[[Workload, Workload], bool],
) -> dict[str, Any]:
    w = d.destination
    if d.via_waypoint:
        return _waypoint_endpoint_json(state, policies, d)
    out: dict[str, Any] = {
        "workload": f"{w.namespace}/{w.name}" if w is not None else None,
        "ip": str(d.target.ip) if d.target is not None else None,
        "port": d.target.port if d.target is not None else None,
        "hbone": str(d.next_hop) if d.route is Route.HBONE else None,
        "identity": str(w.identity) if w is not None and d.route is Route.HBONE else None,
        "node": w.node if w is not None else None,
        "healthy": w.status is HealthStatus.HEALTHY if w is not None else None,
        "route": d.route.name,
    }
    if d.route is Route.HBONE and w is not None:
        # Same-node pairs this tunnel serves both ends of skip the TLS hop (still checked).
        out["delivery"] = "in-process" if in_process(source, w) else "hbone"
    if d.route is Route.HBONE and w is not None and d.target is not None:
        # What the destination's tunnel decides for this client: its address is the
        # source pod's, its identity the source's certificate.
        result = _verdict(state, policies, w, source, source.ips[0], d.target)
        out["authorization"] = result.to_json()
        out["mtls"] = result.mtls.value
    return out


def _waypoint_endpoint_json(
    state: MeshState, policies: PolicyIndex, d: OutboundDecision
) -> dict[str, Any]:
    """A waypoint endpoint: dialled over the network (a waypoint pod is never captured, so
    never in process), sent the original destination as `:authority`. Behind a workload
    binding, the pod's tunnel then sees the waypoint's identity: its verdict is shown."""
    hop = d.waypoint
    assert hop is not None and hop.endpoint is not None and d.target is not None
    w = hop.endpoint.workload
    out: dict[str, Any] = {
        "workload": f"{w.namespace}/{w.name}",
        "ip": str(hop.endpoint.ip),
        "port": hop.endpoint.hbone_port,
        "hbone": str(d.next_hop),
        "identity": str(w.identity),
        "node": w.node,
        "healthy": w.status is HealthStatus.HEALTHY,
        "route": d.route.name,
        "delivery": "hbone",
        "waypoint": True,
        "authority": d.authority,
    }
    behind = hop.behind
    if behind is not None and behind.protocol is TunnelProtocol.HBONE:
        result = _verdict(state, policies, behind, w, hop.endpoint.ip, d.target)
        out["behind"] = {
            "workload": f"{behind.namespace}/{behind.name}",
            "authorization": result.to_json(),
            "mtls": result.mtls.value,
        }
    return out


def _hop_json(hop: WaypointHop, d: OutboundDecision) -> dict[str, Any]:
    status = "failed-open" if hop.failed_open else "refused"
    if hop.endpoint is not None:
        status = "used"
    return {
        "name": hop.name,
        "hostname": hop.address.hostname,
        "address": str(hop.address.address) if hop.address.address is not None else None,
        "hbonePort": hop.address.hbone_port,
        "failOpen": hop.address.fail_open,
        "binding": hop.binding.value,
        "bound": hop.bound,
        "status": status,
        "problem": hop.problem or None,
        "authority": d.authority if hop.endpoint is not None else None,
    }


def _why_no_waypoint(state: MeshState, source: Workload, d: OutboundDecision) -> str:
    """Why a connection goes without a waypoint, in the operator's terms."""
    svc = d.service
    if svc is not None:
        if svc.waypoint is not None and is_from_waypoint(state, svc.waypoint, source, None):
            return (
                f"the source is service {svc.key}'s waypoint {svc.waypoint} itself: "
                "its own connections go straight to the endpoints"
            )
        if svc.waypoint is None:
            return (
                f"service {svc.key} is not bound to a waypoint (label the service or its "
                "namespace istio.io/use-waypoint, with a waypoint for service or all); a "
                "pod's own binding applies only to traffic sent to the pod's IP"
            )
        return f"service {svc.key}'s waypoint is not used"
    w = d.destination
    if w is None:
        return "the destination is not in the mesh, so no waypoint applies"
    if w.waypoint is not None and is_from_waypoint(state, w.waypoint, source, None):
        return (
            f"the source is {w.namespace}/{w.name}'s waypoint {w.waypoint} itself: "
            "its own connections go straight to the pod"
        )
    return (
        f"workload {w.namespace}/{w.name} is not bound to a waypoint (a service's waypoint "
        "applies only to traffic sent to the service's VIP; a pod binding needs a waypoint "
        "for workload or all)"
    )


PLAINTEXT_WARNING = (
    "the source is outside the mesh: it proves no identity, so rules on source "
    "namespaces or principals (from.source.namespaces, principals) cannot match it; "
    "only ipBlocks and the request's own attributes (ports) can"
)


def _plaintext(
    state: MeshState,
    policies: PolicyIndex,
    source: Workload,
    dst: SocketAddr,
    result: dict[str, Any],
) -> None:
    """The endpoints a client outside the mesh reaches (the service's rules pick one, no
    waypoint in between: nothing captured the connection to send it there), each with the
    verdict of its tunnel's inbound plaintext listener (15006)."""
    candidates: list[Workload] = []

    def record(cands: Sequence[Workload]) -> Workload:
        candidates.extend(cands)
        return cands[0]

    first = decide(state, source, dst, choose=record, bypass_waypoint=True)
    if first.route is Route.REFUSE:
        return
    decisions = [first]
    for i in range(1, len(candidates)):

        def pick(cands: Sequence[Workload], i: int = i) -> Workload:
            return cands[i]

        decisions.append(decide(state, source, dst, choose=pick, bypass_waypoint=True))
    svc = first.service
    result["destination"]["service"] = f"{svc.namespace}/{svc.hostname}" if svc else None
    result["selection"] = (
        f"one of {len(candidates)} endpoints, chosen by the service's rules per connection"
        if len(candidates) > 1
        else "the only endpoint"
        if candidates
        else "direct"
    )
    result["endpoints"] = [_plaintext_endpoint(state, policies, source, d) for d in decisions]
    if any("authorization" in e for e in result["endpoints"]):
        result["warning"] = PLAINTEXT_WARNING


def _plaintext_endpoint(
    state: MeshState, policies: PolicyIndex, source: Workload, d: OutboundDecision
) -> dict[str, Any]:
    w = d.destination
    target = d.target
    out: dict[str, Any] = {
        "workload": f"{w.namespace}/{w.name}" if w is not None else None,
        "ip": str(target.ip) if target is not None else None,
        "port": target.port if target is not None else None,
        "hbone": None,
        "identity": None,
        "node": w.node if w is not None else None,
        "healthy": w.status is HealthStatus.HEALTHY if w is not None else None,
        "route": "PLAINTEXT",
        "delivery": "plaintext",
    }
    if w is None or target is None or w.protocol is not TunnelProtocol.HBONE:
        out["note"] = "the destination is not in the mesh either: no tunnel decides"
        return out
    # What the destination's inbound plaintext listener decides: the waypoint gate, then
    # policy, for a client with the source's address and no identity.
    denied = waypoint_gate(state, w, None)
    verdict = denied or authorize(policies, w, None, source.ips[0], target)
    out["authorization"] = verdict.to_json()
    out["mtls"] = verdict.mtls.value
    return out


def _never(_source: Workload, _destination: Workload) -> bool:
    return False


def explain(
    state: MeshState,
    policies: PolicyIndex,
    source_ref: str,
    destination: str,
    in_process: Callable[[Workload, Workload], bool] = _never,
) -> dict[str, Any]:
    """`in_process(source, destination)`: whether this tunnel would join the pair in
    process (it serves both)."""
    source = _find_source(state, source_ref)
    dst, how = _resolve(state, source, destination)
    result: dict[str, Any] = {
        "source": {
            "workload": f"{source.namespace}/{source.name}",
            "identity": str(source.identity),
            "ip": str(source.ips[0]) if source.ips else None,
            "enrolled": source.protocol is TunnelProtocol.HBONE,
        },
        "destination": {"input": destination, "ip": str(dst.ip), "port": dst.port, "via": how},
    }
    if source.protocol is not TunnelProtocol.HBONE or not source.ips:
        result.update(
            route="NOT_CAPTURED",
            reason="the source pod is not in the mesh: its traffic leaves without the tunnel",
            endpoints=[],
        )
        if source.ips:
            _plaintext(state, policies, source, dst, result)
        return result
    # Run the data path's own decision once per candidate endpoint.
    candidates: list[Workload] = []

    def record(cands: Sequence[Workload]) -> Workload:
        candidates.extend(cands)
        return cands[0]

    first = decide(state, source, dst, choose=record)
    decisions = [first]
    for i in range(1, len(candidates)):

        def pick(cands: Sequence[Workload], i: int = i) -> Workload:
            return cands[i]

        decisions.append(decide(state, source, dst, choose=pick))
    svc = first.service
    result["destination"]["service"] = f"{svc.namespace}/{svc.hostname}" if svc else None
    result["route"] = first.route.name
    result["reason"] = first.reason
    hop = first.waypoint
    result["waypoint"] = _hop_json(hop, first) if hop is not None else None
    result["waypoint_reason"] = (
        hop.describe() if hop is not None else _why_no_waypoint(state, source, first)
    )
    what = "waypoint endpoints" if first.via_waypoint else "endpoints"
    result["selection"] = (
        f"one of {len(candidates)} healthy {what}, chosen at random per connection"
        if len(candidates) > 1
        else "the only endpoint"
        if candidates
        else "direct"
    )
    if first.route is Route.REFUSE:
        result["endpoints"] = []
        return result
    result["endpoints"] = [
        _endpoint_json(state, policies, source, d, in_process) for d in decisions
    ]
    return result
