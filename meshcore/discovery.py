"""Config sources for the tunnel: the local YAML document (LOCAL_XDS_PATH) and its watcher.

`parse_local_config` is a pure function from the text of the file (YAML, or JSON, which is
parsed much faster) to a `MeshState`. It is
strict: unknown keys, wrong types, bad IPs and out-of-range ports are `MeshConfigError`s naming
the path of the bad value (`workloads[3].workloadIps[0]: ...`); no other exception escapes,
whatever the input. YAML aliases are resolved, but policy entries are copied with a size
budget so a small aliased file cannot expand into gigabytes.

Besides workloads, services and L4 policies, the document may carry the L7 resources a
waypoint acts on (HTTPRoute, GRPCRoute, VirtualService, DestinationRule,
RequestAuthentication, Gateway), under `resources` (or among `policies`, where
`kubectl apply`-style lists put every document). They are kept verbatim: only their kind,
name and namespace are checked here, so a spec the tunnel does not understand can never
make it refuse the whole config; the waypoint parses them with its own strict parsers.

`LocalConfigWatcher` polls the file and hands each new valid snapshot to a callback. A bad
edit is logged and the last good snapshot stays in force: a typo must never take down the
mesh on a node.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from meshcore.defaults import HBONE_PORT, SERVICE_ACCOUNT, TRUST_DOMAIN
from meshcore.identity.spiffe import IdentityError, SpiffeId
from meshcore.reader import Reader, describe, load_document
from meshcore.runtime.gcpause import collector_paused
from meshcore.serviceentry import (
    KIND as SERVICE_ENTRY,
)
from meshcore.serviceentry import (
    ServiceEntry,
    ServiceEntryError,
    host_addresses,
    parse_service_entry,
)
from meshcore.state import (
    L7_KINDS,
    AppProtocol,
    GatewayAddress,
    HealthStatus,
    IPAddress,
    MeshConfigError,
    MeshState,
    NetworkAddress,
    RawPolicy,
    RawResource,
    Service,
    ServicePort,
    ServicePortMap,
    TunnelProtocol,
    Workload,
    parse_app_protocol,
)

__all__ = [
    "ConfigStatus",
    "LocalConfigWatcher",
    "MeshConfigError",
    "parse_local_config",
    "parse_policy_entry",
    "parse_resource_entry",
]

log = structlog.get_logger(__name__)

DEFAULT_PROTOCOL = "TCP"
DEFAULT_NETWORK = ""
DEFAULT_STATUS = "Healthy"
DEFAULT_CANONICAL_REVISION = "latest"
DEFAULT_WORKLOAD_TYPE = "pod"
DEFAULT_CLUSTER_ID = "Kubernetes"

# Both the YAML spelling ("TCP") and the xDS enum names are accepted, case-insensitively.
_PROTOCOLS = {
    "TCP": TunnelProtocol.NONE,
    "NONE": TunnelProtocol.NONE,
    "HBONE": TunnelProtocol.HBONE,
}
_STATUSES = {"HEALTHY": HealthStatus.HEALTHY, "UNHEALTHY": HealthStatus.UNHEALTHY}

_TOP_KEYS = frozenset({"workloads", "services", "policies", "resources"})
_WORKLOAD_KEYS = frozenset(
    {
        "uid",
        "name",
        "namespace",
        "serviceAccount",
        "trustDomain",
        "workloadIps",
        "protocol",
        "node",
        "canonicalName",
        "canonicalRevision",
        "workloadName",
        "workloadType",
        "clusterId",
        "status",
        "network",
        "waypoint",
        "services",
        "labels",
        "authorizationPolicies",
    }
)
_SERVICE_KEYS = frozenset(
    {"name", "namespace", "hostname", "vips", "ports", "subjectAltNames", "waypoint"}
)
_WAYPOINT_KEYS = frozenset({"hostname", "address", "hboneMtlsPort", "failOpen"})
_PORT_KEYS = frozenset({"port", "targetPort", "name", "appProtocol"})
_PORT_DETAIL_KEYS = frozenset({"targetPort", "name", "appProtocol"})
# A Service port's name as Kubernetes takes it: a DNS label (RFC 1123).
_PORT_NAME_MAX = 63

# A policy entry larger than this many YAML nodes is refused: real policies are tiny, and
# the limit stops an alias bomb before it is expanded into JSON.
_POLICY_NODE_BUDGET = 100_000
_POLICY_MAX_DEPTH = 64


def _load_document(text: str) -> Any:
    return load_document(text, MeshConfigError)


# -- field helpers ----------------------------------------------------------------------------


class _Shared(dict[Hashable, Any]):
    """`shared[value]` is the first value equal to `value` seen during this parse.

    A generated config repeats the same namespace, node, trust domain, cluster, label set
    and service port map on thousands of workloads, and the parsers give each occurrence
    its own object: sharing them (all are immutable) more than halves what a snapshot holds.
    A dict subscript keeps the common case (seen before) in C.
    """

    def __missing__(self, value: Hashable) -> Any:
        self[value] = value
        return value


# Every raw value is read through the shared strict reader: errors name the path and are
# worded as in every other input of the mesh.
_R = Reader(MeshConfigError)
# Bound once: the parse of a large config calls these per field.
_fail, _mapping, _items, _check_keys = _R.fail, _R.mapping, _R.items, _R.check_keys
_name, _ip, _port, _string_map = _R.name, _R.ip, _R.port, _R.string_map


def _str(entry: Mapping[Any, Any], key: str, path: str, default: str | None = None) -> str:
    # Optional text fields of the mesh config may be empty (the default network is "").
    return _R.string(entry, key, path, default, empty_ok=True)


def _uid(entry: Mapping[Any, Any], path: str) -> str:
    value = _R.string(entry, "uid", path)
    if not value.strip():
        _fail(f"{path}.uid", "must not be empty")
    return value


def _network_address(value: Any, path: str) -> NetworkAddress:
    if not isinstance(value, str) or value.count("/") != 1:
        _fail(path, f"{value!r} is not of the form '<network>/<ip>' (e.g. '/10.96.0.10')")
    network, _, ip = value.partition("/")
    return NetworkAddress(network, _ip(ip, path))


def _enum(
    entry: Mapping[Any, Any], key: str, path: str, default: str, table: Mapping[str, Any]
) -> Any:
    value = _str(entry, key, path, default)
    try:
        return table[value.upper()]
    except KeyError:
        _fail(f"{path}.{key}", f"{value!r} is not one of {', '.join(sorted(table))}")


def _port_map(value: Any, path: str) -> tuple[tuple[int, int], ...]:
    ports = _mapping(value, path) if value is not None else {}
    pairs: dict[int, int] = {}
    for raw_port, raw_target in ports.items():
        port = _port(raw_port, f"{path}[{raw_port!r}]")
        if port in pairs:
            _fail(path, f"port {port} is given twice")
        pairs[port] = _port(raw_target, f"{path}[{raw_port!r}]")
    return tuple(sorted(pairs.items()))


def _port_name(value: Any, path: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        _fail(path, f"expected a string, got {describe(value)} {value!r}")
    ok = (
        0 < len(value) <= _PORT_NAME_MAX
        and value.isascii()
        and all(c.islower() or c.isdigit() or c == "-" for c in value)
        and value[0] != "-"
        and value[-1] != "-"
    )
    if not ok:
        _fail(
            path,
            f"{value!r} is not a port name (lower-case letters, digits and '-', "
            f"at most {_PORT_NAME_MAX} characters, e.g. 'http-web')",
        )
    return value


def _app_protocol(value: Any, path: str) -> AppProtocol | None:
    if value is None:
        return None
    if not isinstance(value, str):
        _fail(path, f"expected a string, got {describe(value)} {value!r}")
    try:
        return parse_app_protocol(value)
    except ValueError as exc:
        _fail(path, str(exc))


def _service_ports(value: Any, path: str) -> tuple[ServicePort, ...]:
    """A service's ports: `{port: targetPort}` or `{port: {targetPort, name, appProtocol}}`,
    or a list of `{port, targetPort, name, appProtocol}` as Kubernetes writes them."""
    found: dict[int, ServicePort] = {}
    names: dict[str, int] = {}

    def add(port: int, entry: Mapping[Any, Any], at: str) -> None:
        if port in found:
            _fail(at, f"port {port} is given twice")
        target = _port(entry.get("targetPort", port), f"{at}.targetPort")
        name = _port_name(entry.get("name"), f"{at}.name")
        if name and name in names:
            _fail(f"{at}.name", f"{name!r} is also the name of port {names[name]}")
        if name:
            names[name] = port
        app = _app_protocol(entry.get("appProtocol"), f"{at}.appProtocol")
        found[port] = ServicePort(port, target, name, app)

    if isinstance(value, list):
        for i, raw in enumerate(value):
            at = f"{path}[{i}]"
            entry = _mapping(raw, at, required=True)
            _check_keys(entry, _PORT_KEYS, at)
            if "port" not in entry:
                _fail(f"{at}.port", "is required")
            add(_port(entry["port"], f"{at}.port"), entry, at)
    else:
        for raw_port, raw in (_mapping(value, path) if value is not None else {}).items():
            at = f"{path}[{raw_port!r}]"
            port = _port(raw_port, at)
            if isinstance(raw, dict):
                _check_keys(raw, _PORT_DETAIL_KEYS, at)
                if "targetPort" not in raw:
                    _fail(f"{at}.targetPort", "is required")
                add(port, raw, at)
            else:
                if port in found:
                    _fail(path, f"port {port} is given twice")
                found[port] = ServicePort(port, _port(raw, at))
    return tuple(sorted(found.values()))


def _waypoint(value: Any, path: str) -> GatewayAddress | None:
    if value is None:
        return None
    if isinstance(value, str):
        entry: Mapping[Any, Any] = {"hostname": value}
    else:
        entry = _mapping(value, path)
        _check_keys(entry, _WAYPOINT_KEYS, path)
    port = HBONE_PORT
    if entry.get("hboneMtlsPort") is not None:
        port = _port(entry["hboneMtlsPort"], f"{path}.hboneMtlsPort")
    fail_open = _R.boolean(entry, "failOpen", path, False)
    hostname = entry.get("hostname")
    address = entry.get("address")
    if (hostname is None) == (address is None):
        _fail(path, "give exactly one of 'hostname' ('ns/host') or 'address' ('<network>/<ip>')")
    if hostname is not None:
        if not isinstance(hostname, str) or hostname.count("/") != 1 or hostname.startswith("/"):
            _fail(f"{path}.hostname", f"{hostname!r} is not of the form 'namespace/hostname'")
        return GatewayAddress(hostname=hostname, hbone_port=port, fail_open=fail_open)
    return GatewayAddress(
        address=_network_address(address, f"{path}.address"),
        hbone_port=port,
        fail_open=fail_open,
    )


# -- entries ----------------------------------------------------------------------------------


def _parse_workload(value: Any, path: str, shared: _Shared) -> Workload:
    entry = _mapping(value, path, required=True)
    _check_keys(entry, _WORKLOAD_KEYS, path)
    name = _name(entry, "name", path)
    namespace = _name(entry, "namespace", path)
    service_account = _name(entry, "serviceAccount", path, SERVICE_ACCOUNT)
    trust_domain = _name(entry, "trustDomain", path, TRUST_DOMAIN)
    try:
        SpiffeId(trust_domain, namespace, service_account)
    except IdentityError as exc:  # pragma: no cover - _name already enforces the same rules
        _fail(path, str(exc))

    ips_path = f"{path}.workloadIps"
    ips: list[IPAddress] = []
    for i, raw in enumerate(_items(entry.get("workloadIps"), ips_path)):
        ip = _ip(raw, f"{ips_path}[{i}]")
        if ip in ips:
            _fail(f"{ips_path}[{i}]", f"{ip} is listed twice")
        ips.append(ip)

    svc_path = f"{path}.services"
    raw_services = entry.get("services")
    services_map = _mapping(raw_services, svc_path) if raw_services is not None else {}
    services: list[tuple[str, tuple[tuple[int, int], ...]]] = []
    for key, ports in services_map.items():
        key_path = f"{svc_path}[{key!r}]"
        if not isinstance(key, str) or key.count("/") != 1 or key.startswith("/"):
            _fail(key_path, "service key must be 'namespace/hostname'")
        services.append((shared[key], shared[_port_map(ports, key_path)]))
    service_map: ServicePortMap = shared[tuple(sorted(services))]

    # uid and name are unique to the workload; everything else is typically shared with
    # many others (see _Shared).
    return Workload(
        uid=_uid(entry, path),
        name=name,
        namespace=shared[namespace],
        service_account=shared[service_account],
        trust_domain=shared[trust_domain],
        ips=tuple(ips),
        network=shared[_str(entry, "network", path, DEFAULT_NETWORK)],
        protocol=_enum(entry, "protocol", path, DEFAULT_PROTOCOL, _PROTOCOLS),
        node=shared[_str(entry, "node", path, "")],
        canonical_name=shared[_str(entry, "canonicalName", path, name)],
        canonical_revision=shared[
            _str(entry, "canonicalRevision", path, DEFAULT_CANONICAL_REVISION)
        ],
        workload_name=shared[_str(entry, "workloadName", path, name)],
        workload_type=shared[_str(entry, "workloadType", path, DEFAULT_WORKLOAD_TYPE)],
        cluster_id=shared[_str(entry, "clusterId", path, DEFAULT_CLUSTER_ID)],
        status=_enum(entry, "status", path, DEFAULT_STATUS, _STATUSES),
        waypoint=shared[_waypoint(entry.get("waypoint"), f"{path}.waypoint")],
        services=service_map,
        labels=_labels(entry.get("labels"), f"{path}.labels", shared),
        authorization_policies=shared[_policy_refs(entry, path, shared)],
    )


def _labels(value: Any, path: str, shared: _Shared) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    out = [(shared[k], shared[v]) for k, v in _string_map(value, path).items()]
    # Pods of one ReplicaSet carry the same labels: one tuple serves them all.
    labels: tuple[tuple[str, str], ...] = shared[tuple(sorted(out))]
    return labels


def _policy_refs(entry: Mapping[Any, Any], path: str, shared: _Shared) -> tuple[str, ...]:
    key = "authorizationPolicies"
    refs = _items(entry.get(key), f"{path}.{key}")
    for i, ref in enumerate(refs):
        if not isinstance(ref, str) or ref.count("/") != 1:
            _fail(f"{path}.{key}[{i}]", f"{ref!r} must be 'namespace/name'")
    return tuple(shared[ref] for ref in refs)


def _parse_service(value: Any, path: str, shared: _Shared) -> Service:
    entry = _mapping(value, path, required=True)
    _check_keys(entry, _SERVICE_KEYS, path)
    vips_path = f"{path}.vips"
    vips: list[NetworkAddress] = []
    for i, raw in enumerate(_items(entry.get("vips"), vips_path)):
        vip = _network_address(raw, f"{vips_path}[{i}]")
        if vip in vips:
            _fail(f"{vips_path}[{i}]", f"{vip} is listed twice")
        vips.append(vip)
    sans_path = f"{path}.subjectAltNames"
    sans: list[str] = []
    for i, raw in enumerate(_items(entry.get("subjectAltNames"), sans_path)):
        if not isinstance(raw, str) or not raw:
            _fail(f"{sans_path}[{i}]", f"expected a non-empty string, got {raw!r}")
        sans.append(raw)
    hostname = _name(entry, "hostname", path)
    return Service(
        name=_name(entry, "name", path),
        namespace=shared[_name(entry, "namespace", path)],
        hostname=hostname,
        vips=tuple(vips),
        ports=shared[_service_ports(entry.get("ports"), f"{path}.ports")],
        subject_alt_names=tuple(sans),
        waypoint=_waypoint(entry.get("waypoint"), f"{path}.waypoint"),
    )


def _plain_copy(value: Any, path: str, budget: list[int], depth: int = 0) -> Any:
    """Copy YAML data into JSON-able values, refusing anything huge, deep or non-JSON."""
    budget[0] -= 1
    if budget[0] < 0:
        _fail(path, f"policy is too large (more than {_POLICY_NODE_BUDGET} values)")
    if depth > _POLICY_MAX_DEPTH:
        _fail(path, f"policy is nested more than {_POLICY_MAX_DEPTH} levels deep")
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            _fail(path, f"{value!r} is not a finite number")
        return value
    if isinstance(value, list):
        return [_plain_copy(v, f"{path}[{i}]", budget, depth + 1) for i, v in enumerate(value)]
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                _fail(path, f"key {k!r} must be a string")
            out[k] = _plain_copy(v, f"{path}.{k}", budget, depth + 1)
        return out
    _fail(path, f"{describe(value)} values are not supported here; quote it")


_POLICY_KINDS = frozenset({"AuthorizationPolicy", "PeerAuthentication"})


def parse_policy_entry(value: Any, path: str) -> RawPolicy:
    """One entry of `policies`: either an xDS-style entry (name, namespace at the top) or an
    Istio resource as users write it (apiVersion, kind, metadata, spec). Its meaning is
    `meshcore.policy`'s job; here only the name, namespace and kind are checked. Public so
    that tools can check an entry exactly as the tunnel reads it."""
    entry = _mapping(value, path, required=True)
    kind = "AuthorizationPolicy"
    where: Mapping[Any, Any] = entry
    where_path = path
    if "kind" in entry or "metadata" in entry:
        kind = _str(entry, "kind", path)
        if kind not in _POLICY_KINDS:
            _fail(f"{path}.kind", f"{kind!r} is not one of {', '.join(sorted(_POLICY_KINDS))}")
        where_path = f"{path}.metadata"
        where = _mapping(entry.get("metadata"), where_path, required=True)
    name = _name(where, "name", where_path)
    namespace = _str(where, "namespace", where_path, "")
    if "/" in namespace:
        _fail(f"{where_path}.namespace", f"{namespace!r} must contain no '/'")
    plain = _plain_copy(entry, path, [_POLICY_NODE_BUDGET])
    return RawPolicy.from_mapping(name, namespace, plain, kind)


def _metadata(entry: Mapping[Any, Any], path: str) -> tuple[str, str]:
    where_path = f"{path}.metadata"
    where = _mapping(entry.get("metadata"), where_path, required=True)
    name = _name(where, "name", where_path)
    namespace = _str(where, "namespace", where_path, "")
    if "/" in namespace:
        _fail(f"{where_path}.namespace", f"{namespace!r} must contain no '/'")
    return name, namespace


# The resources kept verbatim: the waypoints' L7 kinds, and ServiceEntry (read here too).
_RESOURCE_KINDS = L7_KINDS | {SERVICE_ENTRY}


def parse_resource_entry(value: Any, path: str) -> RawResource:
    """One L7 resource (HTTPRoute, GRPCRoute, VirtualService, DestinationRule,
    RequestAuthentication, Gateway) as users write it. Only the kind, the metadata's name
    and namespace are checked, and that it is plain JSON data of a bounded size; the spec
    is the waypoint's to parse."""
    entry = _mapping(value, path, required=True)
    kind = _str(entry, "kind", path)
    if kind not in _RESOURCE_KINDS:
        _fail(f"{path}.kind", f"{kind!r} is not one of {', '.join(sorted(_RESOURCE_KINDS))}")
    name, namespace = _metadata(entry, path)
    plain = _plain_copy(entry, path, [_POLICY_NODE_BUDGET])
    return RawResource.from_mapping(kind, name, namespace, plain)


