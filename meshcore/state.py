"""The tunnel's view of the mesh: workloads, services and policies, and their lookups.

Domain types here are frozen values built once at the edge (see `meshcore.discovery`); nothing
inside them is a raw dict, so a snapshot can be shared between tasks without copying.

Invariants of a `MeshState` (checked by `MeshState.build`, which raises `MeshConfigError`):
- workload uids are unique; no two workloads claim the same (network, IP);
- service keys ("namespace/hostname") are unique, hostnames are unique, and no two services
  claim the same (network, VIP);
- policy keys ("namespace/name") are unique per kind, and so are the keys of the raw L7
  resources (HTTPRoute, VirtualService, ...) per kind;
- every host of a ServiceEntry has its service ("namespace/host").
A `MeshState` never changes after it is built: a config change builds a new snapshot and the
holder swaps the reference, so a connection that looked up a workload keeps a consistent view.
Every lookup is a single dict access; building is linear in the size of the input.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import json
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from meshcore.defaults import HBONE_PORT
from meshcore.identity.spiffe import SpiffeId
from meshcore.serviceentry import ServiceEntry
from meshcore.sockets import parse_ip

_T = TypeVar("_T")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class MeshConfigError(ValueError):
    """Mesh configuration that cannot be used; the message names the offending entry."""


class TunnelProtocol(enum.Enum):
    """How traffic reaches a workload: plain TCP (not enrolled) or HBONE (enrolled)."""

    NONE = "NONE"
    HBONE = "HBONE"


class HealthStatus(enum.Enum):
    HEALTHY = "HEALTHY"
    UNHEALTHY = "UNHEALTHY"


def _check_port(port: int, what: str) -> None:
    # bool is an int subclass; True as a port is always a typo in config.
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise MeshConfigError(f"{what}: port {port!r} is not in 1..65535")


@dataclass(frozen=True, slots=True, order=True)
class NetworkAddress:
    """An IP on a named network; the same IP on two networks is two different addresses."""

    network: str
    ip: IPAddress

    def __str__(self) -> str:
        return f"{self.network}/{self.ip}"


@dataclass(frozen=True, slots=True)
class GatewayAddress:
    """Where a waypoint is reached: exactly one of a service hostname ("ns/host") or an address.

    `hbone_port` is the waypoint's HBONE listener (15008 unless the waypoint says otherwise).
    `fail_open` is ours, not Istio's: when the waypoint is missing or has no ready endpoint,
    a tunnel refuses the connection (False, the default) or goes straight to the destination
    as if no waypoint were bound (True).
    """

    hostname: str | None = None
    address: NetworkAddress | None = None
    hbone_port: int = HBONE_PORT
    fail_open: bool = False

    def __str__(self) -> str:
        where = self.hostname if self.hostname is not None else str(self.address)
        return where if self.hbone_port == HBONE_PORT else f"{where}:{self.hbone_port}"

    def __post_init__(self) -> None:
        if (self.hostname is None) == (self.address is None):
            raise MeshConfigError("a waypoint needs exactly one of a hostname or an address")
        if self.hostname is not None and self.hostname.count("/") != 1:
            raise MeshConfigError(
                f"waypoint hostname {self.hostname!r} must be of the form 'namespace/hostname'"
            )
        _check_port(self.hbone_port, "waypoint hboneMtlsPort")


# ("ns/hostname", ((service_port, target_port), ...)), sorted, so equal maps compare equal.
ServicePortMap = tuple[tuple[str, tuple[tuple[int, int], ...]], ...]


@functools.lru_cache(maxsize=16384)
def _identity(trust_domain: str, namespace: str, service_account: str) -> SpiffeId:
    # One shared object per identity: the data path asks for a workload's identity several
    # times per connection, and the table entries of open connections hold it.
    return SpiffeId(trust_domain, namespace, service_account)


@dataclass(frozen=True, slots=True)
class Workload:
    """One pod (or other endpoint) as the tunnel sees it."""

    uid: str
    name: str
    namespace: str
    service_account: str
    trust_domain: str
    ips: tuple[IPAddress, ...]
    network: str
    protocol: TunnelProtocol
    node: str
    canonical_name: str
    canonical_revision: str
    workload_name: str
    workload_type: str
    cluster_id: str
    status: HealthStatus
    waypoint: GatewayAddress | None
    services: ServicePortMap
    # Pod labels, sorted by key: workload-selector policies match against them.
    labels: tuple[tuple[str, str], ...] = ()
    # Policies ("namespace/name") the control plane attached to this workload, as istiod
    # does in Workload.authorization_policies; selector matching adds to these.
    authorization_policies: tuple[str, ...] = ()

    @property
    def identity(self) -> SpiffeId:
        return _identity(self.trust_domain, self.namespace, self.service_account)

    @property
    def addresses(self) -> tuple[NetworkAddress, ...]:
        return tuple(NetworkAddress(self.network, ip) for ip in self.ips)

    @property
    def service_keys(self) -> tuple[str, ...]:
        return tuple(key for key, _ in self.services)

    def target_port(self, service_key: str, service_port: int) -> int | None:
        """The workload's own port for `service_port` of a service, if it declares one.

        None means the workload has no mapping: the caller falls back to the service's
        target port. The maps are a handful of entries, so a scan beats building dicts.
        """
        for key, ports in self.services:
            if key == service_key:
                for port, target in ports:
                    if port == service_port:
                        return target
                return None
        return None


class AppProtocol(enum.StrEnum):
    """A port's declared application protocol: istio.workload's `AppProtocol` values.

    A StrEnum so a port (an ordered value) compares whatever its protocol."""

    UNKNOWN = "UNKNOWN"
    HTTP11 = "HTTP11"
    HTTP2 = "HTTP2"
    GRPC = "GRPC"
    TCP = "TCP"
    TLS = "TLS"


# Istio's protocol names (`protocol.Parse`, case-insensitive), as they appear in a port's
# `appProtocol` or before the first '-' of its name, mapped to the AppProtocol the
# waypoint acts on. Server-first protocols (mysql, mongo, redis) are TCP: never sniffed.
_ISTIO_PROTOCOLS: Mapping[str, AppProtocol] = {
    "http": AppProtocol.HTTP11,
    "http_proxy": AppProtocol.HTTP11,
    "grpc-web": AppProtocol.HTTP11,
    "http2": AppProtocol.HTTP2,
    "grpc": AppProtocol.GRPC,
    "tcp": AppProtocol.TCP,
    "mongo": AppProtocol.TCP,
    "mysql": AppProtocol.TCP,
    "redis": AppProtocol.TCP,
    "tls": AppProtocol.TLS,
    "https": AppProtocol.TLS,
}
# Kubernetes' well-known appProtocol values (KEP-3726), accepted only as appProtocol.
_K8S_APP_PROTOCOLS: Mapping[str, AppProtocol] = {
    "kubernetes.io/h2c": AppProtocol.HTTP2,
    "kubernetes.io/ws": AppProtocol.HTTP11,
    "kubernetes.io/wss": AppProtocol.TLS,
}
APP_PROTOCOL_NAMES: tuple[str, ...] = (
    *(p.value for p in AppProtocol),
    *_ISTIO_PROTOCOLS,
    *_K8S_APP_PROTOCOLS,
)


def parse_app_protocol(value: str) -> AppProtocol:
    """An `appProtocol` as written: an AppProtocol name (HTTP11, GRPC, ...), an Istio
    protocol name (http, http2, grpc, tcp, tls, ...) or a Kubernetes one
    (kubernetes.io/h2c, ...); any case. Anything else is a `ValueError`."""
    if value in AppProtocol.__members__:
        return AppProtocol[value]
    lowered = value.lower()
    found = _ISTIO_PROTOCOLS.get(lowered) or _K8S_APP_PROTOCOLS.get(lowered)
    if found is None and value.upper() in AppProtocol.__members__:
        found = AppProtocol[value.upper()]
    if found is None:
        raise ValueError(f"{value!r} is not one of {', '.join(APP_PROTOCOL_NAMES)}")
    return found


@dataclass(frozen=True, slots=True, order=True)
class ServicePort:
    port: int
    target_port: int
    # The port's name ("http-web"): Istio reads the protocol from its prefix.
    name: str = ""
    # The declared protocol; None when the port declares none (Istio's UNKNOWN = 0).
    app_protocol: AppProtocol | None = None

    def __post_init__(self) -> None:
        _check_port(self.port, "service port")
        _check_port(self.target_port, f"target port of service port {self.port}")

    @property
    def protocol(self) -> AppProtocol:
        """Istio's rule: `appProtocol` first, else the name's prefix before the first '-'
        (`http`, `http2`, `grpc`, `tcp`, `tls`, ...), else UNKNOWN (the waypoint sniffs)."""
        if self.app_protocol is not None:
            return self.app_protocol
        prefix = self.name.split("-", 1)[0].lower()
        if prefix == "grpc" and self.name.lower().startswith("grpc-web"):
            return AppProtocol.HTTP11  # "grpc-web" is a name of its own, not grpc + "-web"
        return _ISTIO_PROTOCOLS.get(prefix, AppProtocol.UNKNOWN)


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    namespace: str
    hostname: str
    vips: tuple[NetworkAddress, ...]
    ports: tuple[ServicePort, ...]
    subject_alt_names: tuple[str, ...]
    waypoint: GatewayAddress | None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.hostname}"

    def target_port(self, port: int) -> int | None:
        for entry in self.ports:
            if entry.port == port:
                return entry.target_port
        return None

    def port(self, port: int) -> ServicePort | None:
        for entry in self.ports:
            if entry.port == port:
                return entry
        return None


def port_protocol(service: Service, port: int) -> AppProtocol:
    """The protocol of `service`'s port `port` by Istio's rule (`ServicePort.protocol`);
    UNKNOWN for a port the service does not declare."""
    entry = service.port(port)
    return AppProtocol.UNKNOWN if entry is None else entry.protocol


@dataclass(frozen=True, slots=True)
class RawPolicy:
    """An authorization policy kept verbatim until the policy module parses it.

    `spec_json` is canonical JSON (sorted keys, no whitespace) of the whole entry, so two
    equal policies compare and hash equal and nothing from the source is lost.
    """

    name: str
    namespace: str
    spec_json: str
    # "AuthorizationPolicy" (also the xDS-style entries without a kind) or
    # "PeerAuthentication".
    kind: str = "AuthorizationPolicy"

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def spec(self) -> Any:
        """A fresh decoded copy of the entry (mutating it cannot change this policy)."""
        return json.loads(self.spec_json)

    @classmethod
    def from_mapping(
        cls,
        name: str,
        namespace: str,
        entry: Mapping[str, Any],
        kind: str = "AuthorizationPolicy",
    ) -> RawPolicy:
        try:
            text = json.dumps(entry, sort_keys=True, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise MeshConfigError(
                f"policy {namespace}/{name} is not plain JSON data: {exc}"
            ) from exc
        return cls(name, namespace, text, kind)


# The L7 resources a mesh config may carry for waypoints. The tunnel checks only their
# metadata (kind, name, namespace); the waypoint parses their spec with its own parsers.
L7_KINDS = frozenset(
    {
        "HTTPRoute",
        "GRPCRoute",
        "VirtualService",
        "DestinationRule",
        "RequestAuthentication",
        "Gateway",
    }
)


@dataclass(frozen=True, slots=True)
class RawResource:
    """A resource of the mesh config kept verbatim (an L7 resource, or a policy seen through
    `MeshState.resources`). `spec_json` is canonical JSON (sorted keys, no whitespace) of the
    whole document, so equal resources compare and hash equal and nothing is lost."""

    kind: str
    name: str
    namespace: str
    spec_json: str

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def document(self) -> Any:
        """A fresh decoded copy of the whole document (mutating it changes nothing here)."""
        return json.loads(self.spec_json)

    @classmethod
    def from_mapping(
        cls, kind: str, name: str, namespace: str, entry: Mapping[str, Any]
    ) -> RawResource:
        try:
            text = json.dumps(entry, sort_keys=True, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise MeshConfigError(
                f"{kind} {namespace}/{name} is not plain JSON data: {exc}"
            ) from exc
        return cls(kind, name, namespace, text)


@dataclass(frozen=True, slots=True)
class WaypointEndpoint:
    """One place a waypoint can be reached: its workload, the IP to dial, its HBONE port."""

    workload: Workload
    ip: IPAddress
    hbone_port: int


def _prefer_family(w: Workload, version: int | None) -> IPAddress:
    # The caller's address family when the workload has it (as upstream adapts a
    # hostname-addressed waypoint to the caller's family), else its first address.
    if version is not None:
        for ip in w.ips:
            if ip.version == version:
                return ip
    return w.ips[0]


def _workload_order(w: Workload) -> str:
    return w.uid


@dataclass(frozen=True, slots=True, eq=False)
class MeshState:
    """An immutable snapshot of the mesh with O(1) indexes. Build it with `MeshState.build`."""

    _workloads: tuple[Workload, ...]
    _services: tuple[Service, ...]
    _policies: tuple[RawPolicy, ...]
    _resources: tuple[RawResource, ...]
    _by_uid: Mapping[str, Workload] = field(repr=False)
    # network -> IP -> workload: one small dict per network rather than a (network, IP)
    # tuple per address, which saved 56 bytes per workload and a tuple per lookup.
    _by_addr: Mapping[str, Mapping[IPAddress, Workload]] = field(repr=False)
    _by_node: Mapping[str, tuple[Workload, ...]] = field(repr=False)
    _by_identity: Mapping[SpiffeId, tuple[Workload, ...]] = field(repr=False)
    _svc_by_vip: Mapping[str, Mapping[IPAddress, Service]] = field(repr=False)
    _svc_by_hostname: Mapping[str, Service] = field(repr=False)
    _svc_by_key: Mapping[str, Service] = field(repr=False)
    _endpoints: Mapping[str, tuple[Workload, ...]] = field(repr=False)
    _policy_by_key: Mapping[str, RawPolicy] = field(repr=False)
    _policies_by_ns: Mapping[str, tuple[RawPolicy, ...]] = field(repr=False)
    # kind -> its resources (policies included, as RawResource), in the source's order.
    _resources_by_kind: Mapping[str, tuple[RawResource, ...]] = field(repr=False)
    # ServiceEntries, read (`meshcore.serviceentry`); `discovery` has already turned each
    # host into a `Service` (key "namespace/host") and its static endpoints into endpoints.
    _service_entries: tuple[ServiceEntry, ...] = ()
    # A service key ("namespace/host") -> the entry that made that service.
    _entry_by_service: Mapping[str, ServiceEntry] = field(default_factory=dict, repr=False)
    # Values derived from this snapshot when first asked for (`derived`). Not an __init__
    # argument: a snapshot made from another (dataclasses.replace) starts with none.
    _derived: dict[Hashable, Any] = field(default_factory=dict, repr=False, init=False)

    @classmethod
    def empty(cls) -> MeshState:
        return cls.build((), (), ())

    @classmethod
    def build(
        cls,
        workloads: Iterable[Workload],
        services: Iterable[Service],
        policies: Iterable[RawPolicy],
        resources: Iterable[RawResource] = (),
        service_entries: Iterable[ServiceEntry] = (),
    ) -> MeshState:
        """`service_entries`: the ServiceEntries behind some of `services` (each host one
        service "namespace/host"); a host without its service is a `MeshConfigError`."""
        wls = tuple(workloads)
        svcs = tuple(services)
        pols = tuple(policies)
        res = tuple(resources)

        by_uid: dict[str, Workload] = {}
        by_addr: dict[str, dict[IPAddress, Workload]] = {}
        by_node: dict[str, list[Workload]] = {}
        by_identity: dict[SpiffeId, list[Workload]] = {}
        endpoints: dict[str, list[Workload]] = {}
        for w in wls:
            if w.uid in by_uid:
                raise MeshConfigError(f"two workloads have uid {w.uid!r}")
            by_uid[w.uid] = w
            for ip in w.ips:
                other = by_addr.setdefault(w.network, {}).setdefault(ip, w)
                if other is not w:
                    raise MeshConfigError(
                        f"workloads {other.uid!r} and {w.uid!r} both claim IP {ip} "
                        f"on network {w.network!r}"
                    )
            by_node.setdefault(w.node, []).append(w)
            by_identity.setdefault(w.identity, []).append(w)
            for key in w.service_keys:
                endpoints.setdefault(key, []).append(w)

        svc_by_vip: dict[str, dict[IPAddress, Service]] = {}
        svc_by_hostname: dict[str, Service] = {}
        svc_by_key: dict[str, Service] = {}
        for s in svcs:
            if s.key in svc_by_key:
                raise MeshConfigError(f"two services have the key {s.key!r}")
            svc_by_key[s.key] = s
            other_svc = svc_by_hostname.setdefault(s.hostname, s)
            if other_svc is not s:
                raise MeshConfigError(
                    f"services {other_svc.key!r} and {s.key!r} both use hostname {s.hostname!r}"
                )
            for vip in s.vips:
                other_svc = svc_by_vip.setdefault(vip.network, {}).setdefault(vip.ip, s)
                if other_svc is not s:
                    raise MeshConfigError(
                        f"services {other_svc.key!r} and {s.key!r} both claim VIP {vip.ip} "
                        f"on network {vip.network!r}"
                    )

        policy_by_key: dict[str, RawPolicy] = {}
        policies_by_ns: dict[str, list[RawPolicy]] = {}
        seen: set[tuple[str, str]] = set()
        for p in pols:
            if (p.kind, p.key) in seen:
                raise MeshConfigError(f"two {p.kind} entries have the key {p.key!r}")
            seen.add((p.kind, p.key))
            if p.kind == "AuthorizationPolicy":
                policy_by_key[p.key] = p
            policies_by_ns.setdefault(p.namespace, []).append(p)

        by_kind: dict[str, list[RawResource]] = {}
        for p in pols:
            by_kind.setdefault(p.kind, []).append(
                RawResource(p.kind, p.name, p.namespace, p.spec_json)
            )
        for r in res:
            if r.kind in ("AuthorizationPolicy", "PeerAuthentication"):
                raise MeshConfigError(f"{r.kind} {r.key} belongs with the policies")
            if (r.kind, r.key) in seen:
                raise MeshConfigError(f"two {r.kind} entries have the key {r.key!r}")
            seen.add((r.kind, r.key))
            by_kind.setdefault(r.kind, []).append(r)

        entries = tuple(service_entries)
        entry_by_service: dict[str, ServiceEntry] = {}
        for e in entries:
            for host in e.hosts:
                key = f"{e.namespace}/{host}"
                if key not in svc_by_key:
                    raise MeshConfigError(f"ServiceEntry {e.key}: no service for host {host!r}")
                entry_by_service[key] = e

        return cls(
            wls,
            svcs,
            pols,
            res,
            by_uid,
            by_addr,
            {k: tuple(v) for k, v in by_node.items()},
            {k: tuple(v) for k, v in by_identity.items()},
            svc_by_vip,
            svc_by_hostname,
            svc_by_key,
            # Sorted by uid so endpoint order (and so load balancing) does not depend on
            # the order entries happen to appear in the source.
            {k: tuple(sorted(v, key=_workload_order)) for k, v in endpoints.items()},
            policy_by_key,
            {k: tuple(v) for k, v in policies_by_ns.items()},
            {k: tuple(v) for k, v in by_kind.items()},
            entries,
            entry_by_service,
        )

    # -- collections ------------------------------------------------------------------------

    @property
    def workloads(self) -> tuple[Workload, ...]:
        return self._workloads

    @property
    def services(self) -> tuple[Service, ...]:
        return self._services

    @property
    def policies(self) -> tuple[RawPolicy, ...]:
        return self._policies

    @property
    def l7_resources(self) -> tuple[RawResource, ...]:
        """The L7 resources (HTTPRoute, VirtualService, ...), in the source's order."""
        return self._resources

    def resources(self, kind: str) -> tuple[RawResource, ...]:
        """Every resource of one kind, verbatim: an L7 kind, or AuthorizationPolicy /
        PeerAuthentication (the policies seen as raw resources)."""
        return self._resources_by_kind.get(kind, ())

    # -- lookups ----------------------------------------------------------------------------

    def workload_by_uid(self, uid: str) -> Workload | None:
        return self._by_uid.get(uid)

    def workload_by_ip(self, network: str, ip: IPAddress) -> Workload | None:
        by_ip = self._by_addr.get(network)
        return None if by_ip is None else by_ip.get(ip)

    def knows_address(self, address: str) -> bool:
        """Whether `address` (an IP as a socket reports it) is a workload's, in any network."""
        return self.source_group(address) is not None

    def source_group(self, address: str) -> str | None:
        """The HBONE listener's view of a peer at `address` (an IP as a socket reports it):
        None for a stranger (no workload's, in any network), else the group whose
        handshakes it shares fairly: its workload's node (`node/<name>`), or the address
        itself for a workload on no node."""
        try:
            ip = parse_ip(address)  # cached: the same few peers accept after accept
        except ValueError:
            return None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # a dual-stack socket's view of an IPv4 peer
        for by_ip in self._by_addr.values():
            w = by_ip.get(ip)
            if w is not None:
                return f"node/{w.node}" if w.node else f"addr/{ip}"
        return None

    def workloads_on_node(self, node: str) -> tuple[Workload, ...]:
        return self._by_node.get(node, ())

    def workloads_with_identity(self, identity: SpiffeId) -> tuple[Workload, ...]:
        return self._by_identity.get(identity, ())

    def service_by_vip(self, network: str, ip: IPAddress) -> Service | None:
        by_ip = self._svc_by_vip.get(network)
        return None if by_ip is None else by_ip.get(ip)

    def service_by_hostname(self, hostname: str) -> Service | None:
        return self._svc_by_hostname.get(hostname)

    def service_by_key(self, key: str) -> Service | None:
        return self._svc_by_key.get(key)

    @property
    def service_entries(self) -> tuple[ServiceEntry, ...]:
        return self._service_entries

    def service_entry_of(self, service: Service) -> ServiceEntry | None:
        """The ServiceEntry a service was made from (None for a Kubernetes Service)."""
        return self._entry_by_service.get(service.key)

    def derived(self, key: Hashable, make: Callable[[], _T]) -> _T:
        """`make()`, made once per snapshot and `key`: for views a proxy would otherwise
        rebuild per connection or request (a service's ready endpoints walk all of its
        pods). `make` must read nothing but this snapshot, and `key` must name all it
        reads besides; the snapshot never changes, so the value never goes stale."""
        try:
            value: _T = self._derived[key]
        except KeyError:
            value = self._derived[key] = make()
        return value

    def endpoints(self, service: Service) -> tuple[Workload, ...]:
        """Workloads that name `service` in their services map, ordered by uid."""
        return self._endpoints.get(service.key, ())

    def per_port(
        self, kind: str, service: Service, port: int, make: Callable[[], tuple[_T, ...]]
    ) -> tuple[_T, ...]:
        """`derived` for a view of `service` on its `port` (`kind` names the view): made
        once per snapshot for a port that leads somewhere (`service_ports`); on any other
        port no endpoint has a target, so the view is empty and nothing is kept (a client
        trying every port of a VIP must not grow a view per port)."""
        if service.target_port(port) is None and port not in self.service_ports(service):
            return ()
        return self.derived((kind, service.key, port), make)

    def service_ports(self, service: Service) -> frozenset[int]:
        """Every port of `service` that leads somewhere: declared by it, or mapped by one
        of its endpoints. Made once per snapshot."""

        def ports() -> frozenset[int]:
            out = {p.port for p in service.ports}
            for w in self.endpoints(service):
                for key, mapped in w.services:
                    if key == service.key:
                        out.update(port for port, _target in mapped)
            return frozenset(out)

        return self.derived(("ports", service.key), ports)

    def policy_by_key(self, key: str) -> RawPolicy | None:
        return self._policy_by_key.get(key)

    def policies_in_namespace(self, namespace: str) -> tuple[RawPolicy, ...]:
        return self._policies_by_ns.get(namespace, ())

    # -- waypoints --------------------------------------------------------------------------

    def waypoint_workloads(self, waypoint: GatewayAddress) -> tuple[Workload, ...]:
        """Every workload that serves as `waypoint`, whatever its health: a hostname names
        a service ("ns/host") and its endpoints; an address a service VIP or a workload.
        Empty when the mesh does not know the waypoint."""
        if waypoint.hostname is not None:
            svc = self._svc_by_key.get(waypoint.hostname)
            return () if svc is None else self.endpoints(svc)
        assert waypoint.address is not None
        address = waypoint.address
        svc = self.service_by_vip(address.network, address.ip)
        if svc is not None:
            return self.endpoints(svc)
        w = self.workload_by_ip(address.network, address.ip)
        return () if w is None else (w,)

    def waypoint_endpoints(
        self, waypoint: GatewayAddress, ip_version: int | None = None
    ) -> tuple[WaypointEndpoint, ...]:
        """Where a connection to `waypoint` may go: its healthy workloads that speak HBONE
        and have an address, at the IP of the caller's family (`ip_version`) when they
        have one (a waypoint named by a workload's address: that address), and the
        waypoint's HBONE port. Ordered by uid; empty means the waypoint is missing or has
        no ready endpoint."""
        out: list[WaypointEndpoint] = []
        pinned: IPAddress | None = None
        if (
            waypoint.address is not None
            and self.service_by_vip(waypoint.address.network, waypoint.address.ip) is None
        ):
            pinned = waypoint.address.ip
        for w in self.waypoint_workloads(waypoint):
            if w.status is not HealthStatus.HEALTHY or w.protocol is not TunnelProtocol.HBONE:
                continue
            if not w.ips:
                continue
            ip = pinned if pinned is not None else _prefer_family(w, ip_version)
            out.append(WaypointEndpoint(w, ip, waypoint.hbone_port))
        return tuple(out)

    def __eq__(self, other: object) -> bool:
        # Two snapshots are equal when they hold the same entries; the indexes follow.
        if not isinstance(other, MeshState):
            return NotImplemented
        return (
            self._workloads == other._workloads
            and self._services == other._services
            and self._policies == other._policies
            and self._resources == other._resources
            and self._service_entries == other._service_entries
        )

    def __hash__(self) -> int:
        return hash(
            (
                self._workloads,
                self._services,
                self._policies,
                self._resources,
                self._service_entries,
            )
        )

    def __repr__(self) -> str:
        return (
            f"MeshState(workloads={len(self._workloads)}, services={len(self._services)}, "
            f"policies={len(self._policies)}, resources={len(self._resources)})"
        )
