"""The AuthorizationPolicy model: parsed, validated, immutable values. Pure: no I/O.

Matching (ztunnel's `rbac.rs`): rules OR; within a rule its clauses AND (`from`, `to`, one per
`when` condition); the entries of a clause OR; the fields of an entry AND; the values of a field
OR; a `not` field must not match. No rules = matches nothing; a rule with no clauses (`{}`)
matches everything. Strings: `*` = present (non-empty), `x*` prefix, `*x` suffix, else exact.
Principals are compared without `spiffe://`. A connection without identity (plaintext) matches
no principal, namespace or service account, so the `not` forms of those DO match it (as
upstream: `notPrincipals: ["x"]` is true for plaintext). Service accounts ("ns/sa", or "sa" in
the policy's namespace) compare namespace and account exactly, ignoring the trust domain.

`Match.matches` and `Rule.matches` are the reference semantics; `compile` turns rules into
equivalent closures for the data path, and the tests hold the two to the same answers.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from meshcore.identity.spiffe import SpiffeId
from meshcore.policy.resource import Labels
from meshcore.state import IPAddress

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# What a compiled rule looks at: one request reduced to a tuple (see `compile`).
Facts = tuple[str | None, str | None, tuple[str, str] | None, int, int, int, int, int]
Predicate = Callable[[Facts], bool]


class Action(enum.Enum):
    ALLOW = "ALLOW"
    DENY = "DENY"
    # Parsed so that config dumps show them; never enforced at L4.
    AUDIT = "AUDIT"
    CUSTOM = "CUSTOM"


class Scope(enum.Enum):
    GLOBAL = "GLOBAL"
    NAMESPACE = "NAMESPACE"
    WORKLOAD_SELECTOR = "WORKLOAD_SELECTOR"


@dataclass(frozen=True, slots=True)
class Request:
    """What the tunnel knows about one inbound connection."""

    src_ip: IPAddress
    src_identity: SpiffeId | None  # None for plaintext (port 15006) clients
    dst_ip: IPAddress
    dst_port: int  # the app's (target) port


# -- match types -----------------------------------------------------------------------------------


class MatchKind(enum.Enum):
    EXACT = "exact"
    PREFIX = "prefix"
    SUFFIX = "suffix"
    PRESENCE = "presence"


@dataclass(frozen=True, slots=True)
class StringMatch:
    kind: MatchKind
    value: str = ""

    @classmethod
    def istio(cls, text: str) -> StringMatch:
        """Istio's notation: "*" present, "*x" suffix, "x*" prefix, anything else exact."""
        if text == "*":
            return cls(MatchKind.PRESENCE)
        if text.startswith("*"):
            return cls(MatchKind.SUFFIX, text[1:])
        if text.endswith("*"):
            return cls(MatchKind.PREFIX, text[:-1])
        return cls(MatchKind.EXACT, text)

    def matches(self, candidate: str) -> bool:
        if self.kind is MatchKind.EXACT:
            return candidate == self.value
        if self.kind is MatchKind.PREFIX:
            return candidate.startswith(self.value)
        if self.kind is MatchKind.SUFFIX:
            return candidate.endswith(self.value)
        return candidate != ""

    def to_json(self) -> dict[str, Any]:
        if self.kind is MatchKind.PRESENCE:
            return {"presence": {}}
        return {self.kind.value: self.value}


@dataclass(frozen=True, slots=True)
class ServiceAccountMatch:
    namespace: str
    service_account: str

    def matches(self, identity: SpiffeId) -> bool:
        return (
            identity.namespace == self.namespace
            and identity.service_account == self.service_account
        )

    def to_json(self) -> dict[str, str]:
        return {"namespace": self.namespace, "serviceAccount": self.service_account}


