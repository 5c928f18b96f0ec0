"""Istio `VirtualService` documents as frozen values (in ambient the waypoint applies them).

What the waypoint supports: `hosts`, `http[]` with `match` (uri exact/prefix/regex, headers,
queryParams, method, authority, port, sourceNamespace, ignoreUriCase, withoutHeaders),
`route[]` with weights and header edits, `redirect`, `directResponse`, `rewrite`, `timeout`,
`retries`, `fault`, `mirror`/`mirrors` and `headers`. Anything else a VirtualService may
hold (tcp, tls, corsPolicy, delegate, sourceLabels, ...) is refused with a message rather
than silently ignored. Rules keep their order: the first matching one wins.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from meshcore.reader import Reader, join
from waypoint.routes.document import (
    Meta,
    RouteConfigErrors,
    collect,
    each_mapping,
    limited,
    read_meta,
)
from waypoint.routes.fault import GRPC_STATUS_CODES, Abort, Fault
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
from waypoint.routes.retry import DEFAULT_RETRY, NO_RETRY, RETRY_ON, RetryPolicy
from waypoint.routes.values import (
    header_name,
    header_value,
    http_path,
    integer,
    istio_duration,
    number,
    one_of,
    reader,
    regex,
)

_UNSUPPORTED = "is not supported by the waypoint"


@dataclass(frozen=True, slots=True)
class Destination:
    host: str
    subset: str | None
    port: int | None
    weight: int
    request_headers: HeaderFilter = NO_HEADERS
    response_headers: HeaderFilter = NO_HEADERS


@dataclass(frozen=True, slots=True)
class VsMirror:
    destination: Destination
    percent: float


@dataclass(frozen=True, slots=True)
class VsRule:
    name: str | None
    matches: tuple[Match, ...]
    destinations: tuple[Destination, ...] = ()
    redirect: RedirectSpec | None = None
    direct: tuple[int, str] | None = None
    rewrite: Rewrite | None = None
    request_headers: HeaderFilter = NO_HEADERS
    response_headers: HeaderFilter = NO_HEADERS
    mirrors: tuple[VsMirror, ...] = ()
    timeouts: Timeouts = NO_TIMEOUTS
    retry: RetryPolicy = DEFAULT_RETRY
    fault: Fault | None = None


@dataclass(frozen=True, slots=True)
class VirtualService:
    meta: Meta
    hosts: tuple[str, ...]
    rules: tuple[VsRule, ...]


def parse_virtual_service(doc: Any) -> VirtualService:
    r = reader()
    meta, spec = read_meta(r, doc, ("VirtualService",))
    errors: list[str] = []
    collect(errors, lambda: _check_spec(r, spec))
    hosts = collect(errors, lambda: tuple(r.strings(spec.get("hosts"), "spec.hosts")))
    if not hosts and not errors:
        errors.append("spec.hosts: at least one host is required")
    rules: list[VsRule] = []
    raw_rules = collect(errors, lambda: limited(r, spec.get("http"), "spec.http", 256))
    for i, raw in enumerate(raw_rules or []):
        rule = collect(errors, _rule_parser(r, raw, f"spec.http[{i}]"))
        if rule is not None:
            rules.append(rule)
    if errors:
        raise RouteConfigErrors(errors)
    return VirtualService(meta, tuple(hosts or ()), tuple(rules))


def _check_spec(r: Reader, spec: dict[str, Any]) -> None:
    for key in ("tcp", "tls"):
        if spec.get(key):
            r.fail(join("spec", key), _UNSUPPORTED + " (only http routes)")
    r.check_keys(spec, ("hosts", "gateways", "http", "exportTo", "tcp", "tls"), "spec")
    r.strings(spec.get("exportTo"), "spec.exportTo")
    for i, gw in enumerate(r.strings(spec.get("gateways"), "spec.gateways")):
        if gw != "mesh":
            r.fail(f"spec.gateways[{i}]", "a waypoint applies VirtualServices bound to 'mesh'")


def _rule_parser(r: Reader, raw: Any, path: str) -> Callable[[], VsRule]:
    return lambda: _rule(r, raw, path)


_RULE_KEYS = (
    "name", "match", "route", "redirect", "directResponse", "rewrite", "timeout", "retries",
    "fault", "mirror", "mirrorPercentage", "mirrors", "headers", "delegate", "corsPolicy",
    "mirrorPercent",
)  # fmt: skip


def _rule(r: Reader, raw: Any, path: str) -> VsRule:
    raw = r.mapping(raw, path, required=True)
    r.check_keys(raw, _RULE_KEYS, path)
    for key in ("delegate", "corsPolicy", "mirrorPercent"):
        if raw.get(key) is not None:
            r.fail(join(path, key), _UNSUPPORTED)
    matches = tuple(
        _match(r, entry, at)
        for at, entry in each_mapping(r, raw.get("match"), join(path, "match"), 64)
    ) or (Match(),)
    destinations = tuple(
        _destination(r, entry, at, weighted=True)
        for at, entry in each_mapping(r, raw.get("route"), join(path, "route"), 64)
    )
    if len(destinations) == 1 and destinations[0].weight == 0:
        only = destinations[0]
        destinations = (Destination(only.host, only.subset, only.port, 100,
                                    only.request_headers, only.response_headers),)  # fmt: skip
    redirect = _redirect(r, raw.get("redirect"), join(path, "redirect"))
    direct = _direct(r, raw.get("directResponse"), join(path, "directResponse"))
    actions = sum(x is not None and x != () for x in (destinations or None, redirect, direct))
    if actions != 1:
        r.fail(path, "exactly one of route, redirect or directResponse is required")
    request, response = _headers(r, raw.get("headers"), join(path, "headers"))
    timeout = None
    if raw.get("timeout") is not None:
        timeout = istio_duration(r, raw["timeout"], join(path, "timeout")) or None
    retry = _retries(r, raw.get("retries"), join(path, "retries"))
    return VsRule(
        name=r.string(raw, "name", path) if raw.get("name") is not None else None,
        matches=matches,
        destinations=destinations,
        redirect=redirect,
        direct=direct,
        rewrite=_rewrite(r, raw.get("rewrite"), join(path, "rewrite")),
        request_headers=request,
        response_headers=response,
        mirrors=_mirrors(r, raw, path),
        timeouts=Timeouts(request=timeout, backend_request=retry.per_try_timeout),
        retry=retry,
        fault=_fault(r, raw.get("fault"), join(path, "fault")),
    )


def _string_match(r: Reader, value: Any, path: str, *, lower: bool = False) -> StringMatch | None:
    body = r.mapping(value, path)
    if not body:
        return None  # `{}`: present, any value
    r.check_keys(body, ("exact", "prefix", "regex"), path)
    if len(body) != 1:
        r.fail(path, "exactly one of exact, prefix or regex is required")
    kind, text = next(iter(body.items()))
    text = r.string(body, kind, path, empty_ok=kind != "regex")
    if kind == "regex":
        pattern = regex(r, f"(?i){text}" if lower else text, join(path, kind))
        return StringMatch(MatchKind.REGEX, text, pattern)
    value = text.lower() if lower else text
    return StringMatch(
        MatchKind.EXACT if kind == "exact" else MatchKind.STRING_PREFIX, value, ignore_case=lower
    )


_MATCH_KEYS = (
    "name", "uri", "scheme", "method", "authority", "headers", "port", "sourceLabels",
    "gateways", "queryParams", "ignoreUriCase", "withoutHeaders", "sourceNamespace",
    "statPrefix",
)  # fmt: skip


def _match(r: Reader, entry: dict[str, Any], path: str) -> Match:
    r.check_keys(entry, _MATCH_KEYS, path)
    for key in ("scheme", "sourceLabels", "gateways", "statPrefix"):
        if entry.get(key):
            r.fail(join(path, key), _UNSUPPORTED)
    ignore_case = r.boolean(entry, "ignoreUriCase", path, False)
    uri = _string_match(r, entry.get("uri"), join(path, "uri"), lower=ignore_case)
    if uri is not None and uri.kind is not MatchKind.REGEX:
        http_path(
            r,
            uri.value,
            join(
                path,
                "uri",
            ),
            allow_empty=uri.kind is MatchKind.STRING_PREFIX,
        )
    method = None
    if entry.get("method") is not None:
        m = _string_match(r, entry["method"], join(path, "method"))
        if m is None or m.kind is not MatchKind.EXACT:
            r.fail(join(path, "method"), "only an exact method match is supported")
        method = m.value
    headers = []
    for key, absent in (("headers", False), ("withoutHeaders", True)):
        hpath = join(path, key)
        for name, value in r.mapping(entry.get(key), hpath).items():
            hname = header_name(r, name, hpath)
            headers.append(HeaderMatch(hname, _string_match(r, value, join(hpath, name)), absent))
    query = []
    qpath = join(path, "queryParams")
    for name, value in r.mapping(entry.get("queryParams"), qpath).items():
        query.append(QueryMatch(str(name), _string_match(r, value, join(qpath, name))))
    port = r.port(entry["port"], join(path, "port")) if entry.get("port") is not None else None
    return Match(
        path=uri,
        method=method,
        headers=tuple(headers),
        query=tuple(query),
        authority=_string_match(r, entry.get("authority"), join(path, "authority"), lower=True),
        port=port,
        source_namespace=(
            r.name(entry, "sourceNamespace", path) if entry.get("sourceNamespace") else None
        ),
    )


def _destination(r: Reader, entry: dict[str, Any], path: str, *, weighted: bool) -> Destination:
    if weighted:
        r.check_keys(entry, ("destination", "weight", "headers"), path)
        dpath = join(path, "destination")
        body = r.mapping(entry.get("destination"), dpath, required=True)
    else:
        dpath, body = path, entry
    r.check_keys(body, ("host", "subset", "port"), dpath)
    port = None
    if body.get("port") is not None:
        ppath = join(dpath, "port")
        raw_port = r.mapping(body["port"], ppath, required=True)
        r.check_keys(raw_port, ("number",), ppath)
        port = r.port(raw_port.get("number"), join(ppath, "number"))
    request, response = (NO_HEADERS, NO_HEADERS)
    if weighted:
        request, response = _headers(r, entry.get("headers"), join(path, "headers"))
    return Destination(
        host=r.string(body, "host", dpath),
        subset=r.string(body, "subset", dpath) if body.get("subset") is not None else None,
        port=port,
        weight=integer(r, entry, "weight", path, 0, low=0, high=100) if weighted else 100,
        request_headers=request,
        response_headers=response,
    )


def _headers(r: Reader, value: Any, path: str) -> tuple[HeaderFilter, HeaderFilter]:
    body = r.mapping(value, path)
    r.check_keys(body, ("request", "response"), path)
    out = []
    for side in ("request", "response"):
        spath = join(path, side)
        ops = r.mapping(body.get(side), spath)
        r.check_keys(ops, ("set", "add", "remove"), spath)
        pairs = {}
        for op in ("set", "add"):
            values = r.string_map(ops.get(op), join(spath, op))
            pairs[op] = tuple(
                (header_name(r, k, join(spath, op)), header_value(r, values, k, join(spath, op)))
                for k in values
            )
        remove = tuple(
            header_name(r, n, join(spath, "remove"))
            for n in r.strings(ops.get("remove"), join(spath, "remove"))
        )
        out.append(HeaderFilter(pairs["set"], pairs["add"], remove))
    return out[0], out[1]


def _redirect(r: Reader, value: Any, path: str) -> RedirectSpec | None:
    if value is None:
        return None
    body = r.mapping(value, path)
    r.check_keys(body, ("uri", "authority", "port", "derivePort", "scheme", "redirectCode"), path)
    if body.get("derivePort") is not None:
        r.fail(join(path, "derivePort"), _UNSUPPORTED)
    status = integer(r, body, "redirectCode", path, 301)
    if status not in (301, 302, 303, 307, 308):
        r.fail(join(path, "redirectCode"), f"{status} is not one of 301, 302, 303, 307, 308")
    uri = None
    if body.get("uri") is not None:
        uri = PathRewrite(PathRewriteKind.FULL, http_path(r, body["uri"], join(path, "uri")))
    scheme = None
    if body.get("scheme") is not None:
        scheme = one_of(r, body["scheme"], join(path, "scheme"), ("http", "https"))
    return RedirectSpec(
        status=status,
        scheme=scheme,
        hostname=r.string(body, "authority", path) if body.get("authority") is not None else None,
        port=r.port(body["port"], join(path, "port")) if body.get("port") is not None else None,
        path=uri,
    )


def _direct(r: Reader, value: Any, path: str) -> tuple[int, str] | None:
    if value is None:
        return None
    body = r.mapping(value, path)
    r.check_keys(body, ("status", "body"), path)
    status = integer(r, body, "status", path, low=200, high=599)
    text = ""
    if body.get("body") is not None:
        bpath = join(path, "body")
        raw = r.mapping(body["body"], bpath)
        r.check_keys(raw, ("string",), bpath)
        text = r.string(raw, "string", bpath, empty_ok=True)
    return status, text


def _rewrite(r: Reader, value: Any, path: str) -> Rewrite | None:
    if value is None:
        return None
    body = r.mapping(value, path)
    r.check_keys(body, ("uri", "authority", "uriRegexRewrite"), path)
    if body.get("uriRegexRewrite") is not None:
        r.fail(join(path, "uriRegexRewrite"), _UNSUPPORTED)
    uri = None
    if body.get("uri") is not None:
        uri = PathRewrite(
            PathRewriteKind.STRING_PREFIX, http_path(r, body["uri"], join(path, "uri"))
        )
    authority = r.string(body, "authority", path) if body.get("authority") is not None else None
    return Rewrite(authority, uri)


def parse_retry_on(r: Reader, value: str, path: str) -> tuple[frozenset[str], frozenset[int]]:
    conditions, codes = set(), set()
    for token in (t.strip() for t in value.split(",")):
        if token.isdigit() and 400 <= int(token) <= 599:
            codes.add(int(token))
            conditions.add("retriable-status-codes")
        elif token in RETRY_ON:
            conditions.add(token)
        else:
            r.fail(path, f"{token!r} is not a retry condition ({', '.join(sorted(RETRY_ON))})")
    return frozenset(conditions), frozenset(codes)


def _retries(r: Reader, value: Any, path: str) -> RetryPolicy:
    if value is None:
        return DEFAULT_RETRY
    body = r.mapping(value, path)
    r.check_keys(
        body,
        (
            "attempts",
            "perTryTimeout",
            "retryOn",
            "retryRemoteLocalities",
            "retryIgnorePreviousHosts",
            "backoff",
        ),
        path,
    )
    attempts = integer(r, body, "attempts", path, DEFAULT_RETRY.attempts, low=0, high=1000)
    if attempts == 0:
        return NO_RETRY
    retry_on, codes = DEFAULT_RETRY.retry_on, DEFAULT_RETRY.codes
    if body.get("retryOn") is not None:
        retry_on, codes = parse_retry_on(r, r.string(body, "retryOn", path), join(path, "retryOn"))
    per_try = None
    if body.get("perTryTimeout") is not None:
        per_try = istio_duration(
            r, body["perTryTimeout"], join(path, "perTryTimeout"), minimum=0.001
        )
    base = DEFAULT_RETRY.backoff_base
    if body.get("backoff") is not None:
        base = istio_duration(r, body["backoff"], join(path, "backoff"), minimum=0.001)
    r.boolean(body, "retryRemoteLocalities", path, False)
    return RetryPolicy(
        attempts=attempts,
        retry_on=retry_on,
        codes=codes,
        per_try_timeout=per_try,
        backoff_base=base,
        backoff_max=10 * base,
        avoid_previous_host=r.boolean(body, "retryIgnorePreviousHosts", path, True),
    )


def _percentage(r: Reader, body: dict[str, Any], path: str) -> float:
    if body.get("percentage") is not None:
        ppath = join(path, "percentage")
        raw = r.mapping(body["percentage"], ppath)
        r.check_keys(raw, ("value",), ppath)
        value = number(r, raw, "value", ppath, low=0, high=100)
        return 100.0 if value is None else value
    if body.get("percent") is not None:
        return float(integer(r, body, "percent", path, low=0, high=100))
    return 100.0  # Istio: no percentage means every request


def _fault(r: Reader, value: Any, path: str) -> Fault | None:
    if value is None:
        return None
    body = r.mapping(value, path)
    r.check_keys(body, ("delay", "abort"), path)
    delay = None
    delay_percent = 100.0
    if body.get("delay") is not None:
        dpath = join(path, "delay")
        raw = r.mapping(body["delay"], dpath)
        r.check_keys(raw, ("fixedDelay", "percentage", "percent", "exponentialDelay"), dpath)
        if raw.get("exponentialDelay") is not None:
            r.fail(join(dpath, "exponentialDelay"), _UNSUPPORTED)
        delay = istio_duration(r, raw.get("fixedDelay"), join(dpath, "fixedDelay"), minimum=0.001)
        delay_percent = _percentage(r, raw, dpath)
    abort = None
    abort_percent = 100.0
    if body.get("abort") is not None:
        apath = join(path, "abort")
        raw = r.mapping(body["abort"], apath)
        r.check_keys(raw, ("httpStatus", "grpcStatus", "http2Error", "percentage"), apath)
        if raw.get("http2Error") is not None:
            r.fail(join(apath, "http2Error"), _UNSUPPORTED)
        if (raw.get("httpStatus") is None) == (raw.get("grpcStatus") is None):
            r.fail(apath, "exactly one of httpStatus or grpcStatus is required")
        if raw.get("httpStatus") is not None:
            abort = Abort(http_status=integer(r, raw, "httpStatus", apath, low=200, high=599))
        else:
            name = one_of(r, raw["grpcStatus"], join(apath, "grpcStatus"), tuple(GRPC_STATUS_CODES))
            abort = Abort(grpc_status=GRPC_STATUS_CODES[name])
        abort_percent = _percentage(r, raw, apath)
    if delay is None and abort is None:
        r.fail(path, "one of delay or abort is required")
    return Fault(delay, delay_percent, abort, abort_percent)


def _mirrors(r: Reader, raw: dict[str, Any], path: str) -> tuple[VsMirror, ...]:
    out = []
    if raw.get("mirror") is not None:
        mpath = join(path, "mirror")
        dest = _destination(r, r.mapping(raw["mirror"], mpath), mpath, weighted=False)
        percent = 100.0
        if raw.get("mirrorPercentage") is not None:
            ppath = join(path, "mirrorPercentage")
            body = r.mapping(raw["mirrorPercentage"], ppath)
            r.check_keys(body, ("value",), ppath)
            value = number(r, body, "value", ppath, low=0, high=100)
            percent = 100.0 if value is None else value
        out.append(VsMirror(dest, percent))
    for at, entry in each_mapping(r, raw.get("mirrors"), join(path, "mirrors"), 16):
        r.check_keys(entry, ("destination", "percentage"), at)
        dpath = join(at, "destination")
        dest = _destination(r, r.mapping(entry.get("destination"), dpath, required=True), dpath,
                            weighted=False)  # fmt: skip
        out.append(VsMirror(dest, _percentage(r, entry, at)))
    return tuple(out)
