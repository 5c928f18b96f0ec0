"""L4 authorization at the tunnel: Istio AuthorizationPolicy as ztunnel enforces it. Pure: no I/O.

`parse_policy` turns a `RawPolicy` into a validated `Policy`; `PolicyIndex.build` parses all of
a `MeshState`'s policies (and PeerAuthentications, see `meshcore.policy.peerauth`) and answers, per
inbound connection, `evaluate(workload, request) -> Verdict`.

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

Evaluation (Istio's order): a broken policy in scope denies (fail closed); a plaintext
connection to a port whose PeerAuthentication mode is STRICT is denied; any matching DENY
policy denies; no ALLOW policy in scope allows; a matching ALLOW policy allows; otherwise deny.
Dry-run policies are evaluated and reported in `Verdict.dry_run`, never enforced, and do not
count as "an ALLOW policy applies". AUDIT and CUSTOM policies, and policies with `targetRef(s)`
(waypoint policies), never affect the tunnel's verdict (istiod does not send them to ztunnel).

Matching (ztunnel's `rbac.rs`): rules OR; within a rule its clauses AND (`from`, `to`, one per
`when` condition); the entries of a clause OR; the fields of an entry AND; the values of a field
OR; a `not` field must not match. No rules = matches nothing; a rule with no clauses (`{}`)
matches everything. Strings: `*` = present (non-empty), `x*` prefix, `*x` suffix, else exact.
Principals are compared without `spiffe://`. A connection without identity (plaintext) matches
no principal, namespace or service account, so the `not` forms of those DO match it (as
upstream: `notPrincipals: ["x"]` is true for plaintext). Service accounts ("ns/sa", or "sa" in
the policy's namespace) compare namespace and account exactly, ignoring the trust domain.

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
import enum
import functools
import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Final

from meshcore.defaults import ROOT_NAMESPACE
from meshcore.identity.spiffe import SpiffeId
from meshcore.policy.peerauth import (
    Labels,
    MtlsDecision,
    MtlsMode,
    PeerAuthentication,
    PeerAuthIndex,
    Where,
    check_keys,
    describe,
    items,
    join,
    mapping,
    parse_or_salvage,
    parse_selector,
    selects,
    unwrap,
)
from meshcore.runtime.gcpause import collector_paused
from meshcore.state import ConfigError, IPAddress, MeshState, RawPolicy, Workload

__all__ = [
    "Action",
    "DryRunResult",
    "Match",
    "MatchKind",
    "MtlsMode",
    "Policy",
    "PolicyIndex",
    "Request",
    "Rule",
    "Scope",
    "ServiceAccountMatch",
    "StringMatch",
    "Verdict",
    "parse_policy",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_SPIFFE = "spiffe://"


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
        return not any(getattr(self, name) for name in _MATCH_FIELDS)

    def matches(self, req: Request) -> bool:
        """The reference (unindexed) check; `PolicyIndex` uses compiled equivalents."""
        if self.is_empty():
            return False
        ident = req.src_identity
        principal = _principal(ident)
        ns = ident.namespace if ident is not None else None
        src, dst = _canonical(req.src_ip), _canonical(req.dst_ip)

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
        for name, json_name in _MATCH_FIELDS.items():
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


_MATCH_FIELDS = {
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


# -- policy ----------------------------------------------------------------------------------------


Facts = tuple[str | None, str | None, tuple[str, str] | None, int, int, int, int, int]
Predicate = Callable[[Facts], bool]


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
    # The rules compiled to closures, built on first use: a node evaluates the few policies
    # in scope for its own workloads, so compiling all of them up front would be wasted.
    _predicates: tuple[tuple[int, Predicate], ...] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    @property
    def predicates(self) -> tuple[tuple[int, Predicate], ...]:
        """(rule index, compiled rule) pairs, in rule order."""
        found = self._predicates
        if found is None:
            found = tuple((r.index, _compile_rule(r)) for r in self.rules)
            object.__setattr__(self, "_predicates", found)
        return found

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def enforced(self) -> bool:
        """Whether the tunnel evaluates this policy at all: AUDIT, CUSTOM and waypoint
        (targetRef) policies it does not. A dry-run policy is evaluated, but only reported."""
        return self.action in (Action.ALLOW, Action.DENY) and not self.target_refs

    def matching_rule(self, req: Request) -> int | None:
        """Index of the first rule that matches `req`, or None."""
        facts = _facts(req)
        for index, pred in self.predicates:
            if pred(facts):
                return index
        return None

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


@dataclass(frozen=True, slots=True)
class DryRunResult:
    policy: str  # "ns/name"
    action: Action
    matched: bool
    rule: int | None

    def to_json(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "action": self.action.value,
            "matched": self.matched,
            "rule": self.rule,
        }


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    # "ns/name" of the policy that decided; None when none did (default allow, or deny
    # because ALLOW policies apply but none matched).
    policy: str | None
    rule: int | None  # index of the matching rule in that policy
    action: Action | None
    reason: str  # one human sentence
    dry_run: tuple[DryRunResult, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "allowed": self.allowed,
            "policy": self.policy,
            "rule": self.rule,
            "action": self.action.value if self.action is not None else None,
            "reason": self.reason,
            "dryRun": [d.to_json() for d in self.dry_run],
        }


# -- parsing ---------------------------------------------------------------------------------------

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


def _enum_value(where: Where, value: Any, path: str, choices: Iterable[str]) -> str:
    """An enum name; ztunnel's spelling ("Allow", "WorkloadSelector") is accepted too."""
    names = tuple(choices)
    if isinstance(value, str):
        folded = value.replace("_", "").upper()
        for name in names:
            if name.replace("_", "") == folded:
                return name
    where.fail(path, f"expected one of {', '.join(names)}, got {value!r}")