@dataclass(frozen=True, slots=True)
class Match:
    """One `from`/`to`/`when` entry at L4: all set fields must hold (values of one field OR).

    A Match with no field set never matches (ztunnel skips empty matches)."""

    namespaces: tuple[StringMatch, ...] = ()
    not_namespaces: tuple[StringMatch, ...] = ()
    principals: tuple[StringMatch, ...] = ()
    not_principals: tuple[StringMatch, ...] = ()
    service_accounts: tuple[ServiceAccountMatch, ...] = ()
    not_service_accounts: tuple[ServiceAccountMatch, ...] = ()
    source_ips: tuple[IPNetwork, ...] = ()
    not_source_ips: tuple[IPNetwork, ...] = ()
    destination_ips: tuple[IPNetwork, ...] = ()
    not_destination_ips: tuple[IPNetwork, ...] = ()
    destination_ports: tuple[int, ...] = ()
    not_destination_ports: tuple[int, ...] = ()

    def is_empty(self) -> bool:
        return not any(getattr(self, name) for name in MATCH_FIELDS)

    def matches(self, req: Request) -> bool:
        """The reference (unindexed) check; `PolicyIndex` uses compiled equivalents."""
        if self.is_empty():
            return False
        ident = req.src_identity
        principal = principal_of(ident)
        ns = ident.namespace if ident is not None else None
        src, dst = canonical_ip(req.src_ip), canonical_ip(req.dst_ip)

        def strings(
            pos: tuple[StringMatch, ...], neg: tuple[StringMatch, ...], v: str | None
        ) -> bool:
            any_pos = v is not None and any(m.matches(v) for m in pos)
            any_neg = v is not None and any(m.matches(v) for m in neg)
            return (not pos or any_pos) and not any_neg

        def nets(pos: tuple[IPNetwork, ...], neg: tuple[IPNetwork, ...], ip: IPAddress) -> bool:
            return (not pos or any(ip in n for n in pos)) and not any(ip in n for n in neg)

        sa_pos = ident is not None and any(m.matches(ident) for m in self.service_accounts)
        sa_neg = ident is not None and any(m.matches(ident) for m in self.not_service_accounts)
        return (
            strings(self.namespaces, self.not_namespaces, ns)
            and strings(self.principals, self.not_principals, principal)
            and (not self.service_accounts or sa_pos)
            and not sa_neg
            and nets(self.source_ips, self.not_source_ips, src)
            and nets(self.destination_ips, self.not_destination_ips, dst)
            and (not self.destination_ports or req.dst_port in self.destination_ports)
            and req.dst_port not in self.not_destination_ports
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, json_name in MATCH_FIELDS.items():
            values = getattr(self, name)
            if not values:
                continue
            if name.endswith("ports"):
                out[json_name] = list(values)
            elif name.endswith("ips"):
                out[json_name] = [str(v) for v in values]
            else:
                out[json_name] = [v.to_json() for v in values]
        return out


MATCH_FIELDS = {
    "namespaces": "namespaces",
    "not_namespaces": "notNamespaces",
    "principals": "principals",
    "not_principals": "notPrincipals",
    "service_accounts": "serviceAccounts",
    "not_service_accounts": "notServiceAccounts",
    "source_ips": "sourceIps",
    "not_source_ips": "notSourceIps",
    "destination_ips": "destinationIps",
    "not_destination_ips": "notDestinationIps",
    "destination_ports": "destinationPorts",
    "not_destination_ports": "notDestinationPorts",
}


@dataclass(frozen=True, slots=True)
class Rule:
    """Clauses that must all hold; each clause holds when any of its matches does."""

    clauses: tuple[tuple[Match, ...], ...]
    # Position of the rule in the source (`rules[i]` / `groups[i]`); rules dropped for L7
    # fields leave gaps, so a verdict names the rule as the user wrote it.
    index: int

    def matches(self, req: Request) -> bool:
        # An empty clause matches (ztunnel: a clause with no matches is true).
        return all(not c or any(m.matches(req) for m in c) for c in self.clauses)

    def to_json(self) -> dict[str, Any]:
        return {"rule": self.index, "clauses": [[m.to_json() for m in c] for c in self.clauses]}


@dataclass(frozen=True, slots=True)
class Policy:
    """A parsed, validated AuthorizationPolicy."""

    name: str
    namespace: str
    scope: Scope
    action: Action
    selector: Labels  # matchLabels, sorted; () when none
    rules: tuple[Rule, ...]
    dry_run: bool
    warnings: tuple[str, ...]  # user-visible
    # Waypoint-targeted policies ("Kind/name"); the tunnel does not enforce them.
    target_refs: tuple[str, ...] = ()
    # Set on the stand-in for an entry that did not parse: it denies all it applies to.
    error: str | None = None
    # The rules compiled to closures (`compile.predicates`), built on first use: a node
    # evaluates the few policies in scope for its own workloads, so compiling all of them up
    # front would be wasted.
    _predicates: tuple[tuple[int, Predicate], ...] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def enforced(self) -> bool:
        """Whether the tunnel evaluates this policy at all: AUDIT, CUSTOM and waypoint
        (targetRef) policies it does not. A dry-run policy is evaluated, but only reported."""
        return self.action in (Action.ALLOW, Action.DENY) and not self.target_refs

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "namespace": self.namespace,
            "scope": self.scope.value,
            "action": self.action.value,
            "dryRun": self.dry_run,
            "selector": {"matchLabels": dict(self.selector)} if self.selector else None,
            "rules": [r.to_json() for r in self.rules],
            "warnings": list(self.warnings),
        }
        if self.target_refs:
            out["targetRefs"] = list(self.target_refs)
        if self.error is not None:
            out["error"] = self.error
        return out


def principal_of(ident: SpiffeId | None) -> str | None:
    if ident is None:
        return None
    return f"{ident.trust_domain}/ns/{ident.namespace}/sa/{ident.service_account}"


def canonical_ip(ip: IPAddress) -> IPAddress:
    # A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d; policies name them as IPv4.
    if ip.version == 6:
        mapped = ip.ipv4_mapped
        if mapped is not None:
            return mapped
    return ip
