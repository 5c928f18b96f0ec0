"""AuthorizationPolicy documents to `L7Policy` values, strictly. Pure.

`parse_l7_policy(doc)` raises MeshConfigError naming the policy and the field (unknown
fields, wrong types, bad values, more than 16 targets, a CUSTOM action, which the waypoint
does not support); `load_l7_policy(doc)` never raises: a policy that does not parse becomes
a stand-in that denies every request it targets (fail closed, as the tunnel does);
`validate_policy(doc)` lists the errors for `ambientctl apply -f`.

The document is the Istio resource (`apiVersion: security.istio.io/v1`, `kind`,
`metadata: {name, namespace, annotations}`, `spec`), read with the tunnel's envelope reader
(`meshcore.policy.resource`); dry run is the annotation `istio.io/dry-run: "true"`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
from collections.abc import Mapping
from typing import Any

from meshcore.defaults import ROOT_NAMESPACE
from meshcore.policy.model import Action, ServiceAccountMatch, StringMatch
from meshcore.policy.resource import reader_for, unwrap
from meshcore.reader import Reader, describe, join
from meshcore.state import MeshConfigError, RawPolicy
from waypoint.authz.model import (
    GATEWAY,
    GATEWAY_CLASS,
    MAX_TARGET_REFS,
    SERVICE,
    SERVICE_ENTRY,
    WAYPOINT_CLASS,
    Entry,
    Fact,
    FieldMatch,
    HostMatch,
    IpMatch,
    L7Policy,
    Matcher,
    PortMatch,
    Rule,
    TargetRef,
)
from waypoint.authz.paths import PathTemplateError, parse_path

KIND = "AuthorizationPolicy"
_SPEC_KEYS = ("selector", "action", "rules", "provider", "targetRef", "targetRefs")
_GATEWAY_GROUP = "gateway.networking.k8s.io"
# kind -> the API group its reference must name ("" is the core group).
_TARGET_GROUPS = {
    GATEWAY: _GATEWAY_GROUP,
    GATEWAY_CLASS: _GATEWAY_GROUP,
    SERVICE: "",
    SERVICE_ENTRY: "networking.istio.io",
}

# How a field's values are read.
_STRING, _IP, _PORT, _SA, _HOST, _PATH = "string", "ip", "port", "sa", "host", "path"

# source field -> (fact, kind of value, negated)
_SOURCE: dict[str, tuple[Fact, str, bool]] = {
    "principals": (Fact.PRINCIPAL, _STRING, False),
    "notPrincipals": (Fact.PRINCIPAL, _STRING, True),
    "requestPrincipals": (Fact.REQUEST_PRINCIPAL, _STRING, False),
    "notRequestPrincipals": (Fact.REQUEST_PRINCIPAL, _STRING, True),
    "namespaces": (Fact.NAMESPACE, _STRING, False),
    "notNamespaces": (Fact.NAMESPACE, _STRING, True),
    "serviceAccounts": (Fact.SERVICE_ACCOUNT, _SA, False),
    "notServiceAccounts": (Fact.SERVICE_ACCOUNT, _SA, True),
    "ipBlocks": (Fact.SOURCE_IP, _IP, False),
    "notIpBlocks": (Fact.SOURCE_IP, _IP, True),
    "remoteIpBlocks": (Fact.REMOTE_IP, _IP, False),
    "notRemoteIpBlocks": (Fact.REMOTE_IP, _IP, True),
}
_OPERATION: dict[str, tuple[Fact, str, bool]] = {
    "hosts": (Fact.HOST, _HOST, False),
    "notHosts": (Fact.HOST, _HOST, True),
    "ports": (Fact.DESTINATION_PORT, _PORT, False),
    "notPorts": (Fact.DESTINATION_PORT, _PORT, True),
    "methods": (Fact.METHOD, _STRING, False),
    "notMethods": (Fact.METHOD, _STRING, True),
    "paths": (Fact.PATH, _PATH, False),
    "notPaths": (Fact.PATH, _PATH, True),
}
# `when` keys without an argument -> (fact, kind of value)
_WHEN: dict[str, tuple[Fact, str]] = {
    "request.auth.principal": (Fact.REQUEST_PRINCIPAL, _STRING),
    "request.auth.audiences": (Fact.AUDIENCES, _STRING),
    "request.auth.presenter": (Fact.PRESENTER, _STRING),
    "source.ip": (Fact.SOURCE_IP, _IP),
    "remote.ip": (Fact.REMOTE_IP, _IP),
    "source.namespace": (Fact.NAMESPACE, _STRING),
    "source.principal": (Fact.PRINCIPAL, _STRING),
    "destination.ip": (Fact.DESTINATION_IP, _IP),
    "destination.port": (Fact.DESTINATION_PORT, _PORT),
    "connection.sni": (Fact.SNI, _STRING),
}
_HEADER_KEY = re.compile(r"request\.headers\[([^\[\]]+)\]")
_CLAIM_KEY = re.compile(r"request\.auth\.claims((?:\[[^\[\]]+\])+)")
_CLAIM_STEP = re.compile(r"\[([^\[\]]+)\]")


def _string(r: Reader, text: str, path: str) -> StringMatch:
    stars = text.count("*")
    if stars and not (text == "*" or (stars == 1 and (text[0] == "*" or text[-1] == "*"))):
        r.fail(
            path,
            f"{text!r}: '*' may only be the whole value, its first character (suffix match) "
            "or its last (prefix match)",
        )
    return StringMatch.istio(text)


def _value(r: Reader, kind: str, raw: Any, path: str, namespace: str) -> Matcher:
    if kind == _PORT:
        return PortMatch(r.port(raw, path, low=0))
    if not isinstance(raw, str) or not raw:
        r.fail(path, f"expected a non-empty string, got {describe(raw)}")
    if kind == _IP:
        try:
            return IpMatch(ipaddress.ip_network(raw, strict=False))
        except ValueError:
            r.fail(path, f"{raw!r} is not a valid {'CIDR' if '/' in raw else 'IP address'}")
    if kind == _SA:
        if "*" in raw:
            r.fail(path, f"{raw!r}: wildcards are not supported in service accounts")
        ns, slash, sa = raw.partition("/")
        if not slash:
            ns, sa = namespace, raw  # a bare name is in the policy's own namespace
        if not ns or not sa or "/" in sa:
            r.fail(path, f"{raw!r} must be 'namespace/serviceaccount' or 'serviceaccount'")
        return ServiceAccountMatch(ns, sa)
    if kind == _HOST:
        match = _string(r, raw.lower(), path)
        bare = match.value.rsplit("]", 1)[-1]
        return HostMatch(match, ":" in bare and bare.rsplit(":", 1)[1].isdigit())
    if kind == _PATH:
        try:
            return parse_path(raw)
        except PathTemplateError as exc:
            r.fail(path, str(exc))
    return _string(r, raw, path)


def _values(r: Reader, kind: str, raw: Any, path: str, namespace: str) -> tuple[Matcher, ...]:
    items = r.items(raw, path)
    return tuple(_value(r, kind, v, f"{path}[{i}]", namespace) for i, v in enumerate(items))


def _entries(
    r: Reader,
    raw: Any,
    path: str,
    inner: str,
    table: Mapping[str, tuple[Fact, str, bool]],
    namespace: str,
) -> tuple[Entry, ...] | None:
    if raw is None:
        return None
    items = r.items(raw, path)
    if not items:
        r.fail(path, f"must not be empty; omit it to match any {inner}")
    out = []
    for i, item in enumerate(items):
        ipath = f"{path}[{i}]"
        outer = r.mapping(item, ipath)
        r.check_keys(outer, (inner,), ipath)
        bpath = f"{ipath}.{inner}"
        body = r.mapping(outer.get(inner), bpath, required=True)
        r.check_keys(body, table, bpath)
        by_fact: dict[Fact, tuple[list[Matcher], list[Matcher], list[str]]] = {}
        for key, raw_values in body.items():
            fact, kind, negated = table[key]
            values = _values(r, kind, raw_values, f"{bpath}.{key}", namespace)
            if not values:
                continue
            pos, neg, names = by_fact.setdefault(fact, ([], [], []))
            (neg if negated else pos).extend(values)
            names.append(key)
        if not by_fact:
            r.fail(bpath, f"`{inner}` must set at least one field")
        if Fact.SERVICE_ACCOUNT in by_fact and by_fact.keys() & {Fact.PRINCIPAL, Fact.NAMESPACE}:
            r.fail(bpath, "cannot set serviceAccounts with namespaces or principals")
        out.append(
            Entry(
                tuple(
                    FieldMatch(f"{inner}.{'/'.join(names)}", fact, tuple(pos), tuple(neg))
                    for fact, (pos, neg, names) in by_fact.items()
                )
            )
        )
    return tuple(out)


def _condition(r: Reader, raw: Any, path: str, namespace: str) -> Entry:
    body = r.mapping(raw, path, required=True)
    r.check_keys(body, ("key", "values", "notValues"), path)
    key = body.get("key")
    if not isinstance(key, str) or not key:
        r.fail(join(path, "key"), "must be a non-empty string")
    arg: tuple[str, ...] = ()
    if key in _WHEN:
        fact, kind = _WHEN[key]
    elif (m := _HEADER_KEY.fullmatch(key)) is not None:
        fact, kind, arg = Fact.HEADER, _STRING, (m.group(1).strip().lower(),)
        if not arg[0]:
            r.fail(join(path, "key"), f"{key!r}: the header name must not be empty")
    elif (m := _CLAIM_KEY.fullmatch(key)) is not None:
        fact, kind = Fact.CLAIM, _STRING
        arg = tuple(_CLAIM_STEP.findall(m.group(1)))
    else:
        r.fail(
            join(path, "key"),
            f"{key!r} is not a supported key (expected one of {', '.join(_WHEN)}, "
            "request.headers[<name>], request.auth.claims[<claim>]...)",
        )
    values = _values(r, kind, body.get("values"), join(path, "values"), namespace)
    not_values = _values(r, kind, body.get("notValues"), join(path, "notValues"), namespace)
    if not values and not not_values:
        r.fail(path, f"at least one of values or notValues must be set for {key}")
    return Entry((FieldMatch(f"when {key}", fact, values, not_values, arg),))


def _rules(r: Reader, raw: Any, path: str, namespace: str) -> tuple[Rule, ...]:
    rules = []
    for i, item in enumerate(r.items(raw, path)):
        rpath = f"{path}[{i}]"
        body = r.mapping(item, rpath, required=True)
        r.check_keys(body, ("from", "to", "when"), rpath)
        clauses: list[tuple[Entry, ...]] = []
        for name, inner, table in (("from", "source", _SOURCE), ("to", "operation", _OPERATION)):
            entries = _entries(r, body.get(name), f"{rpath}.{name}", inner, table, namespace)
            if entries is not None:
                clauses.append(entries)
        for j, cond in enumerate(r.items(body.get("when"), f"{rpath}.when")):
            clauses.append((_condition(r, cond, f"{rpath}.when[{j}]", namespace),))
        rules.append(Rule(tuple(clauses), i))
    return tuple(rules)


def parse_target_refs(
    r: Reader, body: Mapping[str, Any], path: str, namespace: str, root: str
) -> tuple[TargetRef, ...]:
    """`targetRef` or `targetRefs` of a waypoint policy (AuthorizationPolicy,
    RequestAuthentication): at most 16; Gateway, GatewayClass istio-waypoint (root
    namespace only), Service or ServiceEntry, each in the policy's namespace."""
    if body.get("targetRef") is not None and body.get("targetRefs") is not None:
        r.fail(join(path, "targetRef"), "give either targetRef or targetRefs, not both")
    if body.get("targetRef") is not None:
        refs, rpath = [body["targetRef"]], join(path, "targetRef")
    else:
        refs, rpath = r.items(body.get("targetRefs"), join(path, "targetRefs")), ""
    if len(refs) > MAX_TARGET_REFS:
        r.fail(join(path, "targetRefs"), f"at most {MAX_TARGET_REFS} targets, got {len(refs)}")
    out = []
    for i, ref in enumerate(refs):
        p = rpath or join(path, f"targetRefs[{i}]")
        ref_body = r.mapping(ref, p, required=True)
        r.check_keys(ref_body, ("group", "kind", "name", "namespace"), p)
        kind = r.choice(ref_body.get("kind"), join(p, "kind"), tuple(_TARGET_GROUPS))
        name = r.name(ref_body, "name", p)
        group = r.string(ref_body, "group", p, default="", empty_ok=True)
        if group != _TARGET_GROUPS[kind]:
            want = _TARGET_GROUPS[kind] or '"" (the core group)'
            r.fail(join(p, "group"), f"a {kind} reference has group {want}, not {group!r}")
        ref_ns = r.name(ref_body, "namespace", p, default=namespace)
        if ref_ns != namespace:
            r.fail(join(p, "namespace"), "a policy may only target objects in its own namespace")
        if kind == GATEWAY_CLASS:
            if name != WAYPOINT_CLASS:
                r.fail(join(p, "name"), f"a policy targets only GatewayClass {WAYPOINT_CLASS}")
            if namespace != root:
                r.fail(p, f"a policy targeting a GatewayClass must be in the root namespace {root}")
        out.append(TargetRef(kind, name))
    return tuple(out)