def _strings(where: Where, value: Any, path: str) -> list[str]:
    out = items(where, value, path)
    for i, v in enumerate(out):
        if not isinstance(v, str):
            where.fail(f"{path}[{i}]", f"expected a string, got {describe(v)}")
        if not v:
            where.fail(f"{path}[{i}]", "empty values are not allowed")
    return out


def _ip(where: Where, value: Any, path: str) -> IPNetwork:
    if isinstance(value, dict):  # proto JSON Address: {address: base64 bytes, length}
        check_keys(where, value, ("address", "length"), path)
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


def _port(where: Where, value: Any, path: str) -> int:
    if isinstance(value, str) and value.isascii() and value.isdigit():
        port = int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        port = value
    else:
        where.fail(path, f"{value!r} is not a port number")
    if not 0 <= port <= 65535:
        where.fail(path, f"port {port} is not in 0..65535")
    return port


def _service_account(where: Where, text: str, path: str, namespace: str) -> ServiceAccountMatch:
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
    where: Where, field_name: str, raw: Any, path: str, namespace: str, warnings: list[str]
) -> tuple[Any, ...]:
    """Istio-form values (strings; ports may also be numbers) of one L4 Match field."""
    # Element paths ("...[3]") are only formatted when there is an error to report.
    if field_name.endswith("ports"):
        ports = items(where, raw, path)
        out_ports = []
        for i, v in enumerate(ports):
            if isinstance(v, str) and v.isascii() and v.isdigit() and int(v) <= 65535:
                out_ports.append(int(v))
            else:
                out_ports.append(_port(where, v, f"{path}[{i}]"))
        return tuple(out_ports)
    values = _strings(where, raw, path)
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

    def __init__(self, where: Where, namespace: str, path: str) -> None:
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
        entries = items(self.where, raw, path)
        if raw is not None and not entries:
            self.where.fail(path, f"`{name}` must not be empty; omit it to match any {inner}")
        matches: list[Match] = []
        everything = False
        for i, entry in enumerate(entries):
            entry_path = f"{path}[{i}]"
            outer = mapping(self.where, entry, entry_path)
            check_keys(self.where, outer, (inner,), entry_path)
            body_path = f"{entry_path}.{inner}"
            if outer.get(inner) is None:
                self.where.fail(body_path, f"`{inner}` is required")
            body = mapping(self.where, outer[inner], body_path)
            check_keys(self.where, body, _ENTRY_KEYS[inner], body_path)
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
                    if _strings(self.where, raw_values, f"{body_path}.{key}"):
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
        for i, cond in enumerate(items(self.where, raw, path)):
            cpath = f"{path}[{i}]"
            body = mapping(self.where, cond, cpath)
            check_keys(self.where, body, ("key", "values", "notValues"), cpath)
            key = body.get("key")
            if not isinstance(key, str) or not key:
                self.where.fail(f"{cpath}.key", "must be a non-empty string")
            values = items(self.where, body.get("values"), f"{cpath}.values")
            not_values = items(self.where, body.get("notValues"), f"{cpath}.notValues")
            if not values and not not_values:
                self.where.fail(cpath, f"at least one of values or notValues must be set for {key}")
            if key not in _WHEN_L4:
                _strings(self.where, values, f"{cpath}.values")
                _strings(self.where, not_values, f"{cpath}.notValues")
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
    where: Where, raw: Any, path: str, namespace: str, action: Action, warnings: list[str]
) -> tuple[Rule, ...]:
    rules: list[Rule] = []
    for i, entry in enumerate(items(where, raw, path)):
        rpath = f"{path}[{i}]"
        body = mapping(where, entry, rpath)
        check_keys(where, body, ("from", "to", "when"), rpath)
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
    **{json_name: name for name, json_name in _MATCH_FIELDS.items()},
    **{name: name for name in _MATCH_FIELDS},  # proto JSON also accepts field names
}


