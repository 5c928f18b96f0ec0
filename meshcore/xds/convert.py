"""MeshState <-> xDS resources. Pure: no I/O.

Resource types and names, as upstream:
- `istio.workload.Address`: a workload, named by its uid; a service, named "namespace/hostname".
- `istio.security.Authorization`: an L4 AuthorizationPolicy (ALLOW or DENY, no targetRefs),
  named "namespace/name". Its scope, action and rules are the parsed policy, which is what an
  upstream tunnel enforces; the extension "ambient.mesh.source" carries the policy as written,
  so this mesh's own clients keep selectors, warnings and the source form. A policy that does
  not parse is sent as the tunnel's fail-closed stand-in (it denies all in its scope).
- `ambient.mesh.L7Resource` (ours): every other document verbatim, named "Kind/namespace/name":
  HTTPRoute, VirtualService, ..., PeerAuthentication, and AuthorizationPolicies that only a
  waypoint enforces (targetRefs) or nobody does at L4 (AUDIT, CUSTOM).

What Istio's messages have no field for rides in extensions an upstream tunnel ignores:
a workload's labels, workload type and the waypoint's `failOpen` ("ambient.mesh.workload"),
a service port's name and whether its protocol was declared ("ambient.mesh.service").

`resources_of(state)` then `decode_resource` on each, then `build_state`, gives back
`canonical(state)`: the same entries ordered by name (resources are a map; order is not sent).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable, Mapping
from typing import Any

from meshcore.defaults import HBONE_PORT, ROOT_NAMESPACE, SERVICE_ACCOUNT, TRUST_DOMAIN
from meshcore.identity.spiffe import IdentityError, SpiffeId
from meshcore.policy import model
from meshcore.policy.parse import parse_policy, salvage_policy
from meshcore.state import (
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
    TunnelProtocol,
    Workload,
)
from meshcore.xds import messages as m
from meshcore.xds.wire import WireError

RESOURCE_TYPES = (m.ADDRESS_TYPE, m.AUTHORIZATION_TYPE, m.L7_RESOURCE_TYPE)
SOURCE_EXTENSION = "ambient.mesh.source"
WORKLOAD_EXTENSION = "ambient.mesh.workload"
SERVICE_EXTENSION = "ambient.mesh.service"
POLICY_KINDS = ("AuthorizationPolicy", "PeerAuthentication")

# Resources: type URL -> resource name -> the encoded message (the `Any`'s value).
Resources = dict[str, dict[str, bytes]]
Decoded = Workload | Service | RawPolicy | RawResource

_PROTOCOLS = {TunnelProtocol.NONE: 0, TunnelProtocol.HBONE: 1}
_STATUSES = {HealthStatus.HEALTHY: 0, HealthStatus.UNHEALTHY: 1}
_WORKLOAD_TYPES = {"deployment": 0, "cronjob": 1, "pod": 2, "job": 3}
_APP_PROTOCOLS = {
    AppProtocol.UNKNOWN: 0,
    AppProtocol.HTTP11: 1,
    AppProtocol.HTTP2: 2,
    AppProtocol.GRPC: 3,
    AppProtocol.TCP: 4,
    AppProtocol.TLS: 5,
}
_SCOPES = {model.Scope.GLOBAL: 0, model.Scope.NAMESPACE: 1, model.Scope.WORKLOAD_SELECTOR: 2}
_ACTIONS = {model.Action.ALLOW: 0, model.Action.DENY: 1}


class ResourceError(ValueError):
    """A resource this mesh cannot use; the message names it and says why (sent in a NACK)."""


def _invert(table: Mapping[Any, int]) -> dict[int, Any]:
    return {v: k for k, v in table.items()}


# -- names ------------------------------------------------------------------------------------


def name_of(item: Decoded) -> tuple[str, str]:
    """(type URL, resource name) of one entry of a MeshState."""
    if isinstance(item, Workload):
        return m.ADDRESS_TYPE, item.uid
    if isinstance(item, Service):
        return m.ADDRESS_TYPE, item.key
    if isinstance(item, RawPolicy) and _is_l4_authorization(item):
        return m.AUTHORIZATION_TYPE, item.key
    return m.L7_RESOURCE_TYPE, f"{item.kind}/{item.namespace}/{item.name}"


def _is_l4_authorization(raw: RawPolicy) -> bool:
    if raw.kind != "AuthorizationPolicy":
        return False
    try:
        policy = parse_policy(raw, ROOT_NAMESPACE)
    except MeshConfigError as exc:
        policy = salvage_policy(raw, ROOT_NAMESPACE, str(exc))
    return policy.enforced


# -- encoding ---------------------------------------------------------------------------------


def _gateway(gw: GatewayAddress | None) -> m.GatewayAddress | None:
    if gw is None:
        return None
    port = gw.hbone_port
    if gw.hostname is not None:
        ns, _, host = gw.hostname.partition("/")
        return m.GatewayAddress(hostname=m.NamespacedHostname(ns, host), hbone_mtls_port=port)
    assert gw.address is not None
    addr = m.NetworkAddress(gw.address.network, gw.address.ip.packed)
    return m.GatewayAddress(address=addr, hbone_mtls_port=port)


def _extension(name: str, type_url: str, msg: object) -> m.Extension:
    return m.Extension(name, m.pack(type_url, msg))


def workload_message(w: Workload) -> m.Workload:
    extras = m.WorkloadExtras(
        labels=tuple(m.Label(k, v) for k, v in w.labels),
        waypoint_fail_open=w.waypoint is not None and w.waypoint.fail_open,
        workload_type=w.workload_type,
    )
    return m.Workload(
        uid=w.uid,
        name=w.name,
        namespace=w.namespace,
        addresses=tuple(ip.packed for ip in w.ips),
        network=w.network,
        tunnel_protocol=_PROTOCOLS[w.protocol],
        trust_domain=w.trust_domain,
        service_account=w.service_account,
        waypoint=_gateway(w.waypoint),
        node=w.node,
        canonical_name=w.canonical_name,
        canonical_revision=w.canonical_revision,
        workload_type=_WORKLOAD_TYPES.get(w.workload_type.lower(), 2),
        workload_name=w.workload_name,
        services=tuple(
            m.ServicesEntry(key, m.PortList(tuple(m.Port(p, t) for p, t in ports)))
            for key, ports in w.services
        ),
        authorization_policies=w.authorization_policies,
        status=_STATUSES[w.status],
        cluster_id=w.cluster_id,
        extensions=(_extension(WORKLOAD_EXTENSION, m.WORKLOAD_EXTRAS_TYPE, extras),),
    )


def service_message(s: Service) -> m.Service:
    extras = m.ServiceExtras(
        ports=tuple(m.PortName(p.port, p.name, p.app_protocol is not None) for p in s.ports),
        waypoint_fail_open=s.waypoint is not None and s.waypoint.fail_open,
    )
    return m.Service(
        name=s.name,
        namespace=s.namespace,
        hostname=s.hostname,
        addresses=tuple(m.NetworkAddress(v.network, v.ip.packed) for v in s.vips),
        ports=tuple(m.Port(p.port, p.target_port, _APP_PROTOCOLS[p.protocol]) for p in s.ports),
        subject_alt_names=s.subject_alt_names,
        waypoint=_gateway(s.waypoint),
        extensions=(_extension(SERVICE_EXTENSION, m.SERVICE_EXTRAS_TYPE, extras),),
    )


def _string_match(sm: model.StringMatch) -> m.StringMatch:
    if sm.kind is model.MatchKind.EXACT:
        return m.StringMatch(exact=sm.value)
    if sm.kind is model.MatchKind.PREFIX:
        return m.StringMatch(prefix=sm.value)
    if sm.kind is model.MatchKind.SUFFIX:
        return m.StringMatch(suffix=sm.value)
    return m.StringMatch(presence=m.Empty())


def _match(x: model.Match) -> m.Match:
    def nets(values: Iterable[Any]) -> tuple[m.IpBlock, ...]:
        return tuple(m.IpBlock(n.network_address.packed, n.prefixlen) for n in values)

    def sas(values: Iterable[model.ServiceAccountMatch]) -> tuple[m.ServiceAccountMatch, ...]:
        return tuple(m.ServiceAccountMatch(v.namespace, v.service_account) for v in values)

    return m.Match(
        namespaces=tuple(_string_match(v) for v in x.namespaces),
        not_namespaces=tuple(_string_match(v) for v in x.not_namespaces),
        service_accounts=sas(x.service_accounts),
        not_service_accounts=sas(x.not_service_accounts),
        principals=tuple(_string_match(v) for v in x.principals),
        not_principals=tuple(_string_match(v) for v in x.not_principals),
        source_ips=nets(x.source_ips),
        not_source_ips=nets(x.not_source_ips),
        destination_ips=nets(x.destination_ips),
        not_destination_ips=nets(x.not_destination_ips),
        destination_ports=x.destination_ports,
        not_destination_ports=x.not_destination_ports,
    )


def authorization_message(raw: RawPolicy) -> m.Authorization:
    try:
        policy = parse_policy(raw, ROOT_NAMESPACE)
    except MeshConfigError as exc:
        policy = salvage_policy(raw, ROOT_NAMESPACE, str(exc))
    rules = tuple(
        m.Rule(tuple(m.Clause(tuple(_match(x) for x in clause)) for clause in rule.clauses))
        for rule in policy.rules
    )
    if policy.error is not None:
        # The stand-in denies everything in its scope: one rule with no clause matches all.
        rules = (m.Rule(),)
    source = m.L7Resource(raw.kind, raw.name, raw.namespace, raw.spec_json)
    return m.Authorization(
        name=raw.name,
        namespace=raw.namespace,
        scope=_SCOPES[policy.scope],
        action=_ACTIONS.get(policy.action, 1),
        rules=rules,
        dry_run=policy.dry_run,
        extensions=(_extension(SOURCE_EXTENSION, m.L7_RESOURCE_TYPE, source),),
    )


def encode_item(item: Decoded) -> tuple[str, str, bytes]:
    """(type URL, name, encoded message) of one entry."""
    type_url, name = name_of(item)
    msg: object
    if isinstance(item, Workload):
        msg = m.Address(workload=workload_message(item))
    elif isinstance(item, Service):
        msg = m.Address(service=service_message(item))
    elif type_url == m.AUTHORIZATION_TYPE:
        assert isinstance(item, RawPolicy)
        msg = authorization_message(item)
    else:
        msg = m.L7Resource(item.kind, item.name, item.namespace, item.spec_json)
    return type_url, name, m.encode(msg)


def resources_of(state: MeshState) -> Resources:
    out: Resources = {t: {} for t in RESOURCE_TYPES}
    items: list[Decoded] = [*state.workloads, *state.services, *state.policies]
    items.extend(state.l7_resources)
    for item in items:
        type_url, name, body = encode_item(item)
        out[type_url][name] = body
    return out


# -- decoding ---------------------------------------------------------------------------------


def _ip(raw: bytes, what: str) -> IPAddress:
    if len(raw) not in (4, 16):
        raise ResourceError(f"{what}: an address is 4 or 16 bytes, not {len(raw)}")
    return ipaddress.ip_address(raw)


def _enum(table: Mapping[Any, int], value: int, what: str) -> Any:
    found = _invert(table).get(value)
    if found is None:
        raise ResourceError(f"{what}: unsupported value {value}")
    return found


def _extras(exts: Iterable[m.Extension], name: str, cls: type[Any], type_url: str) -> Any:
    for ext in exts:
        if ext.name == name and ext.config is not None and ext.config.type_url == type_url:
            return m.decode(cls, ext.config.value)
    return None


def _gateway_of(gw: m.GatewayAddress | None, fail_open: bool, what: str) -> GatewayAddress | None:
    if gw is None:
        return None
    port = gw.hbone_mtls_port or HBONE_PORT
    if gw.hostname is not None:
        host = f"{gw.hostname.namespace}/{gw.hostname.hostname}"
        return GatewayAddress(hostname=host, hbone_port=port, fail_open=fail_open)
    if gw.address is not None:
        addr = NetworkAddress(gw.address.network, _ip(gw.address.address, f"{what}.waypoint"))
        return GatewayAddress(address=addr, hbone_port=port, fail_open=fail_open)
    raise ResourceError(f"{what}: waypoint has neither a hostname nor an address")


def _workload(x: m.Workload, name: str) -> Workload:
    what = f"workload {name}"
    if x.uid != name:
        raise ResourceError(f"{what}: resource name and uid {x.uid!r} differ")
    extras = _extras(x.extensions, WORKLOAD_EXTENSION, m.WorkloadExtras, m.WORKLOAD_EXTRAS_TYPE)
    if extras is None:
        extras = m.WorkloadExtras(
            workload_type=_invert(_WORKLOAD_TYPES).get(x.workload_type, "pod")
        )
    trust_domain = x.trust_domain or TRUST_DOMAIN
    service_account = x.service_account or SERVICE_ACCOUNT
    try:
        SpiffeId(trust_domain, x.namespace, service_account)
    except IdentityError as exc:
        raise ResourceError(f"{what}: {exc}") from exc
    ips = tuple(_ip(a, what) for a in x.addresses)
    if len(set(ips)) != len(ips):
        raise ResourceError(f"{what}: an address is listed twice")
    services: dict[str, tuple[tuple[int, int], ...]] = {}
    for entry in x.services:
        if entry.key.count("/") != 1 or entry.key.startswith("/"):
            raise ResourceError(f"{what}: service key {entry.key!r} is not 'namespace/hostname'")
        ports = () if entry.value is None else entry.value.ports
        for p in ports:
            for port in (p.service_port, p.target_port):
                if not 1 <= port <= 65535:
                    raise ResourceError(f"{what}: port {port} of {entry.key} is not in 1..65535")
        services[entry.key] = tuple(sorted((p.service_port, p.target_port) for p in ports))
    return Workload(
        uid=x.uid,
        name=x.name,
        namespace=x.namespace,
        service_account=service_account,
        trust_domain=trust_domain,
        ips=ips,
        network=x.network,
        protocol=_enum(_PROTOCOLS, x.tunnel_protocol, f"{what}: tunnel_protocol"),
        node=x.node,
        canonical_name=x.canonical_name,
        canonical_revision=x.canonical_revision,
        workload_name=x.workload_name,
        workload_type=extras.workload_type,
        cluster_id=x.cluster_id,
        status=_enum(_STATUSES, x.status, f"{what}: status"),
        waypoint=_gateway_of(x.waypoint, extras.waypoint_fail_open, what),
        services=tuple(sorted(services.items())),
        labels=tuple(sorted((label.key, label.value) for label in extras.labels)),
        authorization_policies=x.authorization_policies,
    )


def _service(x: m.Service, name: str) -> Service:
    what = f"service {name}"
    if f"{x.namespace}/{x.hostname}" != name:
        raise ResourceError(f"{what}: resource name and {x.namespace}/{x.hostname} differ")
    extras = _extras(x.extensions, SERVICE_EXTENSION, m.ServiceExtras, m.SERVICE_EXTRAS_TYPE)
    names = {} if extras is None else {p.port: p for p in extras.ports}
    ports = []
    for p in x.ports:
        detail = names.get(p.service_port)
        declared = p.app_protocol != 0 if detail is None else detail.app_protocol_set
        app = _enum(_APP_PROTOCOLS, p.app_protocol, f"{what}: port {p.service_port}")
        ports.append(
            ServicePort(
                p.service_port,
                p.target_port,
                "" if detail is None else detail.name,
                app if declared else None,
            )
        )
    fail_open = extras is not None and extras.waypoint_fail_open
    return Service(
        name=x.name,
        namespace=x.namespace,
        hostname=x.hostname,
        vips=tuple(NetworkAddress(a.network, _ip(a.address, what)) for a in x.addresses),
        ports=tuple(ports),
        subject_alt_names=x.subject_alt_names,
        waypoint=_gateway_of(x.waypoint, fail_open, what),
    )


def _string_json(x: m.StringMatch) -> dict[str, Any]:
    if x.presence is not None:
        return {"presence": {}}
    for key in ("exact", "prefix", "suffix"):
        value = getattr(x, key)
        if value is not None:
            return {key: value}
    raise ResourceError("a StringMatch sets none of exact, prefix, suffix, presence")


def _match_json(x: m.Match) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for attr, json_name in model.MATCH_FIELDS.items():
        values = getattr(x, attr)
        if not values:
            continue
        if attr.endswith("ports"):
            out[json_name] = list(values)
        elif attr.endswith("ips"):
            out[json_name] = [f"{_ip(v.address, json_name)}/{v.length}" for v in values]
        elif attr.endswith("service_accounts"):
            out[json_name] = [
                {"namespace": v.namespace, "serviceAccount": v.service_account} for v in values
            ]
        else:
            out[json_name] = [_string_json(v) for v in values]
    return out


def _authorization(x: m.Authorization, name: str) -> RawPolicy:
    what = f"authorization {name}"
    if f"{x.namespace}/{x.name}" != name:
        raise ResourceError(f"{what}: resource name and {x.namespace}/{x.name} differ")
    source = _extras(x.extensions, SOURCE_EXTENSION, m.L7Resource, m.L7_RESOURCE_TYPE)
    if source is not None:
        if (source.kind, source.namespace, source.name) != (
            "AuthorizationPolicy",
            *name.split("/"),
        ):
            raise ResourceError(
                f"{what}: its source is {source.kind} {source.namespace}/{source.name}"
            )
        return RawPolicy(x.name, x.namespace, source.json)
    # From another control plane: the xDS form our policy parser reads.
    entry = {
        "name": x.name,
        "namespace": x.namespace,
        "scope": _enum(_SCOPES, x.scope, f"{what}: scope").value,
        "action": _enum(_ACTIONS, x.action, f"{what}: action").value,
        "dryRun": x.dry_run,
        "groups": [
            {"rules": [{"matches": [_match_json(mm) for mm in c.matches]} for c in r.clauses]}
            for r in x.rules
        ],
    }
    try:
        return RawPolicy.from_mapping(x.name, x.namespace, entry)
    except MeshConfigError as exc:
        raise ResourceError(f"{what}: {exc}") from exc


def _l7(x: m.L7Resource, name: str) -> RawPolicy | RawResource:
    if f"{x.kind}/{x.namespace}/{x.name}" != name:
        raise ResourceError(f"resource {name}: it holds {x.kind}/{x.namespace}/{x.name}")
    if not x.kind or not x.name:
        raise ResourceError(f"resource {name}: kind and name must not be empty")
    try:
        json.loads(x.json)
    except ValueError as exc:
        raise ResourceError(f"resource {name}: its document is not JSON: {exc}") from exc
    if x.kind in POLICY_KINDS:
        return RawPolicy(x.name, x.namespace, x.json, x.kind)
    return RawResource(x.kind, x.name, x.namespace, x.json)


def decode_resource(type_url: str, name: str, body: bytes) -> Decoded:
    """One resource as a MeshState entry, or a ResourceError naming it."""
    try:
        if type_url == m.ADDRESS_TYPE:
            addr = m.decode(m.Address, body)
            if addr.workload is not None:
                return _workload(addr.workload, name)
            if addr.service is not None:
                return _service(addr.service, name)
            raise ResourceError(f"address {name}: neither a workload nor a service")
        if type_url == m.AUTHORIZATION_TYPE:
            return _authorization(m.decode(m.Authorization, body), name)
        if type_url == m.L7_RESOURCE_TYPE:
            return _l7(m.decode(m.L7Resource, body), name)
    except WireError as exc:
        raise ResourceError(f"{name}: {exc}") from exc
    except MeshConfigError as exc:
        raise ResourceError(f"{name}: {exc}") from exc
    raise ResourceError(f"{name}: unknown resource type {type_url}")


def _policy_order(p: RawPolicy) -> tuple[str, str, str]:
    return (p.kind, p.namespace, p.name)


def build_state(items: Iterable[Decoded]) -> MeshState:
    """A MeshState of decoded entries, in canonical order; MeshConfigError if they clash."""
    workloads: list[Workload] = []
    services: list[Service] = []
    policies: list[RawPolicy] = []
    resources: list[RawResource] = []
    for item in items:
        if isinstance(item, Workload):
            workloads.append(item)
        elif isinstance(item, Service):
            services.append(item)
        elif isinstance(item, RawPolicy):
            policies.append(item)
        else:
            resources.append(item)
    return MeshState.build(
        sorted(workloads, key=lambda w: w.uid),
        sorted(services, key=lambda s: s.key),
        sorted(policies, key=_policy_order),
        sorted(resources, key=lambda r: (r.kind, r.namespace, r.name)),
    )


def canonical(state: MeshState) -> MeshState:
    """The same entries in the order `build_state` gives them."""
    return build_state([*state.workloads, *state.services, *state.policies, *state.l7_resources])
