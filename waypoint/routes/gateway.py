"""Gateway API `HTTPRoute` and `GRPCRoute` documents as frozen route values.

A route attaches to parents (a Service in mesh mode, or the waypoint's Gateway) and holds
rules; each rule's matches are kept with the key the Gateway API orders them by, so the
table can merge the rules of every route attached to one service and take the first match.
References (parents, backends, mirrors) stay names here: the table resolves them against
the mesh's services and reports what it could not resolve in the route's status.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from meshcore.reader import Reader, join
from waypoint.routes.document import (
    GATEWAY_GROUP,
    Meta,
    RouteConfigErrors,
    collect,
    each_mapping,
    limited,
    no_duplicates,
    read_meta,
)
from waypoint.routes.model import (
    NO_HEADERS,
    NO_TIMEOUTS,
    HeaderFilter,
    HeaderMatch,
    Match,
    MatchKind,
    PathRewrite,
    PathRewriteKind,
    QueryMatch,
    RedirectSpec,
    Rewrite,
    StringMatch,
    Timeouts,
)
from waypoint.routes.retry import DEFAULT_RETRY, RetryPolicy
from waypoint.routes.values import (
    gateway_duration,
    header_name,
    header_value,
    hostname,
    http_path,
    integer,
    one_of,
    reader,
    regex,
)

CORE_GROUPS = ("", "core")
MAX_RULES = 16
MAX_MATCHES = 64
MAX_REFS = 16
MAX_FILTERS = 16
MAX_HEADERS = 16
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
REDIRECT_CODES = (301, 302, 303, 307, 308)
_HTTP_FILTERS = (
    "RequestHeaderModifier",
    "ResponseHeaderModifier",
    "RequestRedirect",
    "URLRewrite",
    "RequestMirror",
)
_GRPC_FILTERS = ("RequestHeaderModifier", "ResponseHeaderModifier", "RequestMirror")
_FILTER_FIELDS = {
    "RequestHeaderModifier": "requestHeaderModifier",
    "ResponseHeaderModifier": "responseHeaderModifier",
    "RequestRedirect": "requestRedirect",
    "URLRewrite": "urlRewrite",
    "RequestMirror": "requestMirror",
}
_UNSUPPORTED_FILTERS = ("CORS", "ExtensionRef", "ExternalAuth")


@dataclass(frozen=True, slots=True)
class ObjectRef:
    """A reference to another object by group, kind, namespace, name and optional port."""

    group: str
    kind: str
    namespace: str
    name: str
    port: int | None = None
    section: str | None = None

    @property
    def is_service(self) -> bool:
        return self.kind == "Service" and self.group in CORE_GROUPS

    @property
    def is_gateway(self) -> bool:
        return self.kind == "Gateway" and self.group == GATEWAY_GROUP

    def __str__(self) -> str:
        port = f":{self.port}" if self.port is not None else ""
        return f"{self.kind} {self.namespace}/{self.name}{port}"


@dataclass(frozen=True, slots=True)
class BackendRefSpec:
    ref: ObjectRef
    weight: int
    request_headers: HeaderFilter = NO_HEADERS
    response_headers: HeaderFilter = NO_HEADERS


@dataclass(frozen=True, slots=True)
class MirrorSpec:
    ref: ObjectRef
    percent: float


@dataclass(frozen=True, slots=True)
class RuleSpec:
    """One rule. `keys[i]` orders `matches[i]` among all rules of the routes of a parent
    (larger first)."""

    name: str | None
    matches: tuple[Match, ...]
    keys: tuple[tuple[int, ...], ...]
    backends: tuple[BackendRefSpec, ...]
    request_headers: HeaderFilter = NO_HEADERS
    response_headers: HeaderFilter = NO_HEADERS
    redirect: RedirectSpec | None = None
    rewrite: Rewrite | None = None
    mirrors: tuple[MirrorSpec, ...] = ()
    timeouts: Timeouts = NO_TIMEOUTS
    retry: RetryPolicy = DEFAULT_RETRY


@dataclass(frozen=True, slots=True)
class GatewayRoute:
    meta: Meta
    parents: tuple[ObjectRef, ...]
    hostnames: tuple[str, ...]
    rules: tuple[RuleSpec, ...]


def parse_route(doc: Any) -> GatewayRoute:
    """An HTTPRoute or GRPCRoute document; raises `RouteConfigErrors` naming every bad field."""
    r = reader()
    meta, spec = read_meta(r, doc, ("HTTPRoute", "GRPCRoute"))
    grpc = meta.kind == "GRPCRoute"
    errors: list[str] = []
    collect(errors, lambda: r.check_keys(spec, ("parentRefs", "hostnames", "rules"), "spec"))
    parents = collect(errors, lambda: _parents(r, spec.get("parentRefs"), meta.namespace))
    hosts = collect(errors, lambda: _hostnames(r, spec.get("hostnames")))
    rules: list[RuleSpec] = []
    raw_rules = collect(errors, lambda: limited(r, spec.get("rules"), "spec.rules", MAX_RULES))
    for i, raw in enumerate(raw_rules or []):
        rule = collect(errors, _rule_parser(r, raw, f"spec.rules[{i}]", meta.namespace, grpc))
        if rule is not None:
            rules.append(rule)
    if not raw_rules and not errors:
        # The API server defaults an empty rules list to one rule that matches everything.
        rules.append(_http_rule(r, {}, "spec.rules[0]", meta.namespace))
    if errors:
        raise RouteConfigErrors(errors)
    return GatewayRoute(meta, tuple(parents or ()), tuple(hosts or ()), tuple(rules))


def _rule_parser(
    r: Reader, raw: Any, path: str, namespace: str, grpc: bool
) -> Callable[[], RuleSpec]:
    def parse() -> RuleSpec:
        if grpc:
            return _grpc_rule(r, raw, path, namespace)
        return _http_rule(r, raw, path, namespace)

    return parse


# -- references --------------------------------------------------------------------------------


def _parents(r: Reader, value: Any, namespace: str) -> tuple[ObjectRef, ...]:
    out = []
    for path, entry in each_mapping(r, value, "spec.parentRefs", 32):
        r.check_keys(entry, ("group", "kind", "namespace", "name", "port", "sectionName"), path)
        group = r.string(entry, "group", path, GATEWAY_GROUP, empty_ok=True)
        kind = r.string(entry, "kind", path, "Gateway")
        port = entry.get("port")
        out.append(
            ObjectRef(
                group=group,
                kind=kind,
                namespace=r.name(entry, "namespace", path, namespace),
                name=r.name(entry, "name", path),
                port=r.port(port, join(path, "port")) if port is not None else None,
                section=r.string(entry, "sectionName", path) if "sectionName" in entry else None,
            )
        )
    if not out:
        r.fail("spec.parentRefs", "at least one parent (a Service or the waypoint) is required")
    return tuple(out)


def _hostnames(r: Reader, value: Any) -> tuple[str, ...]:
    out = []
    for i, v in enumerate(limited(r, value, "spec.hostnames", 16)):
        out.append(hostname(r, v, f"spec.hostnames[{i}]"))
    return tuple(out)


def _backend_ref(r: Reader, entry: dict[str, Any], path: str, namespace: str) -> ObjectRef:
    group = r.string(entry, "group", path, "", empty_ok=True)
    kind = r.string(entry, "kind", path, "Service")
    port = entry.get("port")
    if port is None and kind == "Service" and group in CORE_GROUPS:
        r.fail(join(path, "port"), "is required when referring to a Service")
    return ObjectRef(
        group=group,
        kind=kind,
        namespace=r.name(entry, "namespace", path, namespace),
        name=r.name(entry, "name", path),
        port=r.port(port, join(path, "port")) if port is not None else None,
    )


def _backends(
    r: Reader, value: Any, path: str, namespace: str, grpc: bool
) -> tuple[BackendRefSpec, ...]:
    out = []
    for at, entry in each_mapping(r, value, path, MAX_REFS):
        r.check_keys(entry, ("group", "kind", "namespace", "name", "port", "weight", "filters"), at)
        ref = _backend_ref(r, entry, at, namespace)
        weight = integer(r, entry, "weight", at, 1, low=0, high=1_000_000)
        filters = _filters(r, entry.get("filters"), join(at, "filters"), namespace, grpc, True)
        out.append(BackendRefSpec(ref, weight, filters.request, filters.response))
    return tuple(out)


# -- filters -----------------------------------------------------------------------------------


@dataclass(slots=True)
class _Filters:
    request: HeaderFilter = NO_HEADERS
    response: HeaderFilter = NO_HEADERS
    redirect: RedirectSpec | None = None
    rewrite: Rewrite | None = None
    mirrors: tuple[MirrorSpec, ...] = ()


def _filters(
    r: Reader, value: Any, path: str, namespace: str, grpc: bool, backend: bool
) -> _Filters:
    out = _Filters()
    allowed: tuple[str, ...] = _GRPC_FILTERS if grpc else _HTTP_FILTERS
    if backend:
        # Per-backend filters are the header modifiers (and mirrors); redirects and rewrites
        # belong to the rule.
        allowed = tuple(f for f in allowed if f not in ("RequestRedirect", "URLRewrite"))
    seen: set[str] = set()
    mirrors = []
    for at, entry in each_mapping(r, value, path, MAX_FILTERS):
        kind = entry.get("type")
        if kind in _UNSUPPORTED_FILTERS:
            r.fail(join(at, "type"), f"{kind!r} filters are not supported by the waypoint")
        kind = one_of(r, kind, join(at, "type"), allowed)
        field = _FILTER_FIELDS[kind]
        r.check_keys(entry, ("type", field), at)
        if kind in seen and kind != "RequestMirror":
            r.fail(join(at, "type"), f"{kind} may be given only once")
        seen.add(kind)
        body = r.mapping(entry.get(field), join(at, field), required=True)
        fpath = join(at, field)
        if kind == "RequestHeaderModifier":
            out.request = header_filter(r, body, fpath)
        elif kind == "ResponseHeaderModifier":
            out.response = header_filter(r, body, fpath)
        elif kind == "RequestRedirect":
            out.redirect = _redirect(r, body, fpath)
        elif kind == "URLRewrite":
            out.rewrite = _rewrite(r, body, fpath)
        else:
            mirrors.append(_mirror(r, body, fpath, namespace))
    if out.redirect is not None and out.rewrite is not None:
        r.fail(path, "RequestRedirect and URLRewrite cannot be used together")
    out.mirrors = tuple(mirrors)
    return out


def header_filter(r: Reader, body: dict[str, Any], path: str) -> HeaderFilter:
    r.check_keys(body, ("set", "add", "remove"), path)
    lists: dict[str, tuple[tuple[str, str], ...]] = {}
    for op in ("set", "add"):
        pairs = []
        for at, entry in each_mapping(r, body.get(op), join(path, op), MAX_HEADERS):
            r.check_keys(entry, ("name", "value"), at)
            pairs.append((header_name(r, entry.get("name"), join(at, "name")),
                          header_value(r, entry, "value", at)))  # fmt: skip
        no_duplicates(r, [n for n, _ in pairs], join(path, op))
        lists[op] = tuple(pairs)
    remove = []
    for i, name in enumerate(limited(r, body.get("remove"), join(path, "remove"), MAX_HEADERS)):
        remove.append(header_name(r, name, f"{join(path, 'remove')}[{i}]"))
    no_duplicates(r, remove, join(path, "remove"))
    return HeaderFilter(lists["set"], lists["add"], tuple(remove))


def _path_modifier(r: Reader, body: Any, path: str) -> PathRewrite:
    body = r.mapping(body, path, required=True)
    kind = one_of(
        r, body.get("type"), join(path, "type"), ("ReplaceFullPath", "ReplacePrefixMatch")
    )
    field = "replaceFullPath" if kind == "ReplaceFullPath" else "replacePrefixMatch"
    r.check_keys(body, ("type", field), path)
    if field not in body:
        r.fail(join(path, field), f"is required when type is {kind}")
    value = http_path(r, body.get(field), join(path, field), allow_empty=True)
    return PathRewrite(PathRewriteKind(kind), value)


def _redirect(r: Reader, body: dict[str, Any], path: str) -> RedirectSpec:
    r.check_keys(body, ("scheme", "hostname", "path", "port", "statusCode"), path)
    scheme = None
    if body.get("scheme") is not None:
        scheme = one_of(r, body.get("scheme"), join(path, "scheme"), ("http", "https"))
    host = None
    if body.get("hostname") is not None:
        host = hostname(r, body.get("hostname"), join(path, "hostname"), wildcard=False)
    port = body.get("port")
    status = integer(r, body, "statusCode", path, 302)
    if status not in REDIRECT_CODES:
        r.fail(join(path, "statusCode"), f"{status} is not one of 301, 302, 303, 307, 308")
    return RedirectSpec(
        status=status,
        scheme=scheme,
        hostname=host,
        port=r.port(port, join(path, "port")) if port is not None else None,
        path=_path_modifier(r, body["path"], join(path, "path")) if body.get("path") else None,
    )


def _rewrite(r: Reader, body: dict[str, Any], path: str) -> Rewrite:
    r.check_keys(body, ("hostname", "path"), path)
    host = None
    if body.get("hostname") is not None:
        host = hostname(r, body.get("hostname"), join(path, "hostname"), wildcard=False)
    rewrite_path = None
    if body.get("path") is not None:
        rewrite_path = _path_modifier(r, body["path"], join(path, "path"))
    return Rewrite(host, rewrite_path)


def _mirror(r: Reader, body: dict[str, Any], path: str, namespace: str) -> MirrorSpec:
    r.check_keys(body, ("backendRef", "percent", "fraction"), path)
    entry = r.mapping(body.get("backendRef"), join(path, "backendRef"), required=True)
    at = join(path, "backendRef")
    r.check_keys(entry, ("group", "kind", "namespace", "name", "port"), at)
    ref = _backend_ref(r, entry, at, namespace)
    if "percent" in body and "fraction" in body:
        r.fail(path, "give percent or fraction, not both")
    percent = 100.0
    if body.get("percent") is not None:
        percent = float(integer(r, body, "percent", path, low=0, high=100))
    elif body.get("fraction") is not None:
        fpath = join(path, "fraction")
        fraction = r.mapping(body["fraction"], fpath, required=True)
        r.check_keys(fraction, ("numerator", "denominator"), fpath)
        denominator = integer(r, fraction, "denominator", fpath, 100, low=1)
        numerator = integer(r, fraction, "numerator", fpath, low=0, high=denominator)
        percent = 100.0 * numerator / denominator
    return MirrorSpec(ref, percent)


# -- timeouts and retries ----------------------------------------------------------------------


def _timeouts(r: Reader, value: Any, path: str) -> Timeouts:
    body = r.mapping(value, path)
    r.check_keys(body, ("request", "backendRequest"), path)
    request = backend = None
    if body.get("request") is not None:
        request = gateway_duration(r, body["request"], join(path, "request")) or None
    if body.get("backendRequest") is not None:
        backend = gateway_duration(r, body["backendRequest"], join(path, "backendRequest")) or None
    if request is not None and backend is not None and backend > request:
        r.fail(join(path, "backendRequest"), "must not be longer than the request timeout")
    return Timeouts(request, backend)


def _retry(r: Reader, value: Any, path: str, per_try: float | None) -> RetryPolicy:
    """The experimental `retry` field, as Istio translates it: the listed codes on top of
    its default conditions (connection failures and gRPC unavailable/cancelled)."""
    if value is None:
        return DEFAULT_RETRY if per_try is None else _with_per_try(DEFAULT_RETRY, per_try)
    body = r.mapping(value, path)
    r.check_keys(body, ("attempts", "codes", "backoff"), path)
    attempts = integer(r, body, "attempts", path, DEFAULT_RETRY.attempts, low=0, high=1000)
    codes = []
    for i, code in enumerate(limited(r, body.get("codes"), join(path, "codes"), 64)):
        at = f"{join(path, 'codes')}[{i}]"
        if isinstance(code, bool) or not isinstance(code, int) or not 400 <= code <= 599:
            r.fail(at, f"{code!r} is not an HTTP status in 400..599")
        codes.append(code)
    base = DEFAULT_RETRY.backoff_base
    if body.get("backoff") is not None:
        base = gateway_duration(r, body["backoff"], join(path, "backoff"))
    return RetryPolicy(
        attempts=attempts,
        retry_on=DEFAULT_RETRY.retry_on,
        codes=frozenset(codes),
        per_try_timeout=per_try,
        backoff_base=base,
        backoff_max=10 * base,
    )


def _with_per_try(policy: RetryPolicy, per_try: float) -> RetryPolicy:
    return RetryPolicy(
        policy.attempts, policy.retry_on, policy.codes, per_try, policy.backoff_base,
        policy.backoff_max,
    )  # fmt: skip


# -- HTTPRoute rules ---------------------------------------------------------------------------

_PATH_RANK = {MatchKind.EXACT: 3, MatchKind.PREFIX: 2, MatchKind.REGEX: 1}


def _string_match(
    r: Reader, entry: dict[str, Any], path: str, *, field: str = "value"
) -> StringMatch:
    kind = one_of(r, entry.get("type", "Exact"), join(path, "type"), ("Exact", "RegularExpression"))
    if kind == "Exact":
        return StringMatch(MatchKind.EXACT, r.string(entry, field, path, empty_ok=True))
    pattern = regex(r, entry.get(field), join(path, field))
    return StringMatch(MatchKind.REGEX, entry[field], pattern)


def _header_matches(r: Reader, value: Any, path: str) -> tuple[HeaderMatch, ...]:
    out = []
    for at, entry in each_mapping(r, value, path, MAX_HEADERS):
        r.check_keys(entry, ("type", "name", "value"), at)
        name = header_name(r, entry.get("name"), join(at, "name"))
        out.append(HeaderMatch(name, _string_match(r, entry, at)))
    no_duplicates(r, [h.name for h in out], path)
    return tuple(out)


def _query_matches(r: Reader, value: Any, path: str) -> tuple[QueryMatch, ...]:
    out = []
    for at, entry in each_mapping(r, value, path, MAX_HEADERS):
        r.check_keys(entry, ("type", "name", "value"), at)
        name = r.string(entry, "name", at)
        out.append(QueryMatch(name, _string_match(r, entry, at)))
    no_duplicates(r, [q.name for q in out], path)
    return tuple(out)


def _http_match(r: Reader, entry: dict[str, Any], path: str) -> tuple[Match, tuple[int, ...]]:
    r.check_keys(entry, ("path", "headers", "queryParams", "method"), path)
    raw_path = r.mapping(entry.get("path"), join(path, "path"))
    if raw_path:
        ppath = join(path, "path")
        r.check_keys(raw_path, ("type", "value"), ppath)
        kind = one_of(
            r,
            raw_path.get("type", "PathPrefix"),
            join(ppath, "type"),
            ("Exact", "PathPrefix", "RegularExpression"),
        )
        value = raw_path.get("value", "/")
        if kind == "RegularExpression":
            path_match = StringMatch(MatchKind.REGEX, value, regex(r, value, join(ppath, "value")))
        else:
            value = http_path(r, value, join(ppath, "value"))
            if kind == "PathPrefix" and len(value) > 1:
                value = value.rstrip("/") or "/"  # a trailing slash does not change the match
            path_match = StringMatch(MatchKind(kind), value)
    else:
        path_match = StringMatch(MatchKind.PREFIX, "/")  # the API server's default
    method = None
    if entry.get("method") is not None:
        method = one_of(r, entry["method"], join(path, "method"), HTTP_METHODS)
    headers = _header_matches(r, entry.get("headers"), join(path, "headers"))
    query = _query_matches(r, entry.get("queryParams"), join(path, "queryParams"))
    # The Gateway API's order: Exact, then the longest prefix (Istio places regexes after
    # prefixes, longer first), then a method, then more headers, then more query params.
    key = (
        _PATH_RANK[path_match.kind],
        len(path_match.value),
        int(method is not None),
        len(headers),
        len(query),
    )
    return Match(path=path_match, method=method, headers=headers, query=query), key


def _http_rule(r: Reader, raw: Any, path: str, namespace: str) -> RuleSpec:
    raw = r.mapping(raw, path)
    r.check_keys(
        raw,
        ("name", "matches", "filters", "backendRefs", "timeouts", "retry", "sessionPersistence"),
        path,
    )
    if raw.get("sessionPersistence") is not None:
        r.fail(join(path, "sessionPersistence"), "is not supported by the waypoint")
    matches, keys = [], []
    raw_matches = each_mapping(r, raw.get("matches"), join(path, "matches"), MAX_MATCHES)
    for at, entry in raw_matches:
        match, key = _http_match(r, entry, at)
        matches.append(match)
        keys.append(key)
    if not raw_matches:
        match, key = _http_match(r, {}, join(path, "matches"))
        matches, keys = [match], [key]
    filters = _filters(r, raw.get("filters"), join(path, "filters"), namespace, False, False)
    backends = _backends(r, raw.get("backendRefs"), join(path, "backendRefs"), namespace, False)
    if filters.redirect is not None and backends:
        r.fail(join(path, "backendRefs"), "a rule with a RequestRedirect must have no backendRefs")
    prefix_rewrite = any(
        p is not None and p.kind is PathRewriteKind.PREFIX
        for p in (
            filters.redirect.path if filters.redirect else None,
            filters.rewrite.path if filters.rewrite else None,
        )
    )
    if prefix_rewrite and not (
        len(matches) == 1
        and matches[0].path is not None
        and matches[0].path.kind is MatchKind.PREFIX
    ):
        r.fail(
            join(path, "filters"),
            "ReplacePrefixMatch needs exactly one match, with a PathPrefix path",
        )
    timeouts = _timeouts(r, raw.get("timeouts"), join(path, "timeouts"))
    retry = _retry(r, raw.get("retry"), join(path, "retry"), timeouts.backend_request)
    name = r.string(raw, "name", path) if raw.get("name") is not None else None
    return RuleSpec(
        name=name,
        matches=tuple(matches),
        keys=tuple(keys),
        backends=backends,
        request_headers=filters.request,
        response_headers=filters.response,
        redirect=filters.redirect,
        rewrite=filters.rewrite,
        mirrors=filters.mirrors,
        timeouts=timeouts,
        retry=retry,
    )


# -- GRPCRoute rules ---------------------------------------------------------------------------

_GRPC_SERVICE = r"^(?i)\.?[a-z_][a-z_0-9]*(\.[a-z_][a-z_0-9]*)*$"
_GRPC_METHOD = r"^[A-Za-z_][A-Za-z_0-9]*$"


def _escape(text: str) -> str:
    return "".join(c if c.isalnum() or c == "_" else "\\" + c for c in text)


def _grpc_method(r: Reader, value: Any, path: str) -> tuple[StringMatch | None, int, int]:
    """The method match as a match on the request path ("/service/method"), with the
    lengths the Gateway API orders gRPC matches by."""
    body = r.mapping(value, path)
    if not body:
        return None, 0, 0
    r.check_keys(body, ("type", "service", "method"), path)
    kind = one_of(r, body.get("type", "Exact"), join(path, "type"), ("Exact", "RegularExpression"))
    service = r.string(body, "service", path) if body.get("service") is not None else None
    method = r.string(body, "method", path) if body.get("method") is not None else None
    if service is None and method is None:
        r.fail(path, "one of service or method is required")
    svc_len, method_len = len(service or ""), len(method or "")
    if kind == "Exact":
        if service is not None and not re.match(_GRPC_SERVICE, service):
            r.fail(join(path, "service"), f"{service!r} is not a gRPC service name")
        if method is not None and not re.match(_GRPC_METHOD, method):
            r.fail(join(path, "method"), f"{method!r} is not a gRPC method name")
        if service is not None and method is not None:
            return StringMatch(MatchKind.EXACT, f"/{service}/{method}"), svc_len, method_len
        if service is not None:
            return StringMatch(MatchKind.PREFIX, f"/{service}"), svc_len, method_len
        pattern = f"/[^/]+/{_escape(method or '')}"
    else:
        if service is not None:
            regex(r, service, join(path, "service"))
        if method is not None:
            regex(r, method, join(path, "method"))
        pattern = f"/(?:{service or '[^/]+'})/(?:{method or '[^/]+'})"
    return StringMatch(MatchKind.REGEX, pattern, regex(r, pattern, path)), svc_len, method_len


def _grpc_rule(r: Reader, raw: Any, path: str, namespace: str) -> RuleSpec:
    raw = r.mapping(raw, path)
    r.check_keys(raw, ("name", "matches", "filters", "backendRefs", "sessionPersistence"), path)
    if raw.get("sessionPersistence") is not None:
        r.fail(join(path, "sessionPersistence"), "is not supported by the waypoint")
    matches, keys = [], []
    for at, entry in each_mapping(r, raw.get("matches"), join(path, "matches"), MAX_MATCHES):
        r.check_keys(entry, ("method", "headers"), at)
        path_match, svc_len, method_len = _grpc_method(r, entry.get("method"), join(at, "method"))
        headers = _header_matches(r, entry.get("headers"), join(at, "headers"))
        matches.append(Match(path=path_match, headers=headers))
        # GRPCRoute's order: longer service, longer method, more header matches.
        keys.append((svc_len, method_len, len(headers)))
    if not matches:
        matches, keys = [Match()], [(0, 0, 0)]
    filters = _filters(r, raw.get("filters"), join(path, "filters"), namespace, True, False)
    backends = _backends(r, raw.get("backendRefs"), join(path, "backendRefs"), namespace, True)
    name = r.string(raw, "name", path) if raw.get("name") is not None else None
    return RuleSpec(
        name=name,
        matches=tuple(matches),
        keys=tuple(keys),
        backends=backends,
        request_headers=filters.request,
        response_headers=filters.response,
        mirrors=filters.mirrors,
    )