def _xds_string_match(where: Where, value: Any, path: str) -> StringMatch:
    if isinstance(value, str):
        if not value:
            where.fail(path, "empty values are not allowed")
        return StringMatch.istio(value)
    body = mapping(where, value, path)
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
    where: Where, value: Any, path: str, namespace: str
) -> ServiceAccountMatch:
    if isinstance(value, str):
        return _service_account(where, value, path, namespace)
    body = mapping(where, value, path)
    check_keys(where, body, ("namespace", "serviceAccount", "service_account"), path)
    ns = body.get("namespace")
    sa = body.get("serviceAccount", body.get("service_account"))
    if not isinstance(ns, str) or not ns:
        where.fail(f"{path}.namespace", "must be a non-empty string")
    if not isinstance(sa, str) or not sa:
        where.fail(f"{path}.serviceAccount", "must be a non-empty string")
    return ServiceAccountMatch(ns, sa)


def _xds_match(where: Where, value: Any, path: str, namespace: str) -> Match:
    body = mapping(where, value, path)
    check_keys(where, body, _XDS_MATCH_KEYS, path)
    kwargs: dict[str, tuple[Any, ...]] = {}
    for key, raw in body.items():
        name = _XDS_MATCH_KEYS[key]
        fpath = f"{path}.{key}"
        values = items(where, raw, fpath)
        parsed: tuple[Any, ...]
        if name.endswith("ips"):
            parsed = tuple(_ip(where, v, f"{fpath}[{i}]") for i, v in enumerate(values))
        elif name.endswith("ports"):
            parsed = tuple(_port(where, v, f"{fpath}[{i}]") for i, v in enumerate(values))
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


def _parse_xds_groups(where: Where, raw: Any, namespace: str) -> tuple[Rule, ...]:
    rules: list[Rule] = []
    for g, group in enumerate(items(where, raw, "groups")):
        gpath = f"groups[{g}]"
        gbody = mapping(where, group, gpath)
        check_keys(where, gbody, ("rules",), gpath)
        clauses: list[tuple[Match, ...]] = []
        for r, clause in enumerate(items(where, gbody.get("rules"), f"{gpath}.rules")):
            cpath = f"{gpath}.rules[{r}]"
            cbody = mapping(where, clause, cpath)
            check_keys(where, cbody, ("matches",), cpath)
            matches = items(where, cbody.get("matches"), f"{cpath}.matches")
            clauses.append(
                tuple(
                    _xds_match(where, m, f"{cpath}.matches[{i}]", namespace)
                    for i, m in enumerate(matches)
                )
            )
        rules.append(Rule(tuple(clauses), g))
    return tuple(rules)


def _parse_nested_rules(where: Where, raw: list[Any], namespace: str) -> tuple[Rule, ...]:
    """ztunnel's config shape: rules -> clauses -> matches, as nested lists."""
    rules: list[Rule] = []
    for r, rule in enumerate(raw):
        rpath = f"rules[{r}]"
        clauses = []
        for c, clause in enumerate(items(where, rule, rpath)):
            cpath = f"{rpath}[{c}]"
            clauses.append(
                tuple(
                    _xds_match(where, m, f"{cpath}[{i}]", namespace)
                    for i, m in enumerate(items(where, clause, cpath))
                )
            )
        rules.append(Rule(tuple(clauses), r))
    return tuple(rules)


def _target_refs(where: Where, body: Mapping[str, Any], path: str) -> tuple[str, ...]:
    refs: list[Any] = []
    if body.get("targetRef") is not None:
        refs.append(mapping(where, body["targetRef"], join(path, "targetRef")))
    refs.extend(items(where, body.get("targetRefs"), join(path, "targetRefs")))
    out = []
    for i, ref in enumerate(refs):
        rpath = join(path, f"targetRefs[{i}]")
        ref_body = mapping(where, ref, rpath)
        kind, name = ref_body.get("kind"), ref_body.get("name")
        if not isinstance(kind, str) or not kind or not isinstance(name, str) or not name:
            where.fail(rpath, "a target reference needs a kind and a name")
        out.append(f"{kind}/{name}")
    return tuple(out)


