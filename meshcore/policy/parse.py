"""AuthorizationPolicy parsing: an entry of the mesh config to a validated `Policy`. Pure.

`parse_policy` raises MeshConfigError (and nothing else) with a message naming the entry and the
field; `salvage_policy` builds the fail-closed stand-in for an entry that did not parse.

Entry forms accepted (all three may carry `selector: {matchLabels}`):
- Istio resource: `apiVersion`, `kind: AuthorizationPolicy`, `metadata: {name, namespace,
  annotations}`, `spec: {selector, action, rules, provider, targetRef(s)}`; dry run is the
  annotation `istio.io/dry-run: "true"`.
- flat: `name`, `namespace`, then the spec's fields at the top level, plus optional `scope`
  and `dryRun`.
- xDS (istio.security.Authorization, camelCase): `name`, `namespace`, `scope`, `action`,
  `dryRun`, `groups: [{rules: [{matches: [Match]}]}]`, where a Match holds `namespaces`,
  `principals` (StringMatch: `{exact|prefix|suffix: s}`, `{presence: {}}`, or a string in Istio
  notation), `serviceAccounts` (`{namespace, serviceAccount}` or "ns/sa"), `sourceIps`,
  `destinationIps` (IP or CIDR strings, or `{address: base64, length}`), `destinationPorts`,
  each with its `not` form. ztunnel's own config shape, `rules: [[[Match]]]` (rules of
  clauses of matches), is accepted as well.

L7 fields (hosts, methods, paths, requestPrincipals, remoteIpBlocks and their `not` forms, and
any `when` key other than source.ip, source.namespace, source.principal, destination.ip,
destination.port): in an ALLOW policy the whole rule is dropped (it never matches); in a DENY
policy they are ignored and the rule's L4 part is enforced; both are stricter than requested,
and each adds a warning to `Policy.warnings`. One deliberate difference from ztunnel today: a
DENY entry left with no L4 field (e.g. `to: [{operation: {methods: [GET]}}]`) matches
everything, as istiod documents and as sidecars enforce it; ztunnel turns it into an empty
match that never fires, so such a DENY has no effect there (istio/istio#61126).
"""

from __future__ import annotations

import base64
import binascii
import functools
import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from meshcore.defaults import ROOT_NAMESPACE
from meshcore.policy.model import (
    MATCH_FIELDS,
    Action,
    IPNetwork,
    Match,
    MatchKind,
    Policy,
    Rule,
    Scope,
    ServiceAccountMatch,
    StringMatch,
)
from meshcore.policy.resource import Labels, parse_selector, reader_for, unwrap
from meshcore.reader import Reader, describe, join
from meshcore.state import MeshConfigError, RawPolicy

_SPIFFE = "spiffe://"


_SPEC_KEYS = ("selector", "action", "rules", "provider", "targetRef", "targetRefs")
_FLAT_KEYS = ("name", "namespace", "scope", "dryRun", "groups", *_SPEC_KEYS)

_SOURCE_L4 = {
    "principals": "principals",
    "notPrincipals": "not_principals",
    "namespaces": "namespaces",
    "notNamespaces": "not_namespaces",
    "serviceAccounts": "service_accounts",
    "notServiceAccounts": "not_service_accounts",
    "ipBlocks": "source_ips",
    "notIpBlocks": "not_source_ips",
}
_SOURCE_L7 = (
    "requestPrincipals",
    "notRequestPrincipals",
    "remoteIpBlocks",
    "notRemoteIpBlocks",
)
_OPERATION_L4 = {"ports": "destination_ports", "notPorts": "not_destination_ports"}
_OPERATION_L7 = ("hosts", "notHosts", "methods", "notMethods", "paths", "notPaths")
_ENTRY_KEYS = {
    "source": frozenset((*_SOURCE_L4, *_SOURCE_L7)),
    "operation": frozenset((*_OPERATION_L4, *_OPERATION_L7)),
}
# when key -> (Match field for values, Match field for notValues)
_WHEN_L4 = {
    "source.ip": ("source_ips", "not_source_ips"),
    "source.namespace": ("namespaces", "not_namespaces"),
    "source.principal": ("principals", "not_principals"),
    "destination.ip": ("destination_ips", "not_destination_ips"),
    "destination.port": ("destination_ports", "not_destination_ports"),
}


