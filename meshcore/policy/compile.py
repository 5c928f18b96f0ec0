"""Compiled matching: policies turned into closures and rule indexes for the data path.

The request is reduced once to a tuple of facts; each rule is compiled into a closure over
frozensets and tuples, so a check is a handful of set lookups and str.startswith calls. A
workload's policies compile into a `Compiled` (deny and allow rule indexes, the verdicts
they answer with, the dry-run policies), built once per workload and reused for every
connection. Equivalent to `Match.matches` / `Rule.matches` (the reference semantics).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final

from meshcore.policy.model import (
    MATCH_FIELDS,
    Action,
    Facts,
    IPNetwork,
    Match,
    MatchKind,
    Policy,
    Predicate,
    Request,
    Rule,
    StringMatch,
    canonical_ip,
)
from meshcore.policy.peerauth import MtlsDecision, MtlsMode
from meshcore.policy.verdict import DryRunResult, Verdict

# Positions in Facts (Final, so that indexing the tuple keeps each position's type).
_F_PRINCIPAL: Final = 0
_F_NS: Final = 1
_F_SA: Final = 2
_F_SRC_V: Final = 3
_F_SRC: Final = 4
_F_DST_V: Final = 5
_F_DST: Final = 6
_F_PORT: Final = 7


def facts_of(req: Request) -> Facts:
    ident = req.src_identity
    src = canonical_ip(req.src_ip)
    dst = canonical_ip(req.dst_ip)
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
    (name, name.removeprefix("not_"), name.startswith("not_")) for name in MATCH_FIELDS
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
class Compiled:
    """Everything the decision for one workload needs, built once. The verdicts are made
    here, with the workload's default mTLS mode, and shared by every connection they
    decide: the data path allocates nothing to answer."""

    broken: Verdict | None  # a broken enforced policy in scope: this denial
    mtls: MtlsDecision
    deny: _FrozenIndex
    allow: _FrozenIndex
    no_allow: Verdict | None  # "no ALLOW policy applies" (None when some do)
    none_matched: Verdict  # "ALLOW policies apply but none matched"
    dry_run: tuple[Policy, ...]

    def decide(self, req: Request) -> Verdict:
        """Istio's order: PeerAuthentication (STRICT refuses plaintext), a broken policy in
        scope (fail closed), any matching DENY, no ALLOW policy (allow), a matching ALLOW,
        otherwise deny. Dry-run policies are reported, never enforced."""
        facts = facts_of(req)
        mode, pa_key = self.mtls.for_port(req.dst_port)
        verdict = self._decide(facts, req.dst_port, mode, pa_key)
        if verdict.mtls is not mode:  # a port-level PeerAuthentication mode
            verdict = replace(verdict, mtls=mode)
        if self.dry_run:
            verdict = replace(verdict, dry_run=_dry_run(self.dry_run, facts))
        return verdict

    def _decide(self, facts: Facts, port: int, mode: MtlsMode, pa_key: str | None) -> Verdict:
        if facts[_F_PRINCIPAL] is None and mode is MtlsMode.STRICT:
            return Verdict(
                False,
                pa_key,
                None,
                Action.DENY,
                f"denied: PeerAuthentication {pa_key} requires mTLS (STRICT) on port "
                f"{port} and the connection is plaintext",
                mode,
            )
        if self.broken is not None:
            return self.broken
        hit = self.deny.first_match(facts)
        if hit is not None:
            return hit[2]
        if self.no_allow is not None:
            return self.no_allow
        hit = self.allow.first_match(facts)
        if hit is not None:
            return hit[2]
        return self.none_matched


def compile_policies(policies: tuple[Policy, ...], mtls: MtlsDecision) -> Compiled:
    """The decision for a workload with these policies in scope and this mTLS decision."""
    mode = mtls.mode
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
                    mode,
                )
            continue
        index = allow if p.action is Action.ALLOW else deny
        if p.action is Action.ALLOW:
            allow_keys.append(p.key)
        word = "allowed" if p.action is Action.ALLOW else "denied"
        for rule, (_, pred) in zip(p.rules, predicates(p), strict=True):
            verdict = Verdict(
                p.action is Action.ALLOW,
                p.key,
                rule.index,
                p.action,
                f"{word} by {p.action.value} policy {p.key} rule {rule.index}",
                mode,
            )
            index.add((order, pred, verdict), rule)
            order += 1
    none_matched = Verdict(
        False,
        None,
        None,
        None,
        f"denied: ALLOW policies apply ({_short_list(allow_keys)}) but none matched",
        mode,
    )
    no_allow = None if allow_keys else replace(_ALLOW_DEFAULT, mtls=mode)
    return Compiled(broken, mtls, deny.freeze(), allow.freeze(), no_allow, none_matched, tuple(dry))


_ALLOW_DEFAULT = Verdict(True, None, None, None, "allowed: no ALLOW policy applies")


def _dry_run(policies: tuple[Policy, ...], facts: Facts) -> tuple[DryRunResult, ...]:
    out = []
    for p in policies:
        if p.error is not None:
            # A broken dry-run policy would deny everything if it were enforced.
            out.append(DryRunResult(p.key, Action.DENY, True, None))
            continue
        rule = None
        for index, pred in predicates(p):
            if pred(facts):
                rule = index
                break
        out.append(DryRunResult(p.key, p.action, rule is not None, rule))
    return tuple(out)


def predicates(policy: Policy) -> tuple[tuple[int, Predicate], ...]:
    """(rule index, compiled rule) pairs of `policy`, in rule order; compiled on first use
    and kept on the (immutable) policy."""
    found = policy._predicates
    if found is None:
        found = tuple((r.index, _compile_rule(r)) for r in policy.rules)
        object.__setattr__(policy, "_predicates", found)
    return found


def matching_rule(policy: Policy, req: Request) -> int | None:
    """Index of the first rule of `policy` that matches `req`, or None."""
    facts = facts_of(req)
    for index, pred in predicates(policy):
        if pred(facts):
            return index
    return None