def parse_local_config(text: str) -> MeshState:
    """Parse the LOCAL_XDS document. Raises `MeshConfigError` (and nothing else) on bad input."""
    if not isinstance(text, str):
        raise MeshConfigError(f"config must be text, got {describe(text)}")
    with collector_paused():
        return _parse_document(text)


def _parse_document(text: str) -> MeshState:
    doc = _load_document(text)
    if doc is None:
        return MeshState.empty()
    top = _mapping(doc, "config", required=True)
    _check_keys(top, _TOP_KEYS, "config")
    shared = _Shared()
    workloads = [
        _parse_workload(w, f"workloads[{i}]", shared)
        for i, w in enumerate(_items(top.get("workloads"), "workloads"))
    ]
    services = [
        _parse_service(s, f"services[{i}]", shared)
        for i, s in enumerate(_items(top.get("services"), "services"))
    ]
    policies: list[RawPolicy] = []
    resources: list[RawResource] = []
    for i, p in enumerate(_items(top.get("policies"), "policies")):
        # A kubectl-apply-style list may hold L7 documents beside the policies.
        # The kind must be a string before the set lookup: a mapping there is unhashable.
        kind = p.get("kind") if isinstance(p, dict) else None
        if isinstance(kind, str) and kind in L7_KINDS:
            resources.append(parse_resource_entry(p, f"policies[{i}]"))
        else:
            policies.append(parse_policy_entry(p, f"policies[{i}]"))
    entries: list[ServiceEntry] = []
    for i, r in enumerate(_items(top.get("resources"), "resources")):
        raw = parse_resource_entry(r, f"resources[{i}]")
        resources.append(raw)
        if raw.kind == SERVICE_ENTRY:
            try:
                entries.append(parse_service_entry(r, f"resources[{i}]"))
            except ServiceEntryError as exc:
                raise MeshConfigError(str(exc)) from None
    if entries:
        workloads, services = _with_service_entries(workloads, services, entries)
    return MeshState.build(workloads, services, policies, resources, entries)


