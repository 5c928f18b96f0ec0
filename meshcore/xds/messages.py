"""The xDS messages this mesh speaks, as frozen values with their protobuf schema.

Written from meshcore/xds/proto (istio.workload, istio.security, envoy.service.discovery.v3,
google.rpc, google.protobuf.Any/Empty and our ambient.mesh): the same field numbers, only the
fields the mesh uses. Maps are repeated entry messages (protobuf's own encoding of a map);
readers turn them into dicts, the last entry of a key winning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

from meshcore.xds import wire
from meshcore.xds.wire import BOOL, BYTES, INT32, STRING, UINT32, Field, register

ADDRESS_TYPE = "type.googleapis.com/istio.workload.Address"
AUTHORIZATION_TYPE = "type.googleapis.com/istio.security.Authorization"
L7_RESOURCE_TYPE = "type.googleapis.com/ambient.mesh.L7Resource"
WORKLOAD_EXTRAS_TYPE = "type.googleapis.com/ambient.mesh.WorkloadExtras"
SERVICE_EXTRAS_TYPE = "type.googleapis.com/ambient.mesh.ServiceExtras"

ADS_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"

# One request or response at most; a whole mesh of 20k workloads is a few MB.
MAX_MESSAGE_SIZE = 32 * 1024 * 1024

# -- google.protobuf / google.rpc -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Any_:
    type_url: str = ""
    value: bytes = b""


@dataclass(frozen=True, slots=True)
class Empty:
    pass


@dataclass(frozen=True, slots=True)
class Status:
    code: int = 0
    message: str = ""


# -- istio.workload ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Extension:
    name: str = ""
    config: Any_ | None = None


@dataclass(frozen=True, slots=True)
class NetworkAddress:
    network: str = ""
    address: bytes = b""


@dataclass(frozen=True, slots=True)
class NamespacedHostname:
    namespace: str = ""
    hostname: str = ""


@dataclass(frozen=True, slots=True)
class GatewayAddress:
    hostname: NamespacedHostname | None = None
    address: NetworkAddress | None = None
    hbone_mtls_port: int = 0


@dataclass(frozen=True, slots=True)
class Port:
    service_port: int = 0
    target_port: int = 0
    app_protocol: int = 0


@dataclass(frozen=True, slots=True)
class PortList:
    ports: tuple[Port, ...] = ()


@dataclass(frozen=True, slots=True)
class ServicesEntry:
    key: str = ""
    value: PortList | None = None


@dataclass(frozen=True, slots=True)
class Workload:
    uid: str = ""
    name: str = ""
    namespace: str = ""
    addresses: tuple[bytes, ...] = ()
    hostname: str = ""
    network: str = ""
    tunnel_protocol: int = 0
    trust_domain: str = ""
    service_account: str = ""
    waypoint: GatewayAddress | None = None
    node: str = ""
    canonical_name: str = ""
    canonical_revision: str = ""
    workload_type: int = 0
    workload_name: str = ""
    services: tuple[ServicesEntry, ...] = ()
    authorization_policies: tuple[str, ...] = ()
    status: int = 0
    cluster_id: str = ""
    extensions: tuple[Extension, ...] = ()


@dataclass(frozen=True, slots=True)
class Service:
    name: str = ""
    namespace: str = ""
    hostname: str = ""
    addresses: tuple[NetworkAddress, ...] = ()
    ports: tuple[Port, ...] = ()
    subject_alt_names: tuple[str, ...] = ()
    waypoint: GatewayAddress | None = None
    extensions: tuple[Extension, ...] = ()


@dataclass(frozen=True, slots=True)
class Address:
    workload: Workload | None = None
    service: Service | None = None


# -- istio.security ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StringMatch:
    exact: str | None = None
    prefix: str | None = None
    suffix: str | None = None
    presence: Empty | None = None


@dataclass(frozen=True, slots=True)
class ServiceAccountMatch:
    namespace: str = ""
    service_account: str = ""


@dataclass(frozen=True, slots=True)
class IpBlock:
    """istio.security.Address: an IP (4 or 16 bytes) and a prefix length."""

    address: bytes = b""
    length: int = 0


@dataclass(frozen=True, slots=True)
class Match:
    namespaces: tuple[StringMatch, ...] = ()
    not_namespaces: tuple[StringMatch, ...] = ()
    service_accounts: tuple[ServiceAccountMatch, ...] = ()
    not_service_accounts: tuple[ServiceAccountMatch, ...] = ()
    principals: tuple[StringMatch, ...] = ()
    not_principals: tuple[StringMatch, ...] = ()
    source_ips: tuple[IpBlock, ...] = ()
    not_source_ips: tuple[IpBlock, ...] = ()
    destination_ips: tuple[IpBlock, ...] = ()
    not_destination_ips: tuple[IpBlock, ...] = ()
    destination_ports: tuple[int, ...] = ()
    not_destination_ports: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Clause:
    matches: tuple[Match, ...] = ()


@dataclass(frozen=True, slots=True)
class Rule:
    clauses: tuple[Clause, ...] = ()


@dataclass(frozen=True, slots=True)
class Authorization:
    name: str = ""
    namespace: str = ""
    scope: int = 0
    action: int = 0
    rules: tuple[Rule, ...] = ()
    dry_run: bool = False
    extensions: tuple[Extension, ...] = ()


# -- ambient.mesh -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class L7Resource:
    kind: str = ""
    name: str = ""
    namespace: str = ""
    json: str = ""


@dataclass(frozen=True, slots=True)
class Label:
    key: str = ""
    value: str = ""


@dataclass(frozen=True, slots=True)
class WorkloadExtras:
    labels: tuple[Label, ...] = ()
    waypoint_fail_open: bool = False
    workload_type: str = ""


@dataclass(frozen=True, slots=True)
class PortName:
    port: int = 0
    name: str = ""
    app_protocol_set: bool = False


@dataclass(frozen=True, slots=True)
class ServiceExtras:
    ports: tuple[PortName, ...] = ()
    waypoint_fail_open: bool = False


# -- envoy ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Node:
    id: str = ""
    cluster: str = ""
    user_agent_name: str = ""


@dataclass(frozen=True, slots=True)
class VersionEntry:
    key: str = ""
    value: str = ""


@dataclass(frozen=True, slots=True)
class DeltaDiscoveryRequest:
    node: Node | None = None
    type_url: str = ""
    resource_names_subscribe: tuple[str, ...] = ()
    resource_names_unsubscribe: tuple[str, ...] = ()
    initial_resource_versions: tuple[VersionEntry, ...] = ()
    response_nonce: str = ""
    error_detail: Status | None = None


@dataclass(frozen=True, slots=True)
class Resource:
    name: str = ""
    aliases: tuple[str, ...] = ()
    version: str = ""
    resource: Any_ | None = None


@dataclass(frozen=True, slots=True)
class DeltaDiscoveryResponse:
    system_version_info: str = ""
    resources: tuple[Resource, ...] = ()
    type_url: str = ""
    removed_resources: tuple[str, ...] = ()
    nonce: str = ""


F = Field
register(Any_, F(1, "type_url", STRING), F(2, "value", BYTES))
register(Empty)
register(Status, F(1, "code", INT32), F(2, "message", STRING))
register(Extension, F(1, "name", STRING), F(2, "config", Any_))
register(NetworkAddress, F(1, "network", STRING), F(2, "address", BYTES))
register(NamespacedHostname, F(1, "namespace", STRING), F(2, "hostname", STRING))
register(
    GatewayAddress,
    F(1, "hostname", NamespacedHostname, oneof="destination"),
    F(2, "address", NetworkAddress, oneof="destination"),
    F(3, "hbone_mtls_port", UINT32),
)
register(
    Port, F(1, "service_port", UINT32), F(2, "target_port", UINT32), F(3, "app_protocol", INT32)
)
register(PortList, F(1, "ports", Port, repeated=True))
register(ServicesEntry, F(1, "key", STRING), F(2, "value", PortList))
register(
    Workload,
    F(20, "uid", STRING),
    F(1, "name", STRING),
    F(2, "namespace", STRING),
    F(3, "addresses", BYTES, repeated=True),
    F(21, "hostname", STRING),
    F(4, "network", STRING),
    F(5, "tunnel_protocol", INT32),
    F(6, "trust_domain", STRING),
    F(7, "service_account", STRING),
    F(8, "waypoint", GatewayAddress),
    F(9, "node", STRING),
    F(10, "canonical_name", STRING),
    F(11, "canonical_revision", STRING),
    F(12, "workload_type", INT32),
    F(13, "workload_name", STRING),
    F(22, "services", ServicesEntry, repeated=True),
    F(16, "authorization_policies", STRING, repeated=True),
    F(17, "status", INT32),
    F(18, "cluster_id", STRING),
    F(26, "extensions", Extension, repeated=True),
)
register(
    Service,
    F(1, "name", STRING),
    F(2, "namespace", STRING),
    F(3, "hostname", STRING),
    F(4, "addresses", NetworkAddress, repeated=True),
    F(5, "ports", Port, repeated=True),
    F(6, "subject_alt_names", STRING, repeated=True),
    F(7, "waypoint", GatewayAddress),
    F(10, "extensions", Extension, repeated=True),
)
register(Address, F(1, "workload", Workload, oneof="type"), F(2, "service", Service, oneof="type"))
register(
    StringMatch,
    F(1, "exact", STRING, oneof="match_type"),
    F(2, "prefix", STRING, oneof="match_type"),
    F(3, "suffix", STRING, oneof="match_type"),
    F(4, "presence", Empty, oneof="match_type"),
)
register(ServiceAccountMatch, F(1, "namespace", STRING), F(2, "service_account", STRING))
register(IpBlock, F(1, "address", BYTES), F(2, "length", UINT32))
register(
    Match,
    F(1, "namespaces", StringMatch, repeated=True),
    F(2, "not_namespaces", StringMatch, repeated=True),
    F(11, "service_accounts", ServiceAccountMatch, repeated=True),
    F(12, "not_service_accounts", ServiceAccountMatch, repeated=True),
    F(3, "principals", StringMatch, repeated=True),
    F(4, "not_principals", StringMatch, repeated=True),
    F(5, "source_ips", IpBlock, repeated=True),
    F(6, "not_source_ips", IpBlock, repeated=True),
    F(7, "destination_ips", IpBlock, repeated=True),
    F(8, "not_destination_ips", IpBlock, repeated=True),
    F(9, "destination_ports", UINT32, repeated=True),
    F(10, "not_destination_ports", UINT32, repeated=True),
)
register(Clause, F(2, "matches", Match, repeated=True))
register(Rule, F(1, "clauses", Clause, repeated=True))
register(
    Authorization,
    F(1, "name", STRING),
    F(2, "namespace", STRING),
    F(3, "scope", INT32),
    F(4, "action", INT32),
    F(5, "rules", Rule, repeated=True),
    F(6, "dry_run", BOOL),
    F(7, "extensions", Extension, repeated=True),
)
register(
    L7Resource,
    F(1, "kind", STRING),
    F(2, "name", STRING),
    F(3, "namespace", STRING),
    F(4, "json", STRING),
)
register(Label, F(1, "key", STRING), F(2, "value", STRING))
register(
    WorkloadExtras,
    F(1, "labels", Label, repeated=True),
    F(2, "waypoint_fail_open", BOOL),
    F(3, "workload_type", STRING),
)
register(PortName, F(1, "port", UINT32), F(2, "name", STRING), F(3, "app_protocol_set", BOOL))
register(ServiceExtras, F(1, "ports", PortName, repeated=True), F(2, "waypoint_fail_open", BOOL))
register(Node, F(1, "id", STRING), F(2, "cluster", STRING), F(6, "user_agent_name", STRING))
register(VersionEntry, F(1, "key", STRING), F(2, "value", STRING))
register(
    DeltaDiscoveryRequest,
    F(1, "node", Node),
    F(2, "type_url", STRING),
    F(3, "resource_names_subscribe", STRING, repeated=True),
    F(4, "resource_names_unsubscribe", STRING, repeated=True),
    F(5, "initial_resource_versions", VersionEntry, repeated=True),
    F(6, "response_nonce", STRING),
    F(7, "error_detail", Status),
)
register(
    Resource,
    F(3, "name", STRING),
    F(4, "aliases", STRING, repeated=True),
    F(1, "version", STRING),
    F(2, "resource", Any_),
)
register(
    DeltaDiscoveryResponse,
    F(1, "system_version_info", STRING),
    F(2, "resources", Resource, repeated=True),
    F(4, "type_url", STRING),
    F(6, "removed_resources", STRING, repeated=True),
    F(5, "nonce", STRING),
)

M = TypeVar("M")


def encode(msg: object) -> bytes:
    return wire.encode(msg)


def decode(cls: type[M], data: bytes | bytearray | memoryview) -> M:
    return wire.decode(cls, data, MAX_MESSAGE_SIZE)


def pack(type_url: str, msg: object) -> Any_:
    """`msg` wrapped in a google.protobuf.Any."""
    return Any_(type_url, wire.encode(msg))
