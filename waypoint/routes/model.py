"""The routing domain: matches, actions and the decision `RouteTable.select` returns.

Every value is frozen and built once from a document; matching reads only `RequestFacts`.
Header names are lower-case throughout; header values compare case-sensitively.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from waypoint.routes.facts import RequestFacts
from waypoint.routes.fault import Fault
from waypoint.routes.retry import DEFAULT_RETRY, RetryPolicy


class MatchKind(enum.Enum):
    EXACT = "Exact"
    PREFIX = "PathPrefix"  # Gateway API: element-wise ("/foo" matches "/foo/bar", not "/foobar")
    STRING_PREFIX = "prefix"  # Istio: plain string prefix
    REGEX = "RegularExpression"  # RE2, full match


@dataclass(frozen=True, slots=True)
class StringMatch:
    kind: MatchKind
    value: str
    pattern: Any = field(default=None, compare=False)  # the compiled RE2 pattern for REGEX
    ignore_case: bool = False

    def matches(self, value: str) -> bool:
        if self.ignore_case:
            value = value.lower()
        if self.kind is MatchKind.EXACT:
            return value == self.value
        if self.kind is MatchKind.STRING_PREFIX:
            return value.startswith(self.value)
        if self.kind is MatchKind.PREFIX:
            prefix = self.value
            if prefix == "/":
                return True
            return value == prefix or value.startswith(prefix + "/")
        return self.pattern.fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    name: str
    match: StringMatch | None  # None: present with any value
    absent: bool = False  # Istio's withoutHeaders: matches when the header does not match

    def matches(self, facts: RequestFacts) -> bool:
        value = facts.header(self.name)
        hit = value is not None and (self.match is None or self.match.matches(value))
        return hit != self.absent


@dataclass(frozen=True, slots=True)
class QueryMatch:
    name: str
    match: StringMatch | None  # None: present with any value

    def matches(self, facts: RequestFacts) -> bool:
        value = facts.query_param(self.name)
        return value is not None and (self.match is None or self.match.matches(value))


@dataclass(frozen=True, slots=True)
class Match:
    """All conditions must hold (a rule matches when any of its `Match`es does)."""

    path: StringMatch | None = None
    method: str | None = None
    headers: tuple[HeaderMatch, ...] = ()
    query: tuple[QueryMatch, ...] = ()
    authority: StringMatch | None = None  # VirtualService only
    port: int | None = None  # VirtualService only
    source_namespace: str | None = None  # VirtualService only

    def matches(self, facts: RequestFacts, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.method is not None and facts.method != self.method:
            return False
        if self.path is not None and not self.path.matches(facts.path_only):
            return False
        if self.authority is not None and not self.authority.matches(facts.authority):
            return False
        if self.source_namespace is not None and facts.source_namespace != self.source_namespace:
            return False
        return all(h.matches(facts) for h in self.headers) and all(
            q.matches(facts) for q in self.query
        )


# -- actions -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HeaderFilter:
    """Set (replace every value), add (append one more), remove: in that order, as Envoy."""

    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.set or self.add or self.remove)


NO_HEADERS = HeaderFilter()


class PathRewriteKind(enum.Enum):
    FULL = "ReplaceFullPath"
    PREFIX = "ReplacePrefixMatch"  # Gateway API: the matched element-wise prefix
    STRING_PREFIX = "uri"  # Istio: the matched string prefix, or the whole path


@dataclass(frozen=True, slots=True)
class PathRewrite:
    kind: PathRewriteKind
    value: str


@dataclass(frozen=True, slots=True)
class Rewrite:
    hostname: str | None = None
    path: PathRewrite | None = None


@dataclass(frozen=True, slots=True)
class RedirectSpec:
    """A RequestRedirect filter (or a VirtualService redirect) before it meets a request."""

    status: int = 302
    scheme: str | None = None
    hostname: str | None = None
    port: int | None = None
    path: PathRewrite | None = None


@dataclass(frozen=True, slots=True)
class Mirror:
    """Copy the request to this service and ignore the answer, for `percent` of requests."""

    service_key: str
    port: int
    percent: float = 100.0

    def wanted(self, rnd: float) -> bool:
        return rnd * 100.0 < self.percent


@dataclass(frozen=True, slots=True)
class Backend:
    """One weighted destination. `service_key` is "ns/hostname"; None means the reference
    could not be resolved and this share of traffic is answered with `status` (500)."""

    service_key: str | None
    port: int
    weight: int = 1
    subset: str | None = None
    request_headers: HeaderFilter = HeaderFilter()
    response_headers: HeaderFilter = HeaderFilter()
    status: int | None = None


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds; None: no limit. `backend_request` bounds each try when retrying."""

    request: float | None = None
    backend_request: float | None = None


NO_TIMEOUTS = Timeouts()


@dataclass(frozen=True, slots=True)
class Forward:
    backends: tuple[Backend, ...]
    request_headers: HeaderFilter = HeaderFilter()
    response_headers: HeaderFilter = HeaderFilter()
    rewrite: Rewrite | None = None
    # The path prefix the request matched, for a ReplacePrefixMatch rewrite.
    matched_prefix: str | None = None
    mirrors: tuple[Mirror, ...] = ()
    timeouts: Timeouts = Timeouts()
    retry: RetryPolicy = DEFAULT_RETRY
    fault: Fault | None = None


@dataclass(frozen=True, slots=True)
class Redirect:
    status: int
    location: str


@dataclass(frozen=True, slots=True)
class Direct:
    status: int
    body: str = ""


Action = Forward | Redirect | Direct


@dataclass(frozen=True, slots=True)
class RouteRef:
    """Which rule decided: kind, namespace, name and rule index (None for a default route)."""

    kind: str
    namespace: str
    name: str
    rule: int | None = None

    def __str__(self) -> str:
        at = f"[{self.rule}]" if self.rule is not None else ""
        return f"{self.kind} {self.namespace}/{self.name}{at}"


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """The router's answer for one request.

    `route` is the matched rule, or None when no route applies and the request goes to the
    service it was addressed to (`action` is then a `Forward` to that service and port, with
    Istio's default retry policy). `action` is what to do: forward, redirect, or answer.
    """

    route: RouteRef | None
    action: Action