def _entry_port(port: Any) -> ServicePort:
    app = _app_protocol(port.protocol or None, "port")
    target = port.target_port if port.target_port is not None else port.number
    return ServicePort(port.number, target, port.name, app)


def _with_service_entries(
    workloads: list[Workload], services: list[Service], entries: list[ServiceEntry]
) -> tuple[list[Workload], list[Service]]:
    """Each host of each entry as a `Service` (hostname = the host, VIPs = its addresses,
    written or allocated), and each STATIC endpoint as an endpoint of those services: the
    mesh workload with that IP (so it is reached over HBONE, as Istio does for a
    WorkloadEntry's address), or else one plain-TCP workload per IP, named after the entry
    (the tunnel passes traffic through to it)."""
    addresses = host_addresses(entries)
    by_ip = {(w.network, ip): i for i, w in enumerate(workloads) for ip in w.ips}
    extra: dict[IPAddress, Workload] = {}
    added: dict[int, list[tuple[str, tuple[tuple[int, int], ...]]]] = {}
    out_services = list(services)
    for e in entries:
        ports = tuple(sorted(_entry_port(p) for p in e.ports))
        for host in e.hosts:
            svc = Service(
                name=e.name,
                namespace=e.namespace,
                hostname=host,
                vips=tuple(NetworkAddress(DEFAULT_NETWORK, ip) for ip in addresses[(e.key, host)]),
                ports=ports,
                subject_alt_names=e.subject_alt_names,
                waypoint=None,
            )
            out_services.append(svc)
            for ep in e.endpoints:
                ip = ep.ip
                if ip is None:
                    continue  # a DNS name: resolved when a connection is made
                port_map = tuple(sorted((p.number, ep.target_port(p)) for p in e.ports))
                entry = (svc.key, port_map)
                index = by_ip.get((DEFAULT_NETWORK, ip))
                if index is not None:
                    added.setdefault(index, []).append(entry)
                    continue
                w = extra.get(ip)
                if w is None:
                    w = Workload(
                        uid=f"{SERVICE_ENTRY}/{e.namespace}/{e.name}/{ip}",
                        name=f"{e.name}-{ip}",
                        namespace=e.namespace,
                        service_account=SERVICE_ACCOUNT,
                        trust_domain=TRUST_DOMAIN,
                        ips=(ip,),
                        network=DEFAULT_NETWORK,
                        protocol=TunnelProtocol.NONE,
                        node="",
                        canonical_name=e.name,
                        canonical_revision=DEFAULT_CANONICAL_REVISION,
                        workload_name=e.name,
                        workload_type="serviceentry",
                        cluster_id=DEFAULT_CLUSTER_ID,
                        status=HealthStatus.HEALTHY,
                        waypoint=None,
                        services=(),
                        labels=ep.labels,
                    )
                services_map = dict(w.services)
                if svc.key not in services_map:
                    services_map[svc.key] = port_map
                extra[ip] = dataclasses.replace(w, services=tuple(sorted(services_map.items())))
    out_workloads = list(workloads)
    for index, more in added.items():
        w = out_workloads[index]
        merged = dict(w.services)
        for key, port_map in more:
            merged.setdefault(key, port_map)
        out_workloads[index] = dataclasses.replace(w, services=tuple(sorted(merged.items())))
    out_workloads.extend(extra.values())
    return out_workloads, out_services


