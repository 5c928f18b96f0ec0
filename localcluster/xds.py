"""The local-mode discovery document (LOCAL_XDS_PATH) derived from a ClusterSpec. Pure.

The output is plain data (dicts, lists, str, int) in the camelCase wire shape of
docs protocols.md "Workload discovery"; the caller serialises it as YAML. Service port maps
use int keys (service port -> target port), as the tunnel's local-file reader expects; a
port with a `name` or `appProtocol` maps to `{targetPort, name, appProtocol}` instead (the
waypoint chooses HTTP, gRPC or TCP by them).

Waypoint bindings are computed here, as istiod computes them (the label rules are
`controlplane.bindings`, shared with the Kubernetes control plane), from labels:
`istio.io/use-waypoint=<name>` on a Namespace, Service or Pod (the object's own label beats
its namespace's; `none` opts out) and `istio.io/use-waypoint-namespace=<ns>` beside it for a
waypoint in another namespace. A service binding takes effect when the Gateway's
`istio.io/waypoint-for` is service|all (-> `Service.waypoint`); a pod binding, or a namespace
binding, for workload|all (-> `Workload.waypoint`). A binding to a Gateway that does not
exist is still written (the tunnels then refuse the traffic: fail closed) and reported.
The L7 resources (HTTPRoute, GRPCRoute, VirtualService, DestinationRule,
RequestAuthentication, Gateway) go verbatim into one list, `RESOURCES_KEY`, for the waypoint.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# Re-exported: the local cluster's callers name the labels through this module.
from controlplane.bindings import (
    NO_WAYPOINT as NO_WAYPOINT,
)
from controlplane.bindings import (
    USE_WAYPOINT_LABEL as USE_WAYPOINT_LABEL,
)
from controlplane.bindings import (
    USE_WAYPOINT_NAMESPACE_LABEL as USE_WAYPOINT_NAMESPACE_LABEL,
)
from controlplane.bindings import (
    UseWaypoint,
    use_waypoint,
)
from controlplane.bindings import accepts as _accepts
from localcluster import gateways as gw
from localcluster.spec import ClusterSpec, PodSpec, ServiceSpec

CANONICAL_NAME_LABEL = "service.istio.io/canonical-name"
CANONICAL_REVISION_LABEL = "service.istio.io/canonical-revision"
DEFAULT_NETWORK = ""  # single-network cluster: VIPs are written "/<ip>"
# Where the L7 resources go in the document (the waypoint reads them; the tunnel keeps them
# verbatim). Only written when there are some, so a mesh without them reads as before.
RESOURCES_KEY = "resources"


def local_xds(
    spec: ClusterSpec,
    policies: Sequence[Mapping[str, Any]] | None = None,
    resources: Sequence[Mapping[str, Any]] = (),
    not_ready: frozenset[tuple[str, str]] = frozenset(),
) -> dict[str, Any]:
    """The whole document; `policies` (the ones applied since) replace the cluster file's;
    `resources` are the L7 resources in force (the waypoint Gateways are added to them);
    `not_ready`: (namespace, pod) whose app is not running, written Unhealthy so no tunnel
    or waypoint picks them as an endpoint (Kubernetes drops a not-ready pod from its
    Services' endpoints)."""
    doc: dict[str, Any] = {
        "workloads": [
            workload(spec, pod, (pod.namespace, pod.name) not in not_ready)
            for pod in spec.all_pods()
        ],
        "services": [service(svc, spec) for svc in spec.all_services()],
        "policies": (
            [json.loads(p) for p in spec.policies]
            if policies is None
            else [dict(p) for p in policies]
        ),
    }
    l7 = [dict(r) for r in resources] + [g.resource() for g in spec.gateways]
    l7 += [json.loads(e) for e in spec.service_entries]
    if l7:
        doc[RESOURCES_KEY] = l7
    return doc


# ---- waypoint bindings (pure) ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Binding:
    """What a service or workload is bound to: `waypoint` (None: not bound), and `problem`,
    why a label does not take effect as written (or why the bound waypoint is missing)."""

    waypoint: UseWaypoint | None
    problem: str | None = None
    fail_open: bool = False

    def address(self) -> dict[str, Any] | None:
        """The GatewayAddress of the mesh config: the waypoint Service's hostname."""
        if self.waypoint is None:
            return None
        ns, name = self.waypoint.namespace, self.waypoint.name
        out: dict[str, Any] = {
            "hostname": f"{ns}/{name}.{ns}.svc.cluster.local",
            "hboneMtlsPort": gw.HBONE_PORT,
        }
        if self.fail_open:
            out["failOpen"] = True  # written only when set: false is the default
        return out


NOT_BOUND = Binding(None)


def service_binding(spec: ClusterSpec, svc: ServiceSpec) -> Binding:
    """Service.waypoint: bound when the label in force names a Gateway for service|all."""
    if svc.gateway:
        return NOT_BOUND  # a waypoint's own Service is never sent to a waypoint
    ref = use_waypoint(svc.labels, spec.namespace(svc.namespace).labels, svc.namespace, "service")
    if ref is None:
        return NOT_BOUND
    where = f"service {svc.namespace}/{svc.name} ({ref.source} label)"
    g = spec.gateway(ref.namespace, ref.name)
    if g is None:
        return Binding(
            ref,
            f"{where}: no waypoint {ref.namespace}/{ref.name}; its traffic is refused until "
            "that Gateway exists",
        )
    ns_labels = spec.namespace(svc.namespace).labels
    if not g.allowed.allows(ref.namespace, svc.namespace, ns_labels):
        return Binding(
            None,
            f"{where}: waypoint {ref.namespace}/{ref.name} does not take namespace "
            f"{svc.namespace}: {g.allowed.describe()}; not bound",
        )
    if not _accepts(g.waypoint_for, "service"):
        return Binding(
            None,
            f"{where}: waypoint {ref.namespace}/{ref.name} is for {g.waypoint_for!r} traffic, "
            "not service traffic (istio.io/waypoint-for: service or all); not bound",
        )
    return Binding(ref, fail_open=g.fail_open)


def workload_binding(spec: ClusterSpec, pod: PodSpec) -> Binding:
    """Workload.waypoint: bound when the label in force names a Gateway for workload|all."""
    if pod.is_waypoint:
        return NOT_BOUND  # a waypoint never sends its own traffic to a waypoint
    ref = use_waypoint(pod.labels, spec.namespace(pod.namespace).labels, pod.namespace, "pod")
    if ref is None:
        return NOT_BOUND
    where = f"pod {pod.namespace}/{pod.name} ({ref.source} label)"
    g = spec.gateway(ref.namespace, ref.name)
    if g is None:
        if ref.source != "pod":
            # A namespace binding to a missing Gateway: its default waypoint-for is service,
            # so the workloads are not bound (the services are, and say so).
            return NOT_BOUND
        return Binding(
            ref,
            f"{where}: no waypoint {ref.namespace}/{ref.name}; its traffic is refused until "
            "that Gateway exists",
        )
    if not g.allowed.allows(ref.namespace, pod.namespace, spec.namespace(pod.namespace).labels):
        if ref.source != "pod":
            return NOT_BOUND  # said once, for the namespace's services
        return Binding(
            None,
            f"{where}: waypoint {ref.namespace}/{ref.name} does not take namespace "
            f"{pod.namespace}: {g.allowed.describe()}; not bound",
        )
    if not _accepts(g.waypoint_for, "workload"):
        if ref.source != "pod":
            return NOT_BOUND  # the namespace's waypoint serves its services only: as meant
        return Binding(
            None,
            f"{where}: waypoint {ref.namespace}/{ref.name} is for {g.waypoint_for!r} traffic, "
            "not workload traffic (istio.io/waypoint-for: workload or all); not bound",
        )
    return Binding(ref, fail_open=g.fail_open)


def binding_problems(spec: ClusterSpec) -> list[str]:
    """Every waypoint label that does not take effect as written, or names a missing waypoint."""
    out = [service_binding(spec, s).problem for s in spec.services]
    out += [workload_binding(spec, p).problem for p in spec.pods]
    return [p for p in out if p is not None]


def workload_uid(spec: ClusterSpec, pod: PodSpec) -> str:
    return f"{spec.name}//Pod/{pod.namespace}/{pod.name}"


def canonical_name(pod: PodSpec) -> str:
    # The explicit Istio label wins over `app`, as in Istio's own derivation.
    return pod.labels.get(CANONICAL_NAME_LABEL) or pod.labels.get("app") or pod.name


def canonical_revision(pod: PodSpec) -> str:
    return pod.labels.get(CANONICAL_REVISION_LABEL) or pod.labels.get("version") or "latest"


def port_map(svc: ServiceSpec) -> dict[int, int]:
    return {p.port: p.target_port for p in svc.ports}


def service_ports(svc: ServiceSpec) -> dict[int, Any]:
    """The Service's ports: `port: targetPort`, or `port: {targetPort, name, appProtocol}`
    for a port that declares a name or an appProtocol."""
    out: dict[int, Any] = {}
    for p in svc.ports:
        if not (p.name or p.app_protocol):
            out[p.port] = p.target_port
            continue
        entry: dict[str, Any] = {"targetPort": p.target_port}
        if p.name:
            entry["name"] = p.name
        if p.app_protocol:
            entry["appProtocol"] = p.app_protocol
        out[p.port] = entry
    return out


def workload(spec: ClusterSpec, pod: PodSpec, healthy: bool = True) -> dict[str, Any]:
    out = {
        "uid": workload_uid(spec, pod),
        "name": pod.name,
        "namespace": pod.namespace,
        "serviceAccount": pod.service_account,
        "trustDomain": spec.trust_domain,
        "workloadIps": [str(pod.ip)],
        # A waypoint is never captured, yet speaks HBONE on 15008 itself: tunnels reach it so.
        "protocol": "HBONE" if pod.enrolled(spec) or pod.is_waypoint else "TCP",
        "node": pod.node,
        "canonicalName": canonical_name(pod),
        "canonicalRevision": canonical_revision(pod),
        "workloadName": pod.workload_name,
        "workloadType": "pod",
        "clusterId": spec.name,
        "status": "Healthy" if healthy else "Unhealthy",
        "services": {f"{s.namespace}/{s.hostname}": port_map(s) for s in spec.services_for(pod)},
        "labels": dict(pod.labels),
    }
    address = workload_binding(spec, pod).address()
    if address is not None:
        out["waypoint"] = address
    return out


def service(svc: ServiceSpec, spec: ClusterSpec | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": svc.name,
        "namespace": svc.namespace,
        "hostname": svc.hostname,
        "vips": [f"{DEFAULT_NETWORK}/{svc.vip}"],
        "ports": service_ports(svc),
        "subjectAltNames": [],
    }
    address = service_binding(spec, svc).address() if spec is not None else None
    if address is not None:
        out["waypoint"] = address
    return out