def parse_policy(raw: RawPolicy, root_namespace: str = ROOT_NAMESPACE) -> Policy:
    """Parse and validate one AuthorizationPolicy.

    Raises ConfigError (and nothing else) with a message naming the entry and the field.
    """
    where = Where("AuthorizationPolicy", raw.key)
    if raw.kind != "AuthorizationPolicy":
        where.fail("kind", f"is a {raw.kind}, not an AuthorizationPolicy")
    env = unwrap(raw, where, "AuthorizationPolicy")
    body, bpath = env.body, env.body_path
    check_keys(where, body, _SPEC_KEYS if env.resource else _FLAT_KEYS, bpath)
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


def _salvage(raw: RawPolicy, root_namespace: str, error: str) -> Policy:
    """The fail-closed stand-in for a policy that did not parse.

    The parts of the entry that still parse narrow it (selector, action, dry run, waypoint
    targets); a part that does not is read the strict way: an unreadable action counts as
    enforced, an unreadable selector as namespace- (or mesh-) wide. Whatever its action, an
    enforced stand-in denies every connection in its scope.
    """
    where = Where("AuthorizationPolicy", raw.key)
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
    except ConfigError:
        pass

    selector_unreadable = False

    def attempt(part: Callable[[], None]) -> None:
        nonlocal selector_unreadable
        try:
            part()
        except ConfigError:
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


# -- compiled matching -----------------------------------------------------------------------------
#
# The request is reduced once to a tuple of facts; each rule is compiled into a closure over
# frozensets and tuples, so a check is a handful of set lookups and str.startswith calls.

# Positions in Facts (Final, so that indexing the tuple keeps each position's type).
_F_PRINCIPAL: Final = 0
_F_NS: Final = 1
_F_SA: Final = 2
_F_SRC_V: Final = 3
_F_SRC: Final = 4
_F_DST_V: Final = 5
_F_DST: Final = 6
_F_PORT: Final = 7


def _principal(ident: SpiffeId | None) -> str | None:
    if ident is None:
        return None
    return f"{ident.trust_domain}/ns/{ident.namespace}/sa/{ident.service_account}"


def _canonical(ip: IPAddress) -> IPAddress:
    # A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d; policies name them as IPv4.
    if ip.version == 6:
        mapped = ip.ipv4_mapped
        if mapped is not None:
            return mapped
    return ip


def _facts(req: Request) -> Facts:
    ident = req.src_identity
    src = _canonical(req.src_ip)
    dst = _canonical(req.dst_ip)
    if ident is None:
        return (None, None, None, src.version, int(src), dst.version, int(dst), req.dst_port)
    ns = ident.namespace
    sa = ident.service_account
    return (
        f"{ident.trust_domain}/ns/{ns}/sa/{sa}",
        ns,
        (ns, sa),
        src.version,
        int(src),
        dst.version,
        int(dst),
        req.dst_port,
    )


def _string_test(matches: tuple[StringMatch, ...]) -> Callable[[str], bool]:
    exact = frozenset(m.value for m in matches if m.kind is MatchKind.EXACT)
    prefixes = tuple(m.value for m in matches if m.kind is MatchKind.PREFIX)
    suffixes = tuple(m.value for m in matches if m.kind is MatchKind.SUFFIX)
    presence = any(m.kind is MatchKind.PRESENCE for m in matches)
    if presence:
        # "present" subsumes every other form except an exact/prefix/suffix of "" on "".
        empty_ok = "" in exact or "" in prefixes or "" in suffixes
        return (lambda s: True) if empty_ok else bool
    if not prefixes and not suffixes:
        return exact.__contains__

    def test(s: str) -> bool:
        return (
            s in exact
            or (bool(prefixes) and s.startswith(prefixes))
            or (bool(suffixes) and s.endswith(suffixes))
        )

    return test


def _ip_test(nets: tuple[IPNetwork, ...]) -> Callable[[int, int], bool]:
    hosts = frozenset(
        (n.version, int(n.network_address)) for n in nets if n.prefixlen == n.max_prefixlen
    )
    ranges = tuple(
        (n.version, int(n.network_address), int(n.netmask))
        for n in nets
        if n.prefixlen != n.max_prefixlen
    )

    if not ranges:
        return lambda version, value: (version, value) in hosts
    if not hosts and len(ranges) == 1:
        ((only_v, only_net, only_mask),) = ranges
        return lambda version, value: version == only_v and value & only_mask == only_net

    def test(version: int, value: int) -> bool:
        if (version, value) in hosts:
            return True
        for v, net, mask in ranges:  # noqa: SIM110 - a plain loop is faster than any()
            if v == version and value & mask == net:
                return True
        return False

    return test


def _identity_check(slot: int, test: Callable[[Any], bool]) -> Predicate:
    # No identity: no value matches, so the positive form fails and the `not` form holds.
    def check(f: Facts) -> bool:
        v = f[slot]
        return v is not None and test(v)

    return check


