"""Mesh values for tests: one default of each, and builders that override only what a
test is about (as upstream ztunnel's `..Default::default()` and `workload_builder`).

    workload(name="b", ips=ips("10.244.2.20"), services=serves(SVC, {80: 9090}))

`workload(**kw)` is `dataclasses.replace(DEFAULT_WORKLOAD, **kw)`, plus one convenience:
a workload given a new name or namespace but no uid gets a uid of its own, so two
workloads built for one state never collide. `service(**kw)` likewise derives the
hostname from a new name or namespace.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from ipaddress import ip_address
from typing import Any

from meshcore.sockets import SocketAddr
from meshcore.state import (
    HealthStatus,
    IPAddress,
    MeshState,
    NetworkAddress,
    RawPolicy,
    Service,
    ServicePort,
    ServicePortMap,
    TunnelProtocol,
    Workload,
)

TRUST_DOMAIN = "cluster.local"
ROOT_NAMESPACE = "istio-system"


def addr(text: str) -> SocketAddr:
    """`ip:port` or `[v6]:port` as a SocketAddr."""
    host, _, port = text.rpartition(":")
    return SocketAddr(ip_address(host.strip("[]")), int(port))


def ips(*texts: str) -> tuple[IPAddress, ...]:
    return tuple(ip_address(t) for t in texts)


def vips(*texts: str, network: str = "") -> tuple[NetworkAddress, ...]:
    return tuple(NetworkAddress(network, ip_address(t)) for t in texts)


def ports(mapping: Mapping[int, int]) -> tuple[ServicePort, ...]:
    """A service's ports, `{service port: target port}`."""
    return tuple(ServicePort(p, t) for p, t in sorted(mapping.items()))


DEFAULT_WORKLOAD = Workload(
    uid="Kubernetes//Pod/default/pod",
    name="pod",
    namespace="default",
    service_account="default",
    trust_domain=TRUST_DOMAIN,
    ips=ips("10.244.1.10"),
    network="",
    protocol=TunnelProtocol.HBONE,
    node="node1",
    canonical_name="pod",
    canonical_revision="latest",
    workload_name="pod",
    workload_type="deployment",
    cluster_id="Kubernetes",
    status=HealthStatus.HEALTHY,
    waypoint=None,
    services=(),
)

DEFAULT_SERVICE = Service(
    name="svc",
    namespace="default",
    hostname="svc.default.svc.cluster.local",
    vips=vips("10.96.0.10"),
    ports=ports({80: 8080}),
    subject_alt_names=(),
    waypoint=None,
)


def workload(**kw: Any) -> Workload:
    if "uid" not in kw and ("name" in kw or "namespace" in kw):
        ns = kw.get("namespace", DEFAULT_WORKLOAD.namespace)
        kw["uid"] = f"Kubernetes//Pod/{ns}/{kw.get('name', DEFAULT_WORKLOAD.name)}"
    return dataclasses.replace(DEFAULT_WORKLOAD, **kw)


def service(**kw: Any) -> Service:
    if "hostname" not in kw and ("name" in kw or "namespace" in kw):
        ns = kw.get("namespace", DEFAULT_SERVICE.namespace)
        kw["hostname"] = f"{kw.get('name', DEFAULT_SERVICE.name)}.{ns}.svc.cluster.local"
    return dataclasses.replace(DEFAULT_SERVICE, **kw)


def serves(*entries: tuple[Service | str, Mapping[int, int]]) -> ServicePortMap:
    """A workload's `services` map: (service or "ns/hostname", {service port: its own
    target port}) pairs, sorted as the config parser sorts them."""
    out = []
    for svc, mapping in entries:
        key = svc.key if isinstance(svc, Service) else svc
        out.append((key, tuple(sorted(mapping.items()))))
    return tuple(sorted(out))


def mesh_state(
    workloads: Iterable[Workload] = (),
    services: Iterable[Service] = (),
    policies: Iterable[RawPolicy] = (),
) -> MeshState:
    return MeshState.build(workloads, services, policies)


def authorization_policy(
    name: str,
    spec: Any,
    namespace: str = DEFAULT_WORKLOAD.namespace,
    annotations: Mapping[str, Any] | None = None,
) -> RawPolicy:
    """An AuthorizationPolicy as users write it (the Istio resource)."""
    return _resource(
        "AuthorizationPolicy", "security.istio.io/v1", name, spec, namespace, annotations
    )


def peer_authentication(
    name: str, spec: Any, namespace: str = DEFAULT_WORKLOAD.namespace
) -> RawPolicy:
    """A PeerAuthentication as users write it (the Istio resource)."""
    return _resource("PeerAuthentication", "security.istio.io/v1beta1", name, spec, namespace, None)


def _resource(
    kind: str,
    api_version: str,
    name: str,
    spec: Any,
    namespace: str,
    annotations: Mapping[str, Any] | None,
) -> RawPolicy:
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if annotations is not None:
        meta["annotations"] = dict(annotations)
    entry = {"apiVersion": api_version, "kind": kind, "metadata": meta, "spec": spec}
    return RawPolicy.from_mapping(name, namespace, entry, kind=kind)


# -- an example mesh the decision tables share ------------------------------------------------
# A client pod in namespace `shop` (node1) calls the `web` service, whose pods run on node2;
# `legacy` is a service outside the mesh.

CLIENT_POD = workload(
    name="client-0",
    namespace="shop",
    service_account="client",
    ips=ips("10.244.1.10"),
    canonical_name="client",
    canonical_revision="v1",
    workload_name="client",
)
WEB_SERVICE = service(
    name="web", namespace="shop", vips=vips("10.96.0.20"), ports=ports({80: 8080})
)
LEGACY_SERVICE = service(name="legacy", namespace="legacy", vips=vips("10.96.0.30"))
LEGACY_POD = workload(
    name="legacy-0",
    namespace="legacy",
    ips=ips("10.244.3.30"),
    protocol=TunnelProtocol.NONE,
    services=serves((LEGACY_SERVICE, {})),
)


def web_pod(name: str, *addresses: str, **kw: Any) -> Workload:
    """A pod of the `web` service (labelled app=web, on node2, no port map of its own
    unless `services` says otherwise)."""
    fields: dict[str, Any] = {
        "namespace": "shop",
        "service_account": "web",
        "node": "node2",
        "labels": (("app", "web"),),
        "services": serves((WEB_SERVICE, {})),
    }
    return workload(name=name, ips=ips(*addresses), **{**fields, **kw})