# -- watcher ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _FileStamp:
    """What a cheap stat tells us; inode catches an atomic rename over the file."""

    mtime_ns: int
    size: int
    inode: int

    @classmethod
    def of(cls, st: os.stat_result) -> _FileStamp:
        return cls(st.st_mtime_ns, st.st_size, st.st_ino)


def _read_and_parse(path: Path) -> tuple[_FileStamp, str, MeshState | MeshConfigError]:
    """Read the file once (stat from the same open fd) and parse it; runs in a worker thread."""
    with path.open("rb") as f:
        stamp = _FileStamp.of(os.fstat(f.fileno()))
        data = f.read()
    digest = hashlib.sha256(data).hexdigest()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return stamp, digest, MeshConfigError(f"{path}: not UTF-8 text: {exc}")
    try:
        return stamp, digest, parse_local_config(text)
    except MeshConfigError as exc:
        return stamp, digest, MeshConfigError(f"{path}: {exc}")


@dataclass(frozen=True, slots=True)
class ConfigStatus:
    """Which config a tunnel runs, named by the SHA-256 of the file's bytes, so a writer can
    tell when its change is in force; and, while the newest file is refused, that file's
    digest and why (the last good config stays in force meanwhile)."""

    digest: str
    rejected_digest: str | None = None
    rejected_error: str | None = None

    def to_json(self) -> dict[str, Any]:
        rejected = None
        if self.rejected_digest is not None:
            rejected = {"digest": self.rejected_digest, "error": self.rejected_error}
        return {"digest": self.digest, "rejected": rejected}