def _ip_check(source: bool, test: Callable[[int, int], bool]) -> Predicate:
    if source:
        return lambda f: test(f[_F_SRC_V], f[_F_SRC])
    return lambda f: test(f[_F_DST_V], f[_F_DST])


def _port_check(ports: frozenset[int]) -> Predicate:
    return lambda f: f[_F_PORT] in ports


def _field_check(values: tuple[Any, ...], base: str, negate: bool) -> Predicate:
    if base == "namespaces":
        check = _identity_check(_F_NS, _string_test(values))
    elif base == "principals":
        check = _identity_check(_F_PRINCIPAL, _string_test(values))
    elif base == "service_accounts":
        pairs = frozenset((v.namespace, v.service_account) for v in values)
        check = _identity_check(_F_SA, pairs.__contains__)
    elif base == "source_ips":
        check = _ip_check(True, _ip_test(values))
    elif base == "destination_ips":
        check = _ip_check(False, _ip_test(values))
    else:
        check = _port_check(frozenset(values))
    if negate:
        return lambda f: not check(f)
    return check


# (Match attribute, what it is about, whether it is a `not` field), in Match field order.
_FIELD_KINDS = tuple(
    (name, name.removeprefix("not_"), name.startswith("not_")) for name in _MATCH_FIELDS
)


def _compile_match(m: Match) -> Predicate:
    checks = tuple(
        _field_check(values, base, negate)
        for name, base, negate in _FIELD_KINDS
        if (values := getattr(m, name))
    )
    if not checks:
        return lambda f: False  # ztunnel: an empty match never matches
    if len(checks) == 1:
        return checks[0]

    def match(f: Facts) -> bool:
        for c in checks:  # noqa: SIM110 - a plain loop is faster than all()/any() on a genexpr
            if not c(f):
                return False
        return True

    return match


def _compile_clause(clause: tuple[Match, ...]) -> Predicate | None:
    """None for an empty clause (always true)."""
    if not clause:
        return None
    preds = tuple(_compile_match(m) for m in clause)
    if len(preds) == 1:
        return preds[0]

    def any_match(f: Facts) -> bool:
        for p in preds:  # noqa: SIM110 - a plain loop is faster than all()/any() on a genexpr
            if p(f):
                return True
        return False

    return any_match


def _compile_rule(rule: Rule) -> Predicate:
    clauses = tuple(c for c in (_compile_clause(c) for c in rule.clauses) if c is not None)
    if not clauses:
        return lambda f: True
    if len(clauses) == 1:
        return clauses[0]

    def all_clauses(f: Facts) -> bool:
        for c in clauses:  # noqa: SIM110 - a plain loop is faster than all()/any() on a genexpr
            if not c(f):
                return False
        return True

    return all_clauses


# A rule that can only match requests whose value of one attribute is one of a few exact
# values (or starts with one of a few prefixes) is filed under them, so a check looks at the
# rules that can match and skips the rest.
_INDEXED = (
    ("principals", _F_PRINCIPAL),
    ("service_accounts", _F_SA),
    ("namespaces", _F_NS),
    ("destination_ports", _F_PORT),
)
_STRING_KINDS = (MatchKind.EXACT, MatchKind.PREFIX)


@dataclass(frozen=True, slots=True)
class _Keys:
    slot: int
    exact: frozenset[Any]
    prefixes: frozenset[str]


def _index_keys(rule: Rule) -> _Keys | None:
    """The values (or prefixes) one of which a request's fact at `slot` must have for the
    rule to match; None when no clause pins an attribute down."""
    for name, slot in _INDEXED:
        for clause in rule.clauses:
            live = [m for m in clause if not m.is_empty()]  # empty matches never match
            if not live:
                continue
            exact: set[Any] = set()
            prefixes: set[str] = set()
            for m in live:
                values = getattr(m, name)
                if not values:
                    break
                if name in ("principals", "namespaces"):
                    if any(v.kind not in _STRING_KINDS for v in values):
                        break
                    for v in values:
                        (exact if v.kind is MatchKind.EXACT else prefixes).add(v.value)
                elif name == "service_accounts":
                    exact.update((v.namespace, v.service_account) for v in values)
                else:
                    exact.update(values)
            else:
                return _Keys(slot, frozenset(exact), frozenset(prefixes))
    return None


def _never(rule: Rule) -> bool:
    """A rule with a clause whose every match is empty can never match."""
    return any(c and all(m.is_empty() for m in c) for c in rule.clauses)


# (order, predicate, verdict when this rule decides); entries are added in order.
_Entry = tuple[int, Predicate, Verdict]


def _first(entries: list[_Entry], facts: Facts, best: _Entry | None) -> _Entry | None:
    """The first entry of `entries` that matches, if it comes before `best`."""
    limit = best[0] if best is not None else 1 << 62
    for entry in entries:
        if entry[0] >= limit:
            break
        if entry[1](facts):
            return entry
    return best


