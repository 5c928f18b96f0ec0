"""The L7 AuthorizationPolicy model: parsed, validated, immutable values. Pure: no I/O.

Matching is Istio's (as Envoy's RBAC filter enforces it at a waypoint): a policy's rules OR;
within a rule its clauses AND (`from`, `to`, then one clause per `when` condition); the
entries of `from` (or `to`) OR; the fields of an entry AND; the values of a field OR; a `not`
field must not match. A rule with no clauses (`{}`) matches every request.

A fact the request does not have (no proven identity, no JWT, no such header or claim) matches
no value, so the `not` form of that field DOES match it: `notRequestPrincipals: ["*"]` is
true for a request without a token, as upstream. String values use Istio's notation
(`meshcore.policy.model.StringMatch`: `*` present, `x*` prefix, `*x` suffix, else exact).
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from meshcore.policy.model import Action, ServiceAccountMatch, StringMatch
from meshcore.state import IPAddress
from waypoint.authz.facts import RequestFacts
from waypoint.authz.paths import PathMatcher

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# The kinds a waypoint policy may target (Istio's PolicyTargetReference at a waypoint).
GATEWAY = "Gateway"
GATEWAY_CLASS = "GatewayClass"
SERVICE = "Service"
SERVICE_ENTRY = "ServiceEntry"
WAYPOINT_CLASS = "istio-waypoint"
MAX_TARGET_REFS = 16


class Matcher(Protocol):
    def matches(self, value: Any) -> bool: ...


@dataclass(frozen=True, slots=True)
class IpMatch:
    network: IPNetwork

    def matches(self, value: IPAddress) -> bool:
        return value.version == self.network.version and value in self.network

    def to_json(self) -> str:
        return str(self.network)


@dataclass(frozen=True, slots=True)
class PortMatch:
    port: int

    def matches(self, value: int) -> bool:
        return value == self.port

    def to_json(self) -> int:
        return self.port


@dataclass(frozen=True, slots=True)
class HostMatch:
    """`hosts`: case-insensitive; a value without a port matches the host whatever port the
    request names (`example.com` matches `Example.com:8080`), as Istio generates it."""

    match: StringMatch  # lower-cased
    with_port: bool

    def matches(self, value: str) -> bool:
        host = value.lower()
        if not self.with_port:
            host = strip_port(host)
        return self.match.matches(host)

    def to_json(self) -> Any:
        return self.match.to_json()


def strip_port(host: str) -> str:
    if host.startswith("["):  # [v6]:port
        end = host.find("]")
        return host[: end + 1] if end >= 0 else host
    name, colon, port = host.rpartition(":")
    if colon and port.isdigit() and ":" not in name:
        return name
    return host


class Fact(enum.Enum):
    """What a field looks at in `RequestFacts`."""

    PRINCIPAL = "source.principal"
    NAMESPACE = "source.namespace"
    SERVICE_ACCOUNT = "source.serviceAccount"
    SOURCE_IP = "source.ip"
    REMOTE_IP = "remote.ip"
    REQUEST_PRINCIPAL = "request.auth.principal"
    AUDIENCES = "request.auth.audiences"
    PRESENTER = "request.auth.presenter"
    CLAIM = "request.auth.claims"
    HEADER = "request.headers"
    HOST = "host"
    METHOD = "method"
    PATH = "path"
    DESTINATION_PORT = "destination.port"
    DESTINATION_IP = "destination.ip"
    SNI = "connection.sni"


def _claim_strings(value: Any) -> tuple[str, ...]:
    # Istio matches string claims and lists of strings; other types never match.
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list):
        return tuple(v for v in value if isinstance(v, str))
    return ()


def claim_values(claims: Mapping[str, Any], path: tuple[str, ...]) -> tuple[str, ...]:
    """The strings at `claims[a][b]...`; () when any step is missing or not a mapping."""
    value: Any = claims
    for step in path:
        if not isinstance(value, Mapping) or step not in value:
            return ()
        value = value[step]
    return _claim_strings(value)


_Getter = Callable[[RequestFacts, tuple[str, ...]], tuple[Any, ...]]


def _one(value: Any) -> tuple[Any, ...]:
    return () if value is None else (value,)


_GETTERS: dict[Fact, _Getter] = {
    Fact.PRINCIPAL: lambda f, a: _one(f.principal),
    Fact.NAMESPACE: lambda f, a: _one(f.source_identity.namespace if f.source_identity else None),
    Fact.SERVICE_ACCOUNT: lambda f, a: _one(f.source_identity),
    Fact.SOURCE_IP: lambda f, a: (f.client_ip,),
    Fact.REMOTE_IP: lambda f, a: (f.original_ip,),
    Fact.REQUEST_PRINCIPAL: lambda f, a: _one(f.request_principal),
    Fact.AUDIENCES: lambda f, a: claim_values(f.claims, ("aud",)),
    Fact.PRESENTER: lambda f, a: claim_values(f.claims, ("azp",)),
    Fact.CLAIM: lambda f, a: claim_values(f.claims, a),
    Fact.HEADER: lambda f, a: _one(f.header(a[0])),
    Fact.HOST: lambda f, a: (f.host,),
    Fact.METHOD: lambda f, a: (f.method,),
    Fact.PATH: lambda f, a: (f.path,),
    Fact.DESTINATION_PORT: lambda f, a: (f.destination_port,),
    Fact.DESTINATION_IP: lambda f, a: (f.destination_ip,),
    Fact.SNI: lambda f, a: _one(f.sni),
}


@dataclass(frozen=True, slots=True)
class FieldMatch:
    """One field of an entry (`principals` + `notPrincipals`) or one `when` condition."""

    name: str  # as the user wrote it: "source.principals", "when request.headers[x-id]"
    fact: Fact
    values: tuple[Matcher, ...]
    not_values: tuple[Matcher, ...]
    arg: tuple[str, ...] = ()  # the header name, or the claim path

    def matches(self, facts: RequestFacts) -> bool:
        got = _GETTERS[self.fact](facts, self.arg)
        if self.values and not any(m.matches(v) for v in got for m in self.values):
            return False
        return not any(m.matches(v) for v in got for m in self.not_values)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"field": self.name}
        if self.values:
            out["values"] = [_json(m) for m in self.values]
        if self.not_values:
            out["notValues"] = [_json(m) for m in self.not_values]
        return out


def _json(m: Matcher) -> Any:
    to_json = getattr(m, "to_json", None)
    return to_json() if to_json is not None else repr(m)


@dataclass(frozen=True, slots=True)
class Entry:
    """One `from[i].source`, `to[i].operation` or `when[i]`: all its fields hold."""

    fields: tuple[FieldMatch, ...]

    def matches(self, facts: RequestFacts) -> bool:
        return all(f.matches(facts) for f in self.fields)


@dataclass(frozen=True, slots=True)
class Rule:
    # Each clause holds when any of its entries does; the rule when every clause holds.
    clauses: tuple[tuple[Entry, ...], ...]
    index: int  # position in `rules`, as the user wrote it

    def matches(self, facts: RequestFacts) -> bool:
        return all(any(e.matches(facts) for e in c) for c in self.clauses)

    def to_json(self) -> dict[str, Any]:
        return {
            "rule": self.index,
            "clauses": [[[f.to_json() for f in e.fields] for e in c] for c in self.clauses],
        }


@dataclass(frozen=True, slots=True)
class TargetRef:
    kind: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind}/{self.name}"


@dataclass(frozen=True, slots=True)
class L7Policy:
    """A parsed AuthorizationPolicy as the waypoint enforces it."""

    name: str
    namespace: str
    action: Action
    rules: tuple[Rule, ...]
    target_refs: tuple[TargetRef, ...]
    dry_run: bool = False
    # Set on the stand-in for a policy that did not parse (or asks for what the waypoint
    # does not do, such as CUSTOM): it denies every request it applies to.
    error: str | None = None
    # Targets could not be read: the stand-in applies to every request of the waypoint.
    targets_unknown: bool = False

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def matching_rule(self, facts: RequestFacts) -> int | None:
        for rule in self.rules:
            if rule.matches(facts):
                return rule.index
        return None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "namespace": self.namespace,
            "action": self.action.value,
            "dryRun": self.dry_run,
            "targetRefs": [str(t) for t in self.target_refs],
            "rules": [r.to_json() for r in self.rules],
        }
        if self.error is not None:
            out["error"] = self.error
        return out


# Re-exported so callers need one import for the values a policy holds.
__all__ = [
    "Action",
    "Entry",
    "FieldMatch",
    "HostMatch",
    "IpMatch",
    "L7Policy",
    "PathMatcher",
    "PortMatch",
    "Rule",
    "ServiceAccountMatch",
    "StringMatch",
    "TargetRef",
]