def _scope_of(selector: Labels, namespace: str, root: str) -> Scope:
    if selector:
        return Scope.WORKLOAD_SELECTOR
    if namespace in (root, ""):
        return Scope.GLOBAL
    return Scope.NAMESPACE


def _enum_value(where: Reader, value: Any, path: str, choices: Iterable[str]) -> str:
    """An enum name; ztunnel's spelling ("Allow", "WorkloadSelector") is accepted too."""
    names = tuple(choices)
    if isinstance(value, str):
        folded = value.replace("_", "").upper()
        for name in names:
            if name.replace("_", "") == folded:
                return name
    where.fail(path, f"expected one of {', '.join(names)}, got {value!r}")


def _ip(where: Reader, value: Any, path: str) -> IPNetwork:
    if isinstance(value, dict):  # proto JSON Address: {address: base64 bytes, length}
        where.check_keys(value, ("address", "length"), path)
        try:
            packed = base64.b64decode(str(value.get("address", "")), validate=True)
            addr = ipaddress.ip_address(packed)
        except (binascii.Error, ValueError):
            where.fail(join(path, "address"), "expected 4 or 16 base64-encoded bytes")
        length = value.get("length", addr.max_prefixlen)
        if isinstance(length, bool) or not isinstance(length, int):
            where.fail(join(path, "length"), f"expected a number, got {describe(length)}")
        if not 0 <= length <= addr.max_prefixlen:
            where.fail(join(path, "length"), f"{length} is not in 0..{addr.max_prefixlen}")
        return ipaddress.ip_network((addr, length), strict=False)
    if not isinstance(value, str) or not value:
        where.fail(path, f"expected an IP address or CIDR, got {value!r}")
    net = _network(value)
    if net is None:
        kind = "CIDR" if "/" in value else "IP address"
        where.fail(path, f"{value!r} is not a valid {kind}")
    return net


@functools.lru_cache(maxsize=4096)
def _network(text: str) -> IPNetwork | None:
    # Cached: the same blocks recur across policies, and ipaddress parsing is slow.
    try:
        # Host bits may be set ("10.1.2.3/16"), as Go's netip.ParsePrefix allows.
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None


def _service_account(where: Reader, text: str, path: str, namespace: str) -> ServiceAccountMatch:
    if "*" in text:
        where.fail(path, f"{text!r}: wildcards are not supported in service accounts")
    ns, slash, sa = text.partition("/")
    if not slash:
        # A bare name is in the policy's own namespace, as istiod reads it.
        ns, sa = namespace, text
    if not ns or not sa or "/" in sa:
        where.fail(path, f"{text!r} must be 'namespace/serviceaccount' or 'serviceaccount'")
    return ServiceAccountMatch(ns, sa)


def _l4_values(
    where: Reader, field_name: str, raw: Any, path: str, namespace: str, warnings: list[str]
) -> tuple[Any, ...]:
    """Istio-form values (strings; ports may also be numbers) of one L4 Match field."""
    # Element paths ("...[3]") are only formatted when there is an error to report.
    if field_name.endswith("ports"):
        ports = where.items(raw, path)
        out_ports = []
        for i, v in enumerate(ports):
            if isinstance(v, str) and v.isascii() and v.isdigit() and int(v) <= 65535:
                out_ports.append(int(v))
            else:
                out_ports.append(where.port(v, f"{path}[{i}]", low=0))
        return tuple(out_ports)
    values = where.strings(raw, path)
    if field_name.endswith("ips"):
        nets = []
        for i, v in enumerate(values):
            net = _network(v)
            nets.append(net if net is not None else _ip(where, v, f"{path}[{i}]"))
        return tuple(nets)
    if field_name.endswith("service_accounts"):
        return tuple(
            _service_account(where, v, f"{path}[{i}]", namespace) for i, v in enumerate(values)
        )
    if field_name.endswith("principals"):
        for v in values:
            if v.startswith(_SPIFFE):
                warnings.append(
                    f"{path}: {v!r} starts with {_SPIFFE}; principals are written without "
                    "it, so this value never matches"
                )
    return tuple(StringMatch.istio(v) for v in values)