class _RuleIndex:
    __slots__ = ("_exact", "_generic", "_prefix")

    def __init__(self) -> None:
        self._exact: dict[int, dict[Any, list[_Entry]]] = {}
        # slot -> (prefix -> entries); prefix lengths are looked up one by one
        self._prefix: dict[int, dict[str, list[_Entry]]] = {}
        self._generic: list[_Entry] = []

    def add(self, entry: _Entry, rule: Rule) -> None:
        if _never(rule):
            return
        keys = _index_keys(rule)
        if keys is None:
            self._generic.append(entry)
            return
        table = self._exact.setdefault(keys.slot, {})
        for k in keys.exact:
            table.setdefault(k, []).append(entry)
        if keys.prefixes:
            ptable = self._prefix.setdefault(keys.slot, {})
            for p in keys.prefixes:
                ptable.setdefault(p, []).append(entry)

    def freeze(self) -> _FrozenIndex:
        prefix = tuple(
            (slot, tuple(sorted({len(p) for p in table})), table)
            for slot, table in self._prefix.items()
        )
        return _FrozenIndex(tuple(self._exact.items()), prefix, self._generic)


@dataclass(frozen=True, slots=True)
class _FrozenIndex:
    exact: tuple[tuple[int, dict[Any, list[_Entry]]], ...]
    prefix: tuple[tuple[int, tuple[int, ...], dict[str, list[_Entry]]], ...]
    generic: list[_Entry]

    def first_match(self, facts: Facts) -> _Entry | None:
        # The candidate lists are each in order, so the answer is the earliest of their
        # first matches; a list stops early once it is past the best found so far.
        best: _Entry | None = None
        for slot, table in self.exact:
            found = table.get(facts[slot])
            if found:
                best = _first(found, facts, best)
        for slot, lengths, ptable in self.prefix:
            value = facts[slot]
            if not isinstance(value, str):  # no identity
                continue
            for length in lengths:
                found = ptable.get(value[:length])
                if found:
                    best = _first(found, facts, best)
        if self.generic:
            best = _first(self.generic, facts, best)
        return best


def _short_list(keys: Sequence[str], limit: int = 5) -> str:
    if len(keys) <= limit:
        return ", ".join(keys)
    return f"{', '.join(keys[:limit])} and {len(keys) - limit} more"


@dataclass(frozen=True, slots=True)
class _Compiled:
    """Everything `evaluate` needs for one workload, built once."""

    broken: Verdict | None  # a broken enforced policy in scope: this denial
    mtls: MtlsDecision
    deny: _FrozenIndex
    allow: _FrozenIndex
    no_allow: Verdict | None  # "no ALLOW policy applies" (None when some do)
    none_matched: Verdict  # "ALLOW policies apply but none matched"
    dry_run: tuple[Policy, ...]


_ALLOW_DEFAULT = Verdict(True, None, None, None, "allowed: no ALLOW policy applies")


def _compile(policies: tuple[Policy, ...], mtls: MtlsDecision) -> _Compiled:
    broken: Verdict | None = None
    deny, allow = _RuleIndex(), _RuleIndex()
    allow_keys: list[str] = []
    dry: list[Policy] = []
    order = 0
    for p in policies:
        if not p.enforced:
            continue
        if p.dry_run:
            dry.append(p)
            continue
        if p.error is not None:
            if broken is None:
                broken = Verdict(
                    False,
                    p.key,
                    None,
                    Action.DENY,
                    f"denied: policy {p.key} is invalid, so it denies everything it applies "
                    f"to (fail closed): {p.error}",
                )
            continue
        index = allow if p.action is Action.ALLOW else deny
        if p.action is Action.ALLOW:
            allow_keys.append(p.key)
        word = "allowed" if p.action is Action.ALLOW else "denied"
        for rule, (_, pred) in zip(p.rules, p.predicates, strict=True):
            verdict = Verdict(
                p.action is Action.ALLOW,
                p.key,
                rule.index,
                p.action,
                f"{word} by {p.action.value} policy {p.key} rule {rule.index}",
            )
            index.add((order, pred, verdict), rule)
            order += 1
    none_matched = Verdict(
        False,
        None,
        None,
        None,
        f"denied: ALLOW policies apply ({_short_list(allow_keys)}) but none matched",
    )
    return _Compiled(
        broken,
        mtls,
        deny.freeze(),
        allow.freeze(),
        None if allow_keys else _ALLOW_DEFAULT,
        none_matched,
        tuple(dry),
    )