class LocalConfigWatcher:
    """Polls a LOCAL_XDS file and calls `on_update` with every new valid `MeshState`.

    `start()` loads the file (a missing or invalid file is a `MeshConfigError` then, since there
    is no good state to fall back on), calls `on_update` with that first state, and starts
    polling. Later, a change is detected by (mtime_ns, size, inode) and confirmed by a
    SHA-256 of the content, so `touch` alone never triggers an update. A bad edit logs
    `config_rejected` and keeps the last good state; a briefly missing file is waited out.
    """

    def __init__(
        self,
        path: Path,
        on_update: Callable[[MeshState], None],
        interval: float = 0.5,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"poll interval must be positive, got {interval}")
        self._path = Path(path)
        self._on_update = on_update
        self._interval = interval
        self._current = MeshState.empty()
        self._stamp: _FileStamp | None = None
        self._seen_digest = ""  # content last examined (good or bad)
        self._good_digest = ""  # content that produced `_current`
        self._rejected: tuple[str, str] | None = None  # (digest, error) of a refused newest file
        self._missing = False
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    @property
    def current(self) -> MeshState:
        return self._current

    @property
    def path(self) -> Path:
        return self._path

    @property
    def status(self) -> ConfigStatus:
        if self._rejected is None:
            return ConfigStatus(self._good_digest)
        return ConfigStatus(self._good_digest, *self._rejected)

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("LocalConfigWatcher.start() called twice")
        try:
            stamp, digest, result = await asyncio.to_thread(_read_and_parse, self._path)
        except OSError as exc:
            raise MeshConfigError(
                f"cannot read local config {self._path}: {exc.strerror or exc}; "
                "check LOCAL_XDS_PATH"
            ) from exc
        if isinstance(result, MeshConfigError):
            raise result
        self._stamp, self._seen_digest, self._good_digest = stamp, digest, digest
        self._current = result
        log.info("config_loaded", path=str(self._path), **_counts(result))
        # Unlike later updates, a failing consumer here propagates: the caller is starting up.
        self._on_update(result)
        self._task = asyncio.create_task(self._poll_loop(), name=f"local-config-watch:{self._path}")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def check_now(self) -> bool:
        """Look at the file once; True if a new state was applied. The poll loop uses this."""
        # One check at a time: a manual check racing the poll loop must not apply an older
        # read after a newer one.
        async with self._lock:
            return await self._check()

    async def _check(self) -> bool:
        try:
            stamp = _FileStamp.of(self._path.stat())
        except FileNotFoundError:
            # An editor or an atomic writer may remove the file for a moment; keep going.
            if not self._missing:
                log.warning("config_missing", path=str(self._path))
                self._missing = True
            return False
        except OSError as exc:
            log.warning("config_unreadable", path=str(self._path), error=str(exc))
            return False
        if self._missing:
            log.info("config_reappeared", path=str(self._path))
            self._missing = False
        if stamp == self._stamp:
            return False
        try:
            stamp, digest, result = await asyncio.to_thread(_read_and_parse, self._path)
        except OSError:
            return False  # vanished between stat and open: the next poll sees the new file
        self._stamp = stamp
        if digest == self._seen_digest:
            return False  # touched or rewritten with the same bytes
        self._seen_digest = digest
        if isinstance(result, MeshConfigError):
            log.error("config_rejected", path=str(self._path), error=str(result))
            self._rejected = (digest, str(result))
            return False
        self._rejected = None
        if digest == self._good_digest:
            log.info("config_restored", path=str(self._path))
            return False  # back to the content already in force
        self._good_digest = digest
        self._current = result
        log.info("config_updated", path=str(self._path), **_counts(result))
        self._deliver(result)
        return True

    def _deliver(self, state: MeshState) -> None:
        try:
            self._on_update(state)
        except Exception:
            # A failing consumer must not stop the watcher; the next change retries it.
            log.exception("config_update_callback_failed", path=str(self._path))

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.check_now()
            except Exception:
                log.exception("config_watch_error", path=str(self._path))


def _counts(state: MeshState) -> dict[str, int]:
    return {
        "workloads": len(state.workloads),
        "services": len(state.services),
        "policies": len(state.policies),
        "resources": len(state.l7_resources),
    }