class _RuleParse:
    """Parses one Istio-form rule into its L4 clauses, noting the L7 fields it uses."""

    def __init__(self, where: Reader, namespace: str, path: str) -> None:
        self.where = where
        self.namespace = namespace
        self.path = path
        self.l7: list[str] = []
        self.notes: list[str] = []  # non-L7 warnings (e.g. spiffe:// principals)
        # Per clause: a tuple of matches, or None when some entry matches everything once
        # its L7 fields are ignored (only meaningful for DENY).
        self.clauses: list[tuple[Match, ...] | None] = []

    def entries(
        self, raw: Any, name: str, inner: str, l4: Mapping[str, str], l7: Sequence[str]
    ) -> None:
        path = join(self.path, name)
        entries = self.where.items(raw, path)
        if raw is not None and not entries:
            self.where.fail(path, f"`{name}` must not be empty; omit it to match any {inner}")
        matches: list[Match] = []
        everything = False
        for i, entry in enumerate(entries):
            entry_path = f"{path}[{i}]"
            outer = self.where.mapping(entry, entry_path)
            self.where.check_keys(outer, (inner,), entry_path)
            body_path = f"{entry_path}.{inner}"
            if outer.get(inner) is None:
                self.where.fail(body_path, f"`{inner}` is required")
            body = self.where.mapping(outer[inner], body_path)
            self.where.check_keys(body, _ENTRY_KEYS[inner], body_path)
            if not any(body.get(k) for k in body):
                self.where.fail(body_path, f"`{inner}` must set at least one field")
            kwargs: dict[str, tuple[Any, ...]] = {}
            for key, raw_values in body.items():
                if key in l4:
                    vals = _l4_values(
                        self.where,
                        l4[key],
                        raw_values,
                        f"{body_path}.{key}",
                        self.namespace,
                        self.notes,
                    )
                    if vals:
                        kwargs[l4[key]] = vals
                else:
                    if self.where.strings(raw_values, f"{body_path}.{key}"):
                        self.l7.append(key)
            if inner == "source" and (
                kwargs.keys() & {"service_accounts", "not_service_accounts"}
                and kwargs.keys() & {"principals", "not_principals", "namespaces", "not_namespaces"}
            ):
                self.where.fail(
                    body_path, "cannot set serviceAccounts with namespaces or principals"
                )
            if kwargs:
                matches.append(Match(**kwargs))
            else:
                everything = True  # only L7 fields: at L4 this entry matches any connection
        if entries:
            self.clauses.append(None if everything else tuple(matches))

    def conditions(self, raw: Any) -> None:
        path = join(self.path, "when")
        for i, cond in enumerate(self.where.items(raw, path)):
            cpath = f"{path}[{i}]"
            body = self.where.mapping(cond, cpath)
            self.where.check_keys(body, ("key", "values", "notValues"), cpath)
            key = body.get("key")
            if not isinstance(key, str) or not key:
                self.where.fail(f"{cpath}.key", "must be a non-empty string")
            values = self.where.items(body.get("values"), f"{cpath}.values")
            not_values = self.where.items(body.get("notValues"), f"{cpath}.notValues")
            if not values and not not_values:
                self.where.fail(cpath, f"at least one of values or notValues must be set for {key}")
            if key not in _WHEN_L4:
                self.where.strings(values, f"{cpath}.values")
                self.where.strings(not_values, f"{cpath}.notValues")
                self.l7.append(key)
                self.clauses.append(None)
                continue
            pos, neg = _WHEN_L4[key]
            kwargs: dict[str, tuple[Any, ...]] = {}
            for fname, vals, sub in ((pos, values, "values"), (neg, not_values, "notValues")):
                if vals:
                    kwargs[fname] = _l4_values(
                        self.where, fname, vals, f"{cpath}.{sub}", self.namespace, self.notes
                    )
            self.clauses.append((Match(**kwargs),))


