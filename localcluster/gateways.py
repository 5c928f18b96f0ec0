"""Waypoints as Kubernetes users declare them: a Gateway API `Gateway` of class
`istio-waypoint`. Pure: checks a resource, places it, computes its status.

A waypoint Gateway has one listener `{name: mesh, port: 15008, protocol: HBONE}`, the
label `istio.io/waypoint-for` (service, the default | workload | all | none) and may carry
the annotation `ambient-mesh.io/waypoint-fail-open: "true"` (the tunnels then go straight
to the destination while the waypoint is missing or unready, as upstream does; ours fails
closed otherwise). The local cluster realises each one as istiod's deployment controller
would: a pod (`<name>-0`, service account `<name>`, never captured) and a Service
`<name>.<ns>.svc.cluster.local` with a VIP and port 15008.

Placement (node, pod IP, VIP, slot) is chosen once, when the Gateway is first applied, and
recorded with it: a later apply or delete of another Gateway never moves it.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from controlplane.bindings import SAME_NAMESPACE, AllowedNamespaces, allowed_namespaces
from meshcore.defaults import NAMESPACE as DEFAULT_NAMESPACE

GATEWAY_KIND = "Gateway"
GATEWAY_API_VERSIONS = ("gateway.networking.k8s.io/v1", "gateway.networking.k8s.io/v1beta1")
WAYPOINT_CLASS = "istio-waypoint"
WAYPOINT_FOR_LABEL = "istio.io/waypoint-for"
WAYPOINT_FOR = ("service", "workload", "all", "none")
DEFAULT_WAYPOINT_FOR = "service"
FAIL_OPEN_ANNOTATION = "ambient-mesh.io/waypoint-fail-open"
GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"
HBONE_LISTENER = {"name": "mesh", "port": 15008, "protocol": "HBONE"}
HBONE_PORT = 15008
DEFAULT_NAME = "waypoint"
# The pod is `<name>-0`, so the name leaves room for the suffix within a DNS label.
MAX_NAME = 61
_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_ALLOWED_TOP = frozenset({"apiVersion", "kind", "metadata", "spec", "status"})
_ALLOWED_META = frozenset({"name", "namespace", "labels", "annotations"})
_ALLOWED_SPEC = frozenset({"gatewayClassName", "listeners"})
_ALLOWED_LISTENER = frozenset({"name", "port", "protocol", "allowedRoutes"})


class GatewayError(ValueError):
    """A Gateway that cannot be a waypoint; the message names the field and what to fix."""


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a waypoint runs: its node, pod IP, Service VIP and its slot on the node (the
    `w<slot>` of its network namespace name)."""

    node: str
    ip: IPv4Address
    vip: IPv4Address
    slot: int


@dataclass(frozen=True, slots=True)
class GatewaySpec:
    """One waypoint Gateway, checked, with its defaults and (once placed) its placement."""

    name: str
    namespace: str
    waypoint_for: str
    fail_open: bool
    doc: str  # canonical JSON of the resource as applied (status removed)
    placement: Placement | None = None
    # Who may bind from other namespaces (the listener's allowedRoutes.namespaces).
    allowed: AllowedNamespaces = SAME_NAMESPACE

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    @property
    def hostname(self) -> str:
        return f"{self.name}.{self.namespace}.svc.cluster.local"

    @property
    def pod_name(self) -> str:
        return f"{self.name}-0"

    @property
    def service_account(self) -> str:
        return self.name

    def resource(self) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads(self.doc)
        return loaded

    def placed(self) -> Placement:
        if self.placement is None:
            raise GatewayError(f"waypoint {self.namespace}/{self.name} has not been placed")
        return self.placement


def is_waypoint_gateway(doc: Any) -> bool:
    """A Gateway of class istio-waypoint (others are kept verbatim, not realised)."""
    if not isinstance(doc, Mapping) or doc.get("kind") != GATEWAY_KIND:
        return False
    spec = doc.get("spec")
    return isinstance(spec, Mapping) and spec.get("gatewayClassName") == WAYPOINT_CLASS