def _dry_run(policies: tuple[Policy, ...], facts: Facts) -> tuple[DryRunResult, ...]:
    out = []
    for p in policies:
        if p.error is not None:
            # A broken dry-run policy would deny everything if it were enforced.
            out.append(DryRunResult(p.key, Action.DENY, True, None))
            continue
        rule = None
        for index, pred in p.predicates:
            if pred(facts):
                rule = index
                break
        out.append(DryRunResult(p.key, p.action, rule is not None, rule))
    return tuple(out)


# -- index -----------------------------------------------------------------------------------------


_CACHE_LIMIT = 65536

# Parsed policies by entry: a config change rebuilds the index from the whole mesh config, but
# usually changes few entries, so a rebuild only parses those. Entries and policies are
# immutable values, so sharing them between snapshots is safe. Bounded: cleared when full.
_PARSED: dict[tuple[RawPolicy, str], Policy | ConfigError] = {}
_PARSED_LIMIT = 200_000


def _parse_cached(raw: RawPolicy, root_namespace: str) -> Policy:
    key = (raw, root_namespace)
    found = _PARSED.get(key)
    if found is None:
        try:
            found = parse_policy(raw, root_namespace)
        except ConfigError as exc:
            found = exc
        if len(_PARSED) >= _PARSED_LIMIT:
            _PARSED.clear()
        _PARSED[key] = found
    if isinstance(found, ConfigError):
        raise ConfigError(str(found))
    return found


def clear_parse_cache() -> None:
    """Forget memoized parses (for measuring a cold `PolicyIndex.build`)."""
    _PARSED.clear()