def _parse_istio_rules(
    where: Reader, raw: Any, path: str, namespace: str, action: Action, warnings: list[str]
) -> tuple[Rule, ...]:
    rules: list[Rule] = []
    for i, entry in enumerate(where.items(raw, path)):
        rpath = f"{path}[{i}]"
        body = where.mapping(entry, rpath)
        where.check_keys(body, ("from", "to", "when"), rpath)
        p = _RuleParse(where, namespace, rpath)
        p.entries(body.get("from"), "from", "source", _SOURCE_L4, _SOURCE_L7)
        p.entries(body.get("to"), "to", "operation", _OPERATION_L4, _OPERATION_L7)
        p.conditions(body.get("when"))
        warnings.extend(p.notes)
        if p.l7 and action in (Action.ALLOW, Action.DENY):
            fields = ", ".join(f"`{f}`" for f in dict.fromkeys(p.l7))
            plural = "s" if len(dict.fromkeys(p.l7)) > 1 else ""
            if action is Action.ALLOW:
                warnings.append(
                    f"rule {i} uses L7 field{plural} {fields}; dropped from this ALLOW policy "
                    "(matches nothing; a waypoint can enforce HTTP rules)"
                )
                continue
            clauses = [c for c in p.clauses if c is not None]
            tail = (
                "it now denies every connection in its scope"
                if not clauses
                else "only its L4 part is enforced"
            )
            warnings.append(
                f"rule {i} uses L7 field{plural} {fields}; ignored in this DENY policy, so "
                f"{tail} (stricter than requested)"
            )
        rules.append(Rule(tuple(c for c in p.clauses if c is not None), i))
    return tuple(rules)


_XDS_MATCH_KEYS = {
    **{json_name: name for name, json_name in MATCH_FIELDS.items()},
    **{name: name for name in MATCH_FIELDS},  # proto JSON also accepts field names
}


def _xds_string_match(where: Reader, value: Any, path: str) -> StringMatch:
    if isinstance(value, str):
        if not value:
            where.fail(path, "empty values are not allowed")
        return StringMatch.istio(value)
    body = where.mapping(value, path)
    if len(body) != 1:
        where.fail(path, "expected exactly one of exact, prefix, suffix, presence")
    ((key, text),) = body.items()
    kind = key.lower()
    if kind == "presence":
        if text not in (None, {}, []):
            where.fail(f"{path}.{key}", f"expected {{}}, got {text!r}")
        return StringMatch(MatchKind.PRESENCE)
    if kind not in ("exact", "prefix", "suffix"):
        where.fail(
            f"{path}.{key}", "unknown field (expected one of exact, prefix, suffix, presence)"
        )
    if not isinstance(text, str):
        where.fail(f"{path}.{key}", f"expected a string, got {describe(text)}")
    return StringMatch(MatchKind(kind), text)


def _xds_service_account(
    where: Reader, value: Any, path: str, namespace: str
) -> ServiceAccountMatch:
    if isinstance(value, str):
        return _service_account(where, value, path, namespace)
    body = where.mapping(value, path)
    where.check_keys(body, ("namespace", "serviceAccount", "service_account"), path)
    ns = body.get("namespace")
    sa = body.get("serviceAccount", body.get("service_account"))
    if not isinstance(ns, str) or not ns:
        where.fail(f"{path}.namespace", "must be a non-empty string")
    if not isinstance(sa, str) or not sa:
        where.fail(f"{path}.serviceAccount", "must be a non-empty string")
    return ServiceAccountMatch(ns, sa)


def _xds_match(where: Reader, value: Any, path: str, namespace: str) -> Match:
    body = where.mapping(value, path)
    where.check_keys(body, _XDS_MATCH_KEYS, path)
    kwargs: dict[str, tuple[Any, ...]] = {}
    for key, raw in body.items():
        name = _XDS_MATCH_KEYS[key]
        fpath = f"{path}.{key}"
        values = where.items(raw, fpath)
        parsed: tuple[Any, ...]
        if name.endswith("ips"):
            parsed = tuple(_ip(where, v, f"{fpath}[{i}]") for i, v in enumerate(values))
        elif name.endswith("ports"):
            parsed = tuple(where.port(v, f"{fpath}[{i}]", low=0) for i, v in enumerate(values))
        elif name.endswith("service_accounts"):
            parsed = tuple(
                _xds_service_account(where, v, f"{fpath}[{i}]", namespace)
                for i, v in enumerate(values)
            )
        else:
            parsed = tuple(
                _xds_string_match(where, v, f"{fpath}[{i}]") for i, v in enumerate(values)
            )
        if parsed:
            kwargs[name] = kwargs.get(name, ()) + parsed
    return Match(**kwargs)