def _identity(doc: Any, default_namespace: str) -> tuple[str, str]:
    meta = doc.get("metadata") if isinstance(doc, Mapping) else None
    if not isinstance(meta, Mapping):
        return "?", default_namespace
    name, ns = meta.get("name"), meta.get("namespace", default_namespace)
    return (name if isinstance(name, str) and name else "?"), (
        ns if isinstance(ns, str) and ns else default_namespace
    )


def _raw(doc: Any, r: Reader, default_namespace: str) -> RawPolicy:
    if not isinstance(doc, Mapping):
        r.fail("", f"expected a mapping, got {describe(doc)}")
    if "metadata" not in doc or "kind" not in doc:
        r.fail("", "expected an Istio resource with kind, metadata and spec")
    meta = r.mapping(doc.get("metadata"), "metadata", required=True)
    r.check_keys(
        meta,
        ("name", "namespace", "annotations", "labels", "uid", "resourceVersion", "generation",
         "creationTimestamp", "managedFields"),
        "metadata",
    )  # fmt: skip
    name = r.name(meta, "name", "metadata")
    namespace = r.name(meta, "namespace", "metadata", default=default_namespace)
    return RawPolicy.from_mapping(name, namespace, doc, KIND)


def parse_l7_policy(
    doc: Any, root_namespace: str = ROOT_NAMESPACE, default_namespace: str = "default"
) -> L7Policy:
    """One AuthorizationPolicy resource as the waypoint enforces it; raises MeshConfigError
    (only) with a message naming the policy and the field."""
    name, namespace = _identity(doc, default_namespace)
    r = reader_for(KIND, f"{namespace}/{name}")
    raw = _raw(doc, r, default_namespace)
    env = unwrap(raw, r, KIND)
    body = env.body
    r.check_keys(body, _SPEC_KEYS, "spec")
    action = Action.ALLOW
    if body.get("action") is not None:
        action = Action[r.choice(body["action"], "spec.action", tuple(Action.__members__))]
    if action is Action.CUSTOM:
        r.fail(
            "spec.action",
            "CUSTOM (external authorization) is not supported by the waypoint; the policy "
            "denies every request it targets until it is changed",
        )
    if body.get("provider") is not None:
        r.fail("spec.provider", "only a CUSTOM policy has a provider")
    refs = parse_target_refs(r, body, "spec", raw.namespace, root_namespace)
    if body.get("selector") is not None and refs:
        r.fail("spec.selector", "a policy has either a selector or targetRefs")
    return L7Policy(
        name=raw.name,
        namespace=raw.namespace,
        action=action,
        rules=_rules(r, body.get("rules"), "spec.rules", raw.namespace),
        target_refs=refs,
        dry_run=bool(env.dry_run),
    )


