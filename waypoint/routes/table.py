"""`RouteTable`: every routing document in force, indexed by service, and the one decision
the proxy asks for each request (`select`).

Invariants: a table never changes after `build`; a document that does not parse, or that
names what does not exist, is reported in `statuses()` and leaves every other route as it
was (it never breaks the routes in force). For one service, Gateway API routes win over a
VirtualService (whose status then says `Conflicted`); the rules of every route attached to
a service are merged and ordered as the Gateway API orders matches, so the first match
wins; a VirtualService's rules keep their written order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from meshcore.state import Service
from waypoint.routes.destinationrule import (
    DEFAULT_POLICY,
    DestinationRule,
    TrafficPolicy,
    parse_destination_rule,
)
from waypoint.routes.document import RouteConfigErrors, each_mapping, identify, read_meta
from waypoint.routes.facts import RequestFacts
from waypoint.routes.filters import redirect_location
from waypoint.routes.gateway import (
    BackendRefSpec,
    GatewayRoute,
    ObjectRef,
    RuleSpec,
    parse_route,
)
from waypoint.routes.model import (
    Action,
    Backend,
    Direct,
    Forward,
    Match,
    MatchKind,
    Mirror,
    Redirect,
    RedirectSpec,
    RouteDecision,
    RouteRef,
)
from waypoint.routes.status import Condition, ResourceStatus
from waypoint.routes.values import RouteConfigError, reader
from waypoint.routes.virtualservice import VirtualService, VsRule, parse_virtual_service

CLUSTER_SUFFIX = "svc.cluster.local"
NOT_FOUND = Direct(404, "route not found")
NO_BACKEND = Direct(500, "no healthy backend: the route's backends are invalid or weigh 0")


@dataclass(frozen=True, slots=True)
class _Entry:
    """One match of one rule, with what to do when it is the first to match."""

    ref: RouteRef
    match: Match
    action: Action | RedirectSpec  # a redirect's Location depends on the request
    matched_prefix: str | None
    port: int | None  # the parentRef's port: the rule applies only to it
    hostnames: tuple[str, ...]
    consumer: str | None  # a consumer route applies only to clients of this namespace
    grpc: bool


def _grant_key(ref: ObjectRef) -> tuple[str, str]:
    return ref.namespace, ref.name


class RouteTable:
    """Immutable; build a new one when the documents or the services change."""

    __slots__ = (
        "_default_policy",
        "_gateway",
        "_policies",
        "_services",
        "_statuses",
        "_vs",
        "messages",
    )

    def __init__(
        self,
        gateway: dict[str, tuple[_Entry, ...]],
        vs: dict[str, tuple[_Entry, ...]],
        policies: dict[str, DestinationRule],
        services: dict[str, Service],
        statuses: tuple[ResourceStatus, ...],
        messages: tuple[str, ...],
    ) -> None:
        self._gateway = gateway
        self._vs = vs
        self._policies = policies
        self._services = services
        self._statuses = statuses
        # Decisions the caller should log once (a VirtualService shadowed by an HTTPRoute).
        self.messages = messages

    # -- building ---------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        documents: Iterable[Any],
        services: Iterable[Service],
        gateway: tuple[str, str] | None = None,
    ) -> RouteTable:
        """Index `documents` (decoded YAML/JSON) against the mesh's `services`.

        `gateway` is this waypoint's Gateway (namespace, name): routes whose parent is that
        Gateway apply to every service it serves.
        """
        return _Builder(services, gateway).build(documents)

    # -- deciding ---------------------------------------------------------------------------

    def select(self, service_key: str | None, port: int, facts: RequestFacts) -> RouteDecision:
        """The route for one request to `service_key` ("ns/hostname"; None when it was sent
        to a pod address, not a service) on service port `port`."""
        if service_key is None:
            return RouteDecision(None, Forward(backends=(Backend(None, port),)))
        entries = self._gateway.get(service_key)
        if entries:
            applicable = [e for e in entries if _applies(e, port, facts)]
            if applicable:
                grpc = [e for e in applicable if e.grpc]
                if facts.is_grpc and grpc:
                    applicable = grpc
                else:
                    applicable = [e for e in applicable if not e.grpc]
                consumer = [e for e in applicable if e.consumer is not None]
                if consumer:  # a client's own namespace's routes take over (mesh consumers)
                    applicable = consumer
                if applicable:
                    return self._first(applicable, port, facts)
        vs_entries = self._vs.get(service_key)
        if vs_entries:
            return self._first(vs_entries, port, facts)
        backend = Backend(service_key, port)
        return RouteDecision(None, Forward(backends=(backend,)))

    def _first(self, entries: Sequence[_Entry], port: int, facts: RequestFacts) -> RouteDecision:
        for entry in entries:
            if entry.match.matches(facts, port):
                action = entry.action
                if isinstance(action, RedirectSpec):
                    location = redirect_location(action, facts, port, entry.matched_prefix)
                    return RouteDecision(entry.ref, _redirect(action.status, location))
                return RouteDecision(entry.ref, action)
        return RouteDecision(None, NOT_FOUND)

    def traffic_policy(
        self, service_key: str, port: int | None = None, subset: str | None = None
    ) -> TrafficPolicy:
        """The DestinationRule settings for a service (Istio's defaults without one)."""
        rule = self._policies.get(service_key)
        return DEFAULT_POLICY if rule is None else rule.traffic_policy(port, subset)

    def subset_labels(self, service_key: str, subset: str) -> tuple[tuple[str, str], ...] | None:
        """The pod labels of a DestinationRule subset, or None if it is not defined."""
        rule = self._policies.get(service_key)
        return None if rule is None else rule.subset_labels(subset)

    def statuses(self) -> tuple[ResourceStatus, ...]:
        return self._statuses


def _redirect(status: int, location: str) -> Action:
    return Redirect(status, location)


def _host_matches(pattern: str, host: str) -> bool:
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    return host == pattern


def _applies(entry: _Entry, port: int, facts: RequestFacts) -> bool:
    if entry.port is not None and entry.port != port:
        return False
    if entry.consumer is not None and facts.source_namespace != entry.consumer:
        return False
    if entry.hostnames:
        host = facts.host
        return any(_host_matches(h, host) for h in entry.hostnames)
    return True


def choose_backend(decision: RouteDecision | Forward, rnd: float) -> Backend:
    """The backend for `rnd` (uniform in [0, 1)): each backend gets its weight's share of
    [0, 1), in order. Backends of weight 0 are never chosen."""
    forward = decision.action if isinstance(decision, RouteDecision) else decision
    if not isinstance(forward, Forward):
        raise TypeError(f"only a Forward has backends, not {type(forward).__name__}")
    total = sum(b.weight for b in forward.backends)
    if total <= 0:
        return forward.backends[0]
    target = min(max(rnd, 0.0), 1.0) * total
    running = 0
    for backend in forward.backends:
        running += backend.weight
        if target < running:
            return backend
    return next(b for b in reversed(forward.backends) if b.weight > 0)


# -- the builder -------------------------------------------------------------------------------


class _Builder:
    def __init__(self, services: Iterable[Service], gateway: tuple[str, str] | None) -> None:
        self.services = {s.key: s for s in services}
        self.by_name = {(s.namespace, s.name): s for s in self.services.values()}
        self.by_host = {s.hostname: s for s in self.services.values()}
        self.gateway = gateway
        self.statuses: list[ResourceStatus] = []
        self.messages: list[str] = []
        self.grants: set[tuple[str, str, str, str]] = set()  # (from kind, from ns, to ns, to name)

    def build(self, documents: Iterable[Any]) -> RouteTable:
        routes: list[GatewayRoute] = []
        services_vs: list[VirtualService] = []
        rules: list[DestinationRule] = []
        seen: set[tuple[str, str, str]] = set()
        for doc in documents:
            kind, ns, name = identify(doc)
            if (kind, ns, name) in seen and kind != "?":
                self._invalid(kind, ns, name, [f"{kind} {ns}/{name} is given twice"])
                continue
            seen.add((kind, ns, name))
            try:
                if kind in ("HTTPRoute", "GRPCRoute"):
                    routes.append(parse_route(doc))
                elif kind == "VirtualService":
                    services_vs.append(parse_virtual_service(doc))
                elif kind == "DestinationRule":
                    rules.append(parse_destination_rule(doc))
                elif kind == "ReferenceGrant":
                    self._grant(doc)
                else:
                    raise RouteConfigError(f"kind: {kind!r} is not a routing resource")
            except RouteConfigErrors as exc:
                self._invalid(kind, ns, name, exc.messages)
            except RouteConfigError as exc:
                self._invalid(kind, ns, name, [str(exc)])
        gateway = self._gateway_routes(routes)
        vs = self._virtual_services(services_vs, gateway)
        policies = self._destination_rules(rules)
        return RouteTable(
            gateway, vs, policies, self.services, tuple(self.statuses), tuple(self.messages)
        )

    def _invalid(self, kind: str, ns: str, name: str, errors: list[str]) -> None:
        condition = Condition("Accepted", False, "UnsupportedValue", "; ".join(errors))
        self.statuses.append(ResourceStatus(kind, ns, name, (condition,), tuple(errors)))

    def _grant(self, doc: Any) -> None:
        r = reader()
        meta, spec = read_meta(r, doc, ("ReferenceGrant",))
        r.check_keys(spec, ("from", "to"), "spec")
        froms = each_mapping(r, spec.get("from"), "spec.from", 16)
        tos = each_mapping(r, spec.get("to"), "spec.to", 16)
        for at, entry in froms:
            r.check_keys(entry, ("group", "kind", "namespace"), at)
            r.string(entry, "group", at, empty_ok=True)
        for at, entry in tos:
            r.check_keys(entry, ("group", "kind", "name"), at)
        for _, f in froms:
            for _, t in tos:
                if t.get("kind") == "Service" and t.get("group", "") in ("", "core"):
                    self.grants.add(
                        (
                            str(f.get("kind")),
                            str(f.get("namespace")),
                            meta.namespace,
                            str(t.get("name") or "*"),
                        )
                    )
        self.statuses.append(
            ResourceStatus(
                "ReferenceGrant",
                meta.namespace,
                meta.name,
                (Condition("Accepted", True, "Accepted"),),
            )
        )

    def _permitted(self, kind: str, from_ns: str, ref: ObjectRef) -> bool:
        if ref.namespace == from_ns:
            return True
        return (kind, from_ns, ref.namespace, ref.name) in self.grants or (
            kind,
            from_ns,
            ref.namespace,
            "*",
        ) in self.grants

    # -- Gateway API routes --------------------------------------------------------------------

    def _gateway_routes(self, routes: list[GatewayRoute]) -> dict[str, tuple[_Entry, ...]]:
        keyed: dict[str, list[tuple[tuple[Any, ...], _Entry]]] = {}
        for route in routes:
            meta = route.meta
            conditions: list[Condition] = []
            backends, resolved = self._resolve_rules(route)
            for parent in route.parents:
                targets, accepted = self._parent(route, parent)
                conditions.append(replace(accepted, parent=str(parent)))
                conditions.append(replace(resolved, parent=str(parent)))
                if not accepted.status:
                    continue
                consumer = None
                if parent.is_service and parent.namespace != meta.namespace:
                    consumer = meta.namespace
                for key in targets:
                    for ri, (rule, rule_backends) in enumerate(
                        zip(route.rules, backends, strict=True)
                    ):
                        ref = RouteRef(meta.kind, meta.namespace, meta.name, ri)
                        for mi, (match, mkey) in enumerate(
                            zip(rule.matches, rule.keys, strict=True)
                        ):
                            entry = _entry(
                                ref,
                                rule,
                                rule_backends,
                                match,
                                parent.port,
                                route.hostnames,
                                consumer,
                                meta.kind == "GRPCRoute",
                                self._mirrors(route, rule),
                            )
                            order = (
                                tuple(-k for k in mkey),
                                meta.created is None,
                                meta.created or "",
                                meta.namespace,
                                meta.name,
                                ri,
                                mi,
                            )
                            keyed.setdefault(key, []).append((order, entry))
            self.statuses.append(
                ResourceStatus(meta.kind, meta.namespace, meta.name, tuple(conditions))
            )
        return {k: tuple(e for _, e in sorted(v, key=lambda t: t[0])) for k, v in keyed.items()}

    def _parent(self, route: GatewayRoute, parent: ObjectRef) -> tuple[list[str], Condition]:
        if parent.is_service:
            service = self.by_name.get((parent.namespace, parent.name))
            if service is None:
                return [], Condition(
                    "Accepted",
                    False,
                    "NoMatchingParent",
                    f"no Service {parent.namespace}/{parent.name}",
                )
            if parent.port is not None and service.target_port(parent.port) is None:
                return [], Condition(
                    "Accepted",
                    False,
                    "NoMatchingParent",
                    f"Service {service.key} has no port {parent.port}",
                )
            return [service.key], Condition("Accepted", True, "Accepted")
        if parent.is_gateway:
            if self.gateway != (parent.namespace, parent.name):
                return [], Condition(
                    "Accepted",
                    False,
                    "NoMatchingParent",
                    f"Gateway {parent.namespace}/{parent.name} is not this waypoint",
                )
            if route.meta.namespace != parent.namespace:
                return [], Condition(
                    "Accepted",
                    False,
                    "NotAllowedByListeners",
                    "the waypoint's listener allows routes from its own namespace only",
                )
            return sorted(self.services), Condition("Accepted", True, "Accepted")
        return [], Condition(
            "Accepted",
            False,
            "NoMatchingParent",
            f"a parent must be a Service or the waypoint's Gateway, not {parent.kind}",
        )

    def _resolve(self, route: GatewayRoute, ref: ObjectRef) -> tuple[str | None, Condition | None]:
        if not ref.is_service:
            return None, Condition(
                "ResolvedRefs", False, "InvalidKind", f"backend {ref} is not a Service"
            )
        if not self._permitted(route.meta.kind, route.meta.namespace, ref):
            return None, Condition(
                "ResolvedRefs", False, "RefNotPermitted", f"no ReferenceGrant allows {ref}"
            )
        service = self.by_name.get((ref.namespace, ref.name))
        if service is None:
            return None, Condition(
                "ResolvedRefs", False, "BackendNotFound", f"no Service {ref.namespace}/{ref.name}"
            )
        if ref.port is not None and service.target_port(ref.port) is None:
            return None, Condition(
                "ResolvedRefs",
                False,
                "BackendNotFound",
                f"Service {service.key} has no port {ref.port}",
            )
        return service.key, None

    def _resolve_rules(self, route: GatewayRoute) -> tuple[list[tuple[Backend, ...]], Condition]:
        problems: list[Condition] = []
        out: list[tuple[Backend, ...]] = []
        for rule in route.rules:
            resolved = []
            for spec in rule.backends:
                key, problem = self._resolve(route, spec.ref)
                if problem is not None:
                    problems.append(problem)
                resolved.append(_backend(spec, key))
            out.append(tuple(resolved))
        if problems:
            first = problems[0]
            message = "; ".join(p.message for p in problems)
            return out, Condition("ResolvedRefs", False, first.reason, message)
        return out, Condition("ResolvedRefs", True, "ResolvedRefs")

    def _mirrors(self, route: GatewayRoute, rule: RuleSpec) -> tuple[Mirror, ...]:
        out = []
        for mirror in rule.mirrors:
            key, _ = self._resolve(route, mirror.ref)
            if key is not None and mirror.ref.port is not None:
                out.append(Mirror(key, mirror.ref.port, mirror.percent))
        return tuple(out)

    # -- VirtualServices -----------------------------------------------------------------------

    def _service_for_host(self, host: str, namespace: str) -> Service | None:
        if "." not in host:
            host = f"{host}.{namespace}.{CLUSTER_SUFFIX}"
        elif host.count(".") == 1:
            host = f"{host}.{CLUSTER_SUFFIX}"
        return self.by_host.get(host)

    def _virtual_services(
        self, items: list[VirtualService], gateway: Mapping[str, tuple[_Entry, ...]]
    ) -> dict[str, tuple[_Entry, ...]]:
        out: dict[str, tuple[_Entry, ...]] = {}
        owner: dict[str, str] = {}
        ordered = sorted(
            items,
            key=lambda v: (
                v.meta.created is None,
                v.meta.created or "",
                v.meta.namespace,
                v.meta.name,
            ),
        )
        for vs in ordered:
            meta = vs.meta
            conditions: list[Condition] = []
            for host in vs.hosts:
                service = self._service_for_host(host, meta.namespace)
                if service is None:
                    conditions.append(
                        Condition(
                            "Accepted",
                            False,
                            "NoMatchingParent",
                            f"host {host!r} is no known service",
                        )
                    )
                    continue
                shadow = gateway.get(service.key)
                if shadow:
                    route = shadow[0].ref
                    message = (
                        f"VirtualService {meta.key} is not applied to {service.key}: "
                        f"{route.kind} {route.namespace}/{route.name} targets it and wins"
                    )
                    conditions.append(Condition("Accepted", False, "Conflicted", message, host))
                    self.messages.append(message)
                    continue
                if service.key in owner:
                    message = (
                        f"VirtualService {meta.key} is not applied to {service.key}: "
                        f"VirtualService {owner[service.key]} is older and wins"
                    )
                    conditions.append(Condition("Accepted", False, "Conflicted", message, host))
                    self.messages.append(message)
                    continue
                owner[service.key] = meta.key
                out[service.key] = self._vs_entries(vs, service)
                conditions.append(Condition("Accepted", True, "Accepted", "", host))
            self.statuses.append(
                ResourceStatus("VirtualService", meta.namespace, meta.name, tuple(conditions))
            )
        return out

    def _vs_entries(self, vs: VirtualService, service: Service) -> tuple[_Entry, ...]:
        entries = []
        for ri, rule in enumerate(vs.rules):
            ref = RouteRef("VirtualService", vs.meta.namespace, vs.meta.name, ri)
            action = self._vs_action(vs, rule, service)
            for match in rule.matches:
                prefix = None
                if match.path is not None and match.path.kind is MatchKind.STRING_PREFIX:
                    prefix = match.path.value
                act = action
                if isinstance(act, Forward) and prefix is not None and act.rewrite is not None:
                    act = replace(act, matched_prefix=prefix)
                entries.append(_Entry(ref, match, act, prefix, None, (), None, False))
        return tuple(entries)

    def _vs_action(
        self, vs: VirtualService, rule: VsRule, service: Service
    ) -> Action | RedirectSpec:
        if rule.redirect is not None:
            return rule.redirect
        if rule.direct is not None:
            return Direct(*rule.direct)
        backends = []
        for dest in rule.destinations:
            target = self._service_for_host(dest.host, vs.meta.namespace)
            port = dest.port
            if target is not None and port is None and len(target.ports) == 1:
                port = target.ports[0].port
            backends.append(
                Backend(
                    target.key if target is not None else None,
                    port if port is not None else 0,  # 0: the port the request came to
                    dest.weight,
                    dest.subset,
                    dest.request_headers,
                    dest.response_headers,
                    None if target is not None else 500,
                )
            )
        if not any(b.weight > 0 and b.status is None for b in backends):
            return NO_BACKEND
        mirrors = []
        for m in rule.mirrors:
            target = self._service_for_host(m.destination.host, vs.meta.namespace)
            if target is not None:
                mport = m.destination.port or (target.ports[0].port if target.ports else 0)
                mirrors.append(Mirror(target.key, mport, m.percent))
        return Forward(
            backends=tuple(b for b in backends if b.weight > 0),
            request_headers=rule.request_headers,
            response_headers=rule.response_headers,
            rewrite=rule.rewrite,
            mirrors=tuple(mirrors),
            timeouts=rule.timeouts,
            retry=rule.retry,
            fault=rule.fault,
        )

    # -- DestinationRules ----------------------------------------------------------------------

    def _destination_rules(self, rules: list[DestinationRule]) -> dict[str, DestinationRule]:
        out: dict[str, DestinationRule] = {}
        ordered = sorted(
            rules,
            key=lambda d: (
                d.meta.created is None,
                d.meta.created or "",
                d.meta.namespace,
                d.meta.name,
            ),
        )
        for rule in ordered:
            meta = rule.meta
            service = self._service_for_host(rule.host, meta.namespace)
            if service is None:
                condition = Condition(
                    "Accepted", False, "NoMatchingParent", f"host {rule.host!r} is no known service"
                )
            elif service.key in out:
                winner = out[service.key].meta.key
                condition = Condition(
                    "Accepted", False, "Conflicted", f"DestinationRule {winner} is older and wins"
                )
            else:
                out[service.key] = rule
                condition = Condition("Accepted", True, "Accepted")
            self.statuses.append(
                ResourceStatus("DestinationRule", meta.namespace, meta.name, (condition,))
            )
        return out


def _backend(spec: BackendRefSpec, key: str | None) -> Backend:
    return Backend(
        service_key=key,
        port=spec.ref.port or 0,
        weight=spec.weight,
        request_headers=spec.request_headers,
        response_headers=spec.response_headers,
        status=None if key is not None else 500,
    )


def _entry(
    ref: RouteRef,
    rule: RuleSpec,
    backends: tuple[Backend, ...],
    match: Match,
    port: int | None,
    hostnames: tuple[str, ...],
    consumer: str | None,
    grpc: bool,
    mirrors: tuple[Mirror, ...],
) -> _Entry:
    prefix = None
    if match.path is not None and match.path.kind is MatchKind.PREFIX:
        prefix = match.path.value
    action: Action | RedirectSpec
    if rule.redirect is not None:
        action = rule.redirect
    elif not any(b.weight > 0 for b in backends) or all(b.status is not None for b in backends):
        # No backends, all of weight 0, or none resolved: the Gateway API says 500.
        action = NO_BACKEND
    else:
        action = Forward(
            backends=tuple(b for b in backends if b.weight > 0),
            request_headers=rule.request_headers,
            response_headers=rule.response_headers,
            rewrite=rule.rewrite,
            matched_prefix=prefix,
            mirrors=mirrors,
            timeouts=rule.timeouts,
            retry=rule.retry,
        )
    return _Entry(ref, match, action, prefix, port, hostnames, consumer, grpc)