def _parse_xds_groups(where: Reader, raw: Any, namespace: str) -> tuple[Rule, ...]:
    rules: list[Rule] = []
    for g, group in enumerate(where.items(raw, "groups")):
        gpath = f"groups[{g}]"
        gbody = where.mapping(group, gpath)
        where.check_keys(gbody, ("rules",), gpath)
        clauses: list[tuple[Match, ...]] = []
        for r, clause in enumerate(where.items(gbody.get("rules"), f"{gpath}.rules")):
            cpath = f"{gpath}.rules[{r}]"
            cbody = where.mapping(clause, cpath)
            where.check_keys(cbody, ("matches",), cpath)
            matches = where.items(cbody.get("matches"), f"{cpath}.matches")
            clauses.append(
                tuple(
                    _xds_match(where, m, f"{cpath}.matches[{i}]", namespace)
                    for i, m in enumerate(matches)
                )
            )
        rules.append(Rule(tuple(clauses), g))
    return tuple(rules)


def _parse_nested_rules(where: Reader, raw: list[Any], namespace: str) -> tuple[Rule, ...]:
    """ztunnel's config shape: rules -> clauses -> matches, as nested lists."""
    rules: list[Rule] = []
    for r, rule in enumerate(raw):
        rpath = f"rules[{r}]"
        clauses = []
        for c, clause in enumerate(where.items(rule, rpath)):
            cpath = f"{rpath}[{c}]"
            clauses.append(
                tuple(
                    _xds_match(where, m, f"{cpath}[{i}]", namespace)
                    for i, m in enumerate(where.items(clause, cpath))
                )
            )
        rules.append(Rule(tuple(clauses), r))
    return tuple(rules)


def _target_refs(where: Reader, body: Mapping[str, Any], path: str) -> tuple[str, ...]:
    refs: list[Any] = []
    if body.get("targetRef") is not None:
        refs.append(where.mapping(body["targetRef"], join(path, "targetRef")))
    refs.extend(where.items(body.get("targetRefs"), join(path, "targetRefs")))
    out = []
    for i, ref in enumerate(refs):
        rpath = join(path, f"targetRefs[{i}]")
        ref_body = where.mapping(ref, rpath)
        kind, name = ref_body.get("kind"), ref_body.get("name")
        if not isinstance(kind, str) or not kind or not isinstance(name, str) or not name:
            where.fail(rpath, "a target reference needs a kind and a name")
        out.append(f"{kind}/{name}")
    return tuple(out)


def parse_policy(raw: RawPolicy, root_namespace: str = ROOT_NAMESPACE) -> Policy:
    """Parse and validate one AuthorizationPolicy.

    Raises MeshConfigError (and nothing else) with a message naming the entry and the field.
    """
    where = reader_for("AuthorizationPolicy", raw.key)
    if raw.kind != "AuthorizationPolicy":
        where.fail("kind", f"is a {raw.kind}, not an AuthorizationPolicy")
    env = unwrap(raw, where, "AuthorizationPolicy")
    body, bpath = env.body, env.body_path
    where.check_keys(body, _SPEC_KEYS if env.resource else _FLAT_KEYS, bpath)
    warnings: list[str] = []

    action = Action.ALLOW
    if body.get("action") is not None:
        action = Action[
            _enum_value(where, body["action"], join(bpath, "action"), Action.__members__)
        ]
    if body.get("provider") is not None and action is not Action.CUSTOM:
        where.fail(
            join(bpath, "provider"), f"only a CUSTOM policy has a provider, not {action.value}"
        )

    dry_run = bool(env.dry_run)
    if "dryRun" in body and body["dryRun"] is not None:
        if not isinstance(body["dryRun"], bool):
            where.fail("dryRun", f"expected true or false, got {body['dryRun']!r}")
        dry_run = body["dryRun"]

    selector = parse_selector(where, body.get("selector"), join(bpath, "selector"))
    target_refs = _target_refs(where, body, bpath)
    if selector and target_refs:
        where.fail(join(bpath, "targetRefs"), "a policy has either a selector or targetRefs")

    scope = _scope_of(selector, raw.namespace, root_namespace)
    if body.get("scope") is not None:
        scope = Scope[_enum_value(where, body["scope"], "scope", Scope.__members__)]
        if selector and scope is not Scope.WORKLOAD_SELECTOR:
            where.fail("selector", f"a {scope.value} policy cannot have a selector")

    if body.get("groups") is not None and body.get("rules") is not None:
        where.fail("groups", "give either groups (xDS form) or rules, not both")
    raw_rules = body.get("rules")
    if body.get("groups") is not None:
        rules = _parse_xds_groups(where, body["groups"], raw.namespace)
    elif isinstance(raw_rules, list) and raw_rules and all(isinstance(r, list) for r in raw_rules):
        rules = _parse_nested_rules(where, raw_rules, raw.namespace)
    else:
        rules = _parse_istio_rules(
            where, raw_rules, join(bpath, "rules"), raw.namespace, action, warnings
        )

    if action in (Action.AUDIT, Action.CUSTOM):
        warnings.append(
            f"action {action.value} is not enforced by the tunnel; this policy never affects "
            "a connection here"
        )
    elif target_refs:
        warnings.append(
            f"targets {', '.join(target_refs)}: enforced by a waypoint, not by the tunnel"
        )
    elif action is Action.ALLOW and not rules and raw_rules:
        warnings.append(
            "no rule is left at L4: this ALLOW policy matches nothing, so it denies every "
            "connection in its scope that no other ALLOW policy allows"
        )
    elif action is Action.DENY and not rules:
        warnings.append("a DENY policy without rules denies nothing; add `rules: [{}]` to deny all")

    return Policy(
        name=raw.name,
        namespace=raw.namespace,
        scope=scope,
        action=action,
        selector=selector,
        rules=rules,
        dry_run=dry_run,
        warnings=tuple(warnings),
        target_refs=target_refs,
    )