def salvage_l7_policy(
    doc: Any, error: str, root_namespace: str = ROOT_NAMESPACE, default_namespace: str = "default"
) -> L7Policy:
    """The fail-closed stand-in for a policy that did not parse: no rules, denies every
    request it applies to. Its targets (and dry-run annotation) are read if they can be;
    unreadable targets make it apply to every request of the waypoint."""
    name, namespace = _identity(doc, default_namespace)
    r = reader_for(KIND, f"{namespace}/{name}")
    dry_run = False
    refs: tuple[TargetRef, ...] = ()
    unknown = False
    spec = doc.get("spec") if isinstance(doc, Mapping) else None
    with contextlib.suppress(MeshConfigError):
        dry_run = bool(unwrap(_raw(doc, r, default_namespace), r, KIND).dry_run)
    if isinstance(spec, Mapping) and (spec.get("targetRef") or spec.get("targetRefs")):
        try:
            refs = parse_target_refs(r, spec, "spec", namespace, root_namespace)
        except MeshConfigError:
            unknown = True
    return L7Policy(
        name=name,
        namespace=namespace,
        action=Action.DENY,
        rules=(),
        target_refs=refs,
        dry_run=dry_run,
        error=error,
        targets_unknown=unknown,
    )


def load_l7_policy(
    doc: Any, root_namespace: str = ROOT_NAMESPACE, default_namespace: str = "default"
) -> L7Policy:
    """`parse_l7_policy`, or its fail-closed stand-in; never raises."""
    try:
        return parse_l7_policy(doc, root_namespace, default_namespace)
    except MeshConfigError as exc:
        return salvage_l7_policy(doc, str(exc), root_namespace, default_namespace)


def validate_policy(
    doc: Any, root_namespace: str = ROOT_NAMESPACE, default_namespace: str = "default"
) -> list[str]:
    """The reasons the waypoint would refuse `doc` (empty when it enforces it as written)."""
    try:
        parse_l7_policy(doc, root_namespace, default_namespace)
    except MeshConfigError as exc:
        return [str(exc)]
    return []