def waypoint_resource(
    name: str, namespace: str, waypoint_for: str = DEFAULT_WAYPOINT_FOR, fail_open: bool = False
) -> dict[str, Any]:
    """The Gateway `istioctl waypoint apply` writes."""
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if waypoint_for != DEFAULT_WAYPOINT_FOR:
        meta["labels"] = {WAYPOINT_FOR_LABEL: waypoint_for}
    if fail_open:
        meta["annotations"] = {FAIL_OPEN_ANNOTATION: "true"}
    return {
        "apiVersion": GATEWAY_API_VERSIONS[0],
        "kind": GATEWAY_KIND,
        "metadata": meta,
        "spec": {"gatewayClassName": WAYPOINT_CLASS, "listeners": [dict(HBONE_LISTENER)]},
    }


def parse_gateway(doc: Any, where: str) -> GatewaySpec:
    """Check a waypoint Gateway strictly (unknown fields refused); namespace defaults to
    `default`, as kubectl fills it in. Raises GatewayError."""

    def fail(path: str, message: str) -> GatewayError:
        return GatewayError(f"{where}{'.' + path if path else ''}: {message}")

    if not isinstance(doc, Mapping):
        raise fail("", f"expected a Gateway resource (a mapping), got {type(doc).__name__}")
    _keys(doc, _ALLOWED_TOP, "", fail)
    if doc.get("apiVersion") not in GATEWAY_API_VERSIONS:
        raise fail("apiVersion", f"{doc.get('apiVersion')!r} is not one of {GATEWAY_API_VERSIONS}")
    if doc.get("kind") != GATEWAY_KIND:
        raise fail("kind", f"{doc.get('kind')!r} is not {GATEWAY_KIND!r}")
    meta = doc.get("metadata")
    if not isinstance(meta, Mapping):
        raise fail("metadata", "must be a mapping with a name")
    _keys(meta, _ALLOWED_META, "metadata", fail)
    name = meta.get("name")
    if not isinstance(name, str) or not _DNS_LABEL.match(name) or len(name) > MAX_NAME:
        raise fail(
            "metadata.name", f"{name!r} must be a DNS label of at most {MAX_NAME} characters"
        )
    namespace = meta.get("namespace") or DEFAULT_NAMESPACE
    if not isinstance(namespace, str) or not _DNS_LABEL.match(namespace):
        raise fail("metadata.namespace", f"{namespace!r} must be a DNS label")
    labels = _string_map(meta.get("labels"), "metadata.labels", fail)
    annotations = _string_map(meta.get("annotations"), "metadata.annotations", fail)
    waypoint_for = labels.get(WAYPOINT_FOR_LABEL, DEFAULT_WAYPOINT_FOR)
    if waypoint_for not in WAYPOINT_FOR:
        raise fail(
            f"metadata.labels[{WAYPOINT_FOR_LABEL}]",
            f"{waypoint_for!r} is not one of {', '.join(WAYPOINT_FOR)}",
        )
    fail_open_text = annotations.get(FAIL_OPEN_ANNOTATION, "false")
    if fail_open_text not in ("true", "false"):
        raise fail(
            f"metadata.annotations[{FAIL_OPEN_ANNOTATION}]",
            f'{fail_open_text!r} must be "true" or "false"',
        )
    spec = doc.get("spec")
    if not isinstance(spec, Mapping):
        raise fail("spec", "must be a mapping")
    _keys(spec, _ALLOWED_SPEC, "spec", fail)
    if spec.get("gatewayClassName") != WAYPOINT_CLASS:
        raise fail(
            "spec.gatewayClassName",
            f"{spec.get('gatewayClassName')!r} is not {WAYPOINT_CLASS!r} (only waypoints run "
            "in the local cluster)",
        )
    listeners = spec.get("listeners")
    if not isinstance(listeners, list) or len(listeners) != 1:
        raise fail("spec.listeners", f"a waypoint has exactly one listener: {HBONE_LISTENER}")
    listener = listeners[0]
    if not isinstance(listener, Mapping):
        raise fail("spec.listeners[0]", "must be a mapping")
    _keys(listener, _ALLOWED_LISTENER, "spec.listeners[0]", fail)
    for key, want in HBONE_LISTENER.items():
        if listener.get(key) != want:
            raise fail(f"spec.listeners[0].{key}", f"{listener.get(key)!r} must be {want!r}")
    try:
        allowed = allowed_namespaces(listener)
    except ValueError as e:
        raise fail("spec.listeners[0]", str(e)) from None
    out = copy.deepcopy(dict(doc))
    out.pop("status", None)  # the status is ours to write, never the user's
    out["metadata"] = {**out["metadata"], "namespace": namespace}
    return GatewaySpec(
        name=name,
        namespace=namespace,
        waypoint_for=waypoint_for,
        fail_open=fail_open_text == "true",
        doc=json.dumps(out, sort_keys=True, separators=(",", ":")),
        allowed=allowed,
    )