def salvage_policy(raw: RawPolicy, root_namespace: str, error: str) -> Policy:
    """The fail-closed stand-in for a policy that did not parse.

    The parts of the entry that still parse narrow it (selector, action, dry run, waypoint
    targets); a part that does not is read the strict way: an unreadable action counts as
    enforced, an unreadable selector as namespace- (or mesh-) wide. Whatever its action, an
    enforced stand-in denies every connection in its scope.
    """
    where = reader_for("AuthorizationPolicy", raw.key)
    selector: Labels = ()
    action = Action.DENY
    dry_run = False
    target_refs: tuple[str, ...] = ()
    scope: Scope | None = None
    body: dict[str, Any] = {}
    try:
        env = unwrap(raw, where, "AuthorizationPolicy")
        body = env.body
        dry_run = bool(env.dry_run)
    except MeshConfigError:
        pass

    selector_unreadable = False

    def attempt(part: Callable[[], None]) -> None:
        nonlocal selector_unreadable
        try:
            part()
        except MeshConfigError:
            selector_unreadable = selector_unreadable or part is read_selector

    def read_selector() -> None:
        nonlocal selector
        selector = parse_selector(where, body.get("selector"), "selector")

    def read_action() -> None:
        nonlocal action
        if body.get("action") is not None:
            action = Action[_enum_value(where, body["action"], "action", Action.__members__)]

    def read_dry_run() -> None:
        nonlocal dry_run
        if isinstance(body.get("dryRun"), bool):
            dry_run = body["dryRun"]

    def read_targets() -> None:
        nonlocal target_refs
        if body.get("targetRef") is not None or body.get("targetRefs"):
            # Present but unreadable still means "a waypoint's policy".
            target_refs = ("unreadable",)
            target_refs = _target_refs(where, body, "") or target_refs

    def read_scope() -> None:
        nonlocal scope
        if body.get("scope") is not None:
            scope = Scope[_enum_value(where, body["scope"], "scope", Scope.__members__)]

    for part in (read_selector, read_action, read_dry_run, read_targets, read_scope):
        attempt(part)
    if scope is None:
        scope = _scope_of(selector, raw.namespace, root_namespace)
    elif scope is Scope.WORKLOAD_SELECTOR and selector_unreadable:
        # Which workloads it selects is unknown: all of its namespace (or the mesh).
        scope = _scope_of((), raw.namespace, root_namespace)
    if scope is not Scope.WORKLOAD_SELECTOR:
        selector = ()
    return Policy(
        name=raw.name,
        namespace=raw.namespace,
        scope=scope,
        action=action,
        selector=selector,
        rules=(),
        dry_run=dry_run,
        warnings=(),
        target_refs=target_refs,
        error=error,
    )
