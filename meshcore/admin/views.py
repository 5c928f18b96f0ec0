"""JSON views of the mesh state for admin endpoints (config dumps, `explain`): the same
shape whichever proxy serves them."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from meshcore.identity.certs import WorkloadCertificate
from meshcore.identity.spiffe import SpiffeId
from meshcore.policy.index import PolicyIndex
from meshcore.state import GatewayAddress, MeshState, Service, TunnelProtocol, Workload


def _time(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def waypoint_json(gw: GatewayAddress | None) -> dict[str, Any] | None:
    """A waypoint binding: where it is reached and whether it fails open."""
    if gw is None:
        return None
    return {
        "hostname": gw.hostname,
        "address": str(gw.address) if gw.address is not None else None,
        "hboneMtlsPort": gw.hbone_port,
        "failOpen": gw.fail_open,
    }


def workload_json(w: Workload) -> dict[str, Any]:
    return {
        "uid": w.uid,
        "name": w.name,
        "namespace": w.namespace,
        "serviceAccount": w.service_account,
        "identity": str(w.identity),
        "ips": [str(ip) for ip in w.ips],
        "network": w.network,
        "node": w.node,
        "protocol": "HBONE" if w.protocol is TunnelProtocol.HBONE else "TCP",
        "status": w.status.value,
        "canonicalName": w.canonical_name,
        "canonicalRevision": w.canonical_revision,
        "labels": dict(w.labels),
        "authorizationPolicies": list(w.authorization_policies),
        "services": {key: {str(sp): tp for sp, tp in ports} for key, ports in w.services},
        # "waypoint" names it ("ns/host", or the address); the details are beside it.
        "waypoint": str(w.waypoint) if w.waypoint is not None else None,
        "waypointAddress": waypoint_json(w.waypoint),
    }


def service_json(state: MeshState, s: Service) -> dict[str, Any]:
    return {
        "name": s.name,
        "namespace": s.namespace,
        "hostname": s.hostname,
        "vips": [f"{v.network}/{v.ip}" for v in s.vips],
        "ports": {str(p.port): p.target_port for p in s.ports},
        # Each port's name and protocol by Istio's rule (what a waypoint acts on).
        "portProtocols": {
            str(p.port): {"name": p.name or None, "protocol": p.protocol.value} for p in s.ports
        },
        "subjectAltNames": list(s.subject_alt_names),
        "waypoint": str(s.waypoint) if s.waypoint is not None else None,
        "waypointAddress": waypoint_json(s.waypoint),
        "endpoints": [w.uid for w in state.endpoints(s)],
    }


def certificates_json(
    held: Iterable[WorkloadCertificate], wanted: Iterable[SpiffeId]
) -> list[dict[str, Any]]:
    """Each certificate held (serial, validity, state), and each identity still waiting
    for its first one (`pending`), sorted by identity."""
    now = datetime.now(UTC)
    out: dict[str, dict[str, Any]] = {}
    for c in held:
        out[str(c.identity)] = {
            "identity": str(c.identity),
            "serial": f"{c.serial:x}",
            "notBefore": _time(c.not_before),
            "notAfter": _time(c.not_after),
            "state": "valid" if c.not_before <= now < c.not_after else "expired",
        }
    for identity in wanted:
        out.setdefault(str(identity), {"identity": str(identity), "state": "pending"})
    return [out[k] for k in sorted(out)]


def mesh_json(state: MeshState, policies: PolicyIndex) -> dict[str, Any]:
    """What the proxy knows of the mesh: workloads, services, and the policies in force
    (with their warnings and errors)."""
    return {
        "rootNamespace": policies.root_namespace,
        "workloads": [workload_json(w) for w in state.workloads],
        "services": [service_json(state, s) for s in state.services],
        "policies": [p.to_json() for p in policies.policies],
        "peerAuthentications": policies.peer_authentications_json(),
        "policyErrors": list(policies.errors),
        # The L7 resources (HTTPRoute, VirtualService, ...) carried for waypoints.
        "resources": [
            {"kind": r.kind, "namespace": r.namespace, "name": r.name} for r in state.l7_resources
        ],
    }