class PolicyIndex:
    """All policies of one mesh snapshot, indexed for per-connection checks.

    Immutable in meaning: a config change builds a new index. Lookups per workload are
    cached (keyed on the workload's uid, namespace, labels and attached policies).
    """

    def __init__(
        self,
        policies: Iterable[Policy],
        peer_authentications: Iterable[PeerAuthentication] = (),
        errors: Iterable[str] = (),
        root_namespace: str = ROOT_NAMESPACE,
    ) -> None:
        self.root_namespace = root_namespace
        self.policies: tuple[Policy, ...] = tuple(sorted(policies, key=lambda p: p.key))
        self.errors: tuple[str, ...] = tuple(errors)
        self.peer_auth = PeerAuthIndex(peer_authentications, root_namespace)
        self._by_key = {p.key: p for p in self.policies}
        self._global: list[Policy] = []
        self._namespace: dict[str, list[Policy]] = {}
        self._selector: dict[str, list[Policy]] = {}  # by the namespace they select in
        self._root_selector: list[Policy] = []
        for p in self.policies:
            root = p.namespace in (root_namespace, "")
            if p.scope is Scope.GLOBAL:
                self._global.append(p)
            elif p.scope is Scope.NAMESPACE:
                self._namespace.setdefault(p.namespace, []).append(p)
            elif p.selector:
                if root:
                    self._root_selector.append(p)
                else:
                    self._selector.setdefault(p.namespace, []).append(p)
            # A WORKLOAD_SELECTOR policy without selector applies only where attached.
        self._applicable: dict[tuple[str, str, Labels, tuple[str, ...]], tuple[Policy, ...]] = {}
        self._compiled_by_key: dict[tuple[str, str, Labels, tuple[str, ...]], _Compiled] = {}
        self._compiled_by_id: dict[int, tuple[Workload, _Compiled]] = {}
        self.warnings: tuple[str, ...] = (
            *(w for p in self.policies for w in (f"{p.key}: {x}" for x in p.warnings)),
            *self.peer_auth.warnings,
        )

    @classmethod
    def build(cls, state: MeshState, root_namespace: str = ROOT_NAMESPACE) -> PolicyIndex:
        """Parse every AuthorizationPolicy and PeerAuthentication of `state`.

        A policy that does not parse is kept as a fail-closed stand-in (it denies everything
        in its scope; a broken PeerAuthentication acts as STRICT) and listed in `errors`.
        """
        with collector_paused():
            return cls._build(state, root_namespace)

    @classmethod
    def _build(cls, state: MeshState, root_namespace: str) -> PolicyIndex:
        policies: list[Policy] = []
        peer: list[PeerAuthentication] = []
        errors: list[str] = []
        for raw in state.policies:
            if raw.kind == "PeerAuthentication":
                pa = parse_or_salvage(raw, root_namespace)
                if pa.error is not None:
                    errors.append(f"{pa.error}; it acts as STRICT until fixed")
                peer.append(pa)
                continue
            try:
                policies.append(_parse_cached(raw, root_namespace))
                continue
            except ConfigError as exc:
                message = str(exc)
            except Exception as exc:  # a parser bug must still fail closed
                message = f"AuthorizationPolicy {raw.key}: cannot be parsed: {exc!r}"
            stand_in = _salvage(raw, root_namespace, message)
            policies.append(stand_in)
            effect = (
                "it denies every connection in its scope until fixed"
                if stand_in.enforced and not stand_in.dry_run
                else "it is not enforced by the tunnel, so nothing else changes"
            )
            errors.append(f"{message}; {effect}")
        index = cls(policies, peer, errors, root_namespace)
        conflicts = [c for w in state.workloads if (c := index.peer_auth.conflict(w)) is not None]
        if conflicts:
            index.warnings = (*index.warnings, *conflicts)
        return index

    # -- scope ------------------------------------------------------------------------------------

    def applicable(self, workload: Workload) -> tuple[Policy, ...]:
        """Policies in scope for `workload`, ordered by key (including dry-run, AUDIT, ...)."""
        key = _workload_key(workload)
        found = self._applicable.get(key)
        if found is None:
            found = self._find_applicable(workload)
            if len(self._applicable) >= _CACHE_LIMIT:
                self._applicable.clear()
            self._applicable[key] = found
        return found

    def _find_applicable(self, workload: Workload) -> tuple[Policy, ...]:
        labels = dict(workload.labels)
        out: dict[str, Policy] = {p.key: p for p in self._global}
        for p in self._namespace.get(workload.namespace, ()):
            out[p.key] = p
        for p in chain(self._selector.get(workload.namespace, ()), self._root_selector):
            if selects(p.selector, labels):
                out[p.key] = p
        for attached in workload.authorization_policies:
            found = self._by_key.get(attached)
            if found is not None:
                out[found.key] = found
        return tuple(out[k] for k in sorted(out))

    def mtls_mode(self, workload: Workload, port: int) -> MtlsMode:
        """The effective PeerAuthentication mode for `port` of `workload` (never UNSET)."""
        return self.peer_auth.resolve(workload).for_port(port)[0]

    def peer_authentications_json(self) -> list[dict[str, Any]]:
        return self.peer_auth.to_json()

    def to_json(self) -> dict[str, Any]:
        return {
            "rootNamespace": self.root_namespace,
            "policies": [p.to_json() for p in self.policies],
            "peerAuthentications": self.peer_authentications_json(),
            "errors": list(self.errors),
            "warnings": list(self.warnings),
        }

    # -- evaluation ------------------------------------------------------------------------------

    def _compiled(self, workload: Workload) -> _Compiled:
        # Fast path: the same Workload object as last time (the tunnel passes the ones of
        # its MeshState snapshot); the stored reference keeps the id from being reused.
        hit = self._compiled_by_id.get(id(workload))
        if hit is not None and hit[0] is workload:
            return hit[1]
        key = _workload_key(workload)
        compiled = self._compiled_by_key.get(key)
        if compiled is None:
            compiled = _compile(self.applicable(workload), self.peer_auth.resolve(workload))
            if len(self._compiled_by_key) >= _CACHE_LIMIT:
                self._compiled_by_key.clear()
            self._compiled_by_key[key] = compiled
        if len(self._compiled_by_id) >= _CACHE_LIMIT:
            self._compiled_by_id.clear()
        self._compiled_by_id[id(workload)] = (workload, compiled)
        return compiled

    def evaluate(self, workload: Workload, req: Request) -> Verdict:
        """Decide one inbound connection to `workload`; dry-run policies are reported."""
        c = self._compiled(workload)
        facts = _facts(req)
        verdict = self._decide(c, facts, req)
        if c.dry_run:
            return Verdict(
                verdict.allowed,
                verdict.policy,
                verdict.rule,
                verdict.action,
                verdict.reason,
                _dry_run(c.dry_run, facts),
            )
        return verdict

    @staticmethod
    def _decide(c: _Compiled, facts: Facts, req: Request) -> Verdict:
        if c.broken is not None:
            return c.broken
        if facts[_F_PRINCIPAL] is None:
            mode, pa_key = c.mtls.for_port(req.dst_port)
            if mode is MtlsMode.STRICT:
                return Verdict(
                    False,
                    pa_key,
                    None,
                    Action.DENY,
                    f"denied: PeerAuthentication {pa_key} requires mTLS (STRICT) on port "
                    f"{req.dst_port} and the connection is plaintext",
                )
        hit = c.deny.first_match(facts)
        if hit is not None:
            return hit[2]
        if c.no_allow is not None:
            return c.no_allow
        hit = c.allow.first_match(facts)
        if hit is not None:
            return hit[2]
        return c.none_matched


def _workload_key(w: Workload) -> tuple[str, str, Labels, tuple[str, ...]]:
    return (w.uid, w.namespace, w.labels, w.authorization_policies)