def _keys(m: Mapping[Any, Any], allowed: Collection[str], path: str, fail: Any) -> None:
    unknown = sorted(str(k) for k in m if k not in allowed)
    if unknown:
        raise fail(path, f"unknown field(s) {', '.join(unknown)}; allowed: {sorted(allowed)}")


def _string_map(value: Any, path: str, fail: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise fail(path, "must be a mapping of strings to strings (quote values like true)")
    return dict(value)


# ---- placement (pure) ---------------------------------------------------------------------


def place(
    gateway: GatewaySpec,
    node: str,
    pod_cidr: IPv4Network,
    taken_ips: Collection[IPv4Address],
    service_cidr: IPv4Network,
    taken_vips: Collection[IPv4Address],
    taken_slots: Collection[int],
    first_host: int,
) -> GatewaySpec:
    """The gateway with the first free pod address of `node` (from `first_host`, gateway
    `.1` excluded), the first free VIP and the lowest free slot of that node."""
    ip = _first_free(pod_cidr, taken_ips, first_host, f"node {node}'s pod addresses")
    vip = _first_free(service_cidr, taken_vips, first_host, "service addresses")
    slot = 1
    while slot in taken_slots:
        slot += 1
    return replace(gateway, placement=Placement(node, ip, vip, slot))


def _first_free(
    network: IPv4Network, taken: Collection[IPv4Address], start: int, what: str
) -> IPv4Address:
    addr = network.network_address + start
    while addr in taken:
        addr += 1
    if addr not in network or addr == network.broadcast_address:
        raise GatewayError(f"no free address left in {network} ({what})")
    return addr


# ---- records (JSON) ------------------------------------------------------------------------


def to_record(gateway: GatewaySpec) -> dict[str, Any]:
    p = gateway.placed()
    return {
        "resource": gateway.resource(),
        "node": p.node,
        "ip": str(p.ip),
        "vip": str(p.vip),
        "slot": p.slot,
    }


def from_record(record: Any, where: str) -> GatewaySpec:
    """A recorded gateway (written by `to_record`); raises GatewayError if it was damaged."""
    if not isinstance(record, Mapping):
        raise GatewayError(f"{where}: not a gateway record")
    gw = parse_gateway(record.get("resource"), where)
    try:
        placement = Placement(
            node=str(record["node"]),
            ip=IPv4Address(record["ip"]),
            vip=IPv4Address(record["vip"]),
            slot=int(record["slot"]),
        )
    except (KeyError, ValueError, TypeError) as e:
        raise GatewayError(f"{where}: damaged placement: {e}") from None
    return replace(gw, placement=placement)


# ---- status (pure) -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Readiness:
    """What probing the waypoint found: `ready`, or why not (`reason`, `message`)."""

    ready: bool
    reason: str
    message: str


def status(gateway: GatewaySpec, readiness: Readiness) -> dict[str, Any]:
    """`status` as the Gateway API reports it: the Service's addresses, and conditions
    Accepted (the resource was admitted) and Programmed (the waypoint answers ready)."""
    p = gateway.placed()
    return {
        "addresses": [
            {"type": "IPAddress", "value": str(p.vip)},
            {"type": "Hostname", "value": gateway.hostname},
        ],
        "conditions": [
            {
                "type": "Accepted",
                "status": "True",
                "reason": "Accepted",
                "message": "Resource accepted",
            },
            {
                "type": "Programmed",
                "status": "True" if readiness.ready else "False",
                "reason": readiness.reason,
                "message": readiness.message,
            },
        ],
    }


def condition(status_doc: Mapping[str, Any], kind: str) -> Mapping[str, Any] | None:
    for c in status_doc.get("conditions") or ():
        if isinstance(c, Mapping) and c.get("type") == kind:
            return c
    return None


def sorted_gateways(gateways: Sequence[GatewaySpec]) -> list[GatewaySpec]:
    return sorted(gateways, key=lambda g: g.key)
