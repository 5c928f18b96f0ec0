"""L4 authorization: parsing, scope, matching and evaluation order (meshcore.policy.rbac)."""

from __future__ import annotations

import base64
import gc
import json
from dataclasses import replace
from ipaddress import ip_address, ip_network
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshcore.defaults import ROOT_NAMESPACE
from meshcore.identity.spiffe import SpiffeId
from meshcore.policy.compile import matching_rule
from meshcore.policy.index import PolicyIndex
from meshcore.policy.model import (
    Action,
    Match,
    MatchKind,
    Policy,
    Request,
    Rule,
    Scope,
    ServiceAccountMatch,
    StringMatch,
)
from meshcore.policy.parse import parse_policy
from meshcore.policy.peerauth import MtlsMode
from meshcore.policy.verdict import DryRunResult
from meshcore.state import MeshConfigError, MeshState, RawPolicy, Workload
from tests.support.mesh import authorization_policy, ips
from tests.support.mesh import workload as base_workload

ROOT = ROOT_NAMESPACE
NS = "app"  # the namespace of the workload under test

CLIENT = SpiffeId("cluster.local", "client-ns", "client-sa")
OTHER = SpiffeId("td2", "other", "x")

# Requests used by the field table: mTLS from CLIENT, plaintext, and mTLS from OTHER.
TLS = Request(ip_address("10.0.0.5"), CLIENT, ip_address("10.1.0.1"), 8080)
PLAIN = Request(ip_address("10.0.0.5"), None, ip_address("10.1.0.1"), 8080)
ALT = Request(ip_address("192.168.7.9"), OTHER, ip_address("10.1.0.2"), 9090)
V6 = Request(ip_address("fd00::5"), CLIENT, ip_address("fd01::1"), 8080)
MAPPED = Request(ip_address("::ffff:10.0.0.5"), CLIENT, ip_address("::ffff:10.1.0.1"), 8080)


def workload(
    ns: str = NS,
    labels: dict[str, str] | None = None,
    attached: tuple[str, ...] = (),
    uid: str | None = None,
    ip: str = "10.1.0.1",
) -> Workload:
    return base_workload(
        uid=uid or f"{ns}/pod-{len(labels or {})}-{len(attached)}",
        name="pod",
        namespace=ns,
        service_account="server",
        ips=ips(ip),
        canonical_name="server",
        canonical_revision="v1",
        workload_name="server",
        cluster_id="c1",
        labels=tuple(sorted((labels or {}).items())),
        authorization_policies=attached,
    )


def istio(
    name: str,
    spec: Any,
    ns: str = NS,
    annotations: dict[str, Any] | None = None,
) -> RawPolicy:
    """An AuthorizationPolicy as users write it."""
    return authorization_policy(name, spec, ns, annotations)


def flat(name: str, ns: str = NS, **body: Any) -> RawPolicy:
    """A flat (or xDS-style) entry: name and namespace at the top."""
    return RawPolicy.from_mapping(name, ns, {"name": name, "namespace": ns, **body})


def build(*raws: RawPolicy, workloads: tuple[Workload, ...] = ()) -> PolicyIndex:
    return PolicyIndex.build(MeshState.build(workloads, (), raws), ROOT)


def allow_one(rule: dict[str, Any], ns: str = NS) -> Policy:
    return parse_policy(istio("p", {"action": "ALLOW", "rules": [rule]}, ns), ROOT)


# -- fields: every field, its `not` form and each match form ---------------------------------------

T, F = True, False
CLIENT_P = "cluster.local/ns/client-ns/sa/client-sa"


def src(*more: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """A rule with one `from` entry per mapping (keyword fields form the first)."""
    return {"from": [{"source": f} for f in ((fields,) if fields else ()) + more]}


def op(*more: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """A rule with one `to` entry per mapping (keyword fields form the first)."""
    return {"to": [{"operation": f} for f in ((fields,) if fields else ()) + more]}


def when(key: str, values: list[str] | None = None, **not_values: list[str]) -> dict[str, Any]:
    cond: dict[str, Any] = {"key": key}
    if values is not None:
        cond["values"] = values
    cond.update(not_values)  # notValues=[...]
    return {"when": [cond]}


# (id, rule, matches (TLS, PLAIN, ALT))
FIELD_TABLE: list[tuple[str, dict[str, Any], tuple[bool, bool, bool]]] = [
    # principals, the four string forms
    ("principal exact", src(principals=[CLIENT_P]), (T, F, F)),
    ("principal prefix", src(principals=["cluster.local/ns/client-ns/*"]), (T, F, F)),
    ("principal suffix", src(principals=["*/sa/client-sa"]), (T, F, F)),
    ("principal presence", src(principals=["*"]), (T, F, T)),
    ("principal values OR", src(principals=["nope", "td2/ns/other/sa/x"]), (F, F, T)),
    ("principal other trust domain", src(principals=["td2/ns/client-ns/sa/client-sa"]), (F, F, F)),
    ("principal with spiffe://", src(principals=["spiffe://" + CLIENT_P]), (F, F, F)),
    ("notPrincipals exact", src(notPrincipals=[CLIENT_P]), (F, T, T)),
    ("notPrincipals prefix", src(notPrincipals=["cluster.local/*"]), (F, T, T)),
    ("notPrincipals suffix", src(notPrincipals=["*/sa/x"]), (T, T, F)),
    # `notPrincipals: ["*"]` is how "plaintext only" is written: it holds for no identity.
    ("notPrincipals presence", src(notPrincipals=["*"]), (F, T, F)),
    # namespaces
    ("namespace exact", src(namespaces=["client-ns"]), (T, F, F)),
    ("namespace prefix", src(namespaces=["client-*"]), (T, F, F)),
    ("namespace suffix", src(namespaces=["*-ns"]), (T, F, F)),
    ("namespace presence", src(namespaces=["*"]), (T, F, T)),
    ("namespace mismatch", src(namespaces=["client"]), (F, F, F)),
    ("notNamespaces exact", src(notNamespaces=["client-ns"]), (F, T, T)),
    ("notNamespaces prefix", src(notNamespaces=["oth*"]), (T, T, F)),
    ("notNamespaces suffix", src(notNamespaces=["*ns"]), (F, T, T)),
    ("notNamespaces presence", src(notNamespaces=["*"]), (F, T, F)),
    # service accounts: "ns/sa", or a bare name in the policy's namespace
    ("serviceAccount ns/sa", src(serviceAccounts=["client-ns/client-sa"]), (T, F, F)),
    ("serviceAccount ignores trust domain", src(serviceAccounts=["other/x"]), (F, F, T)),
    ("serviceAccount bare name, policy namespace", src(serviceAccounts=["client-sa"]), (F, F, F)),
    ("notServiceAccounts", src(notServiceAccounts=["client-ns/client-sa"]), (F, T, T)),
    # ipBlocks: single IPs and CIDRs
    ("ipBlocks single IP", src(ipBlocks=["10.0.0.5"]), (T, T, F)),
    ("ipBlocks CIDR", src(ipBlocks=["10.0.0.0/24"]), (T, T, F)),
    ("ipBlocks CIDR with host bits", src(ipBlocks=["10.0.0.77/16"]), (T, T, F)),
    ("ipBlocks other CIDRs", src(ipBlocks=["10.0.1.0/24", "192.168.0.0/16"]), (F, F, T)),
    ("ipBlocks 0.0.0.0/0", src(ipBlocks=["0.0.0.0/0"]), (T, T, T)),
    ("notIpBlocks single IP", src(notIpBlocks=["10.0.0.5"]), (F, F, T)),
    ("notIpBlocks CIDR", src(notIpBlocks=["192.168.0.0/16"]), (T, T, F)),
    # ports
    ("ports", op(ports=["8080"]), (T, T, F)),
    ("ports OR", op(ports=["80", "9090"]), (F, F, T)),
    ("notPorts", op(notPorts=["8080"]), (F, F, T)),
    ("ports and notPorts", op(ports=["8080", "9090"], notPorts=["9090"]), (T, T, F)),
    # when: each L4 key with values and notValues
    ("source.ip values", when("source.ip", ["10.0.0.0/8"]), (T, T, F)),
    ("source.ip notValues", when("source.ip", notValues=["10.0.0.5"]), (F, F, T)),
    ("source.namespace values", when("source.namespace", ["other"]), (F, F, T)),
    ("source.namespace notValues", when("source.namespace", notValues=["other"]), (T, T, F)),
    ("source.principal values", when("source.principal", ["*/sa/client-sa"]), (T, F, F)),
    ("source.principal notValues", when("source.principal", notValues=["*"]), (F, T, F)),
    ("destination.ip values", when("destination.ip", ["10.1.0.2"]), (F, F, T)),
    ("destination.ip notValues", when("destination.ip", notValues=["10.1.0.0/31"]), (F, F, T)),
    ("destination.port values", when("destination.port", ["8080"]), (T, T, F)),
    ("destination.port notValues", when("destination.port", notValues=["8080"]), (F, F, T)),
    (
        "values and notValues",
        when("source.ip", ["0.0.0.0/0"], notValues=["192.168.7.9"]),
        (T, T, F),
    ),
    # combinations: fields AND, entries OR, clauses AND, conditions AND
    ("fields AND", src(namespaces=["client-ns"], ipBlocks=["192.168.0.0/16"]), (F, F, F)),
    ("sources OR", src({"namespaces": ["client-ns"]}, {"ipBlocks": ["192.168.0.0/16"]}), (T, F, T)),
    ("from AND to", {**src(ipBlocks=["10.0.0.0/8"]), **op(ports=["9090"])}, (F, F, F)),
    ("operations OR", op({"ports": ["1"]}, {"ports": ["9090"]}), (F, F, T)),
    (
        "when conditions AND",
        {
            "when": [
                {"key": "destination.port", "values": ["8080", "9090"]},
                {"key": "source.namespace", "values": ["client-ns"]},
            ]
        },
        (T, F, F),
    ),
    ("empty rule matches all", {}, (T, T, T)),
]

REQUESTS = {"tls": TLS, "plain": PLAIN, "alt": ALT}


@pytest.mark.parametrize(
    ("rule", "expected"), [pytest.param(r, e, id=i) for i, r, e in FIELD_TABLE]
)
@pytest.mark.parametrize("request_name", ["tls", "plain", "alt"])
def test_field_matching(rule: dict[str, Any], expected: tuple[bool, bool, bool], request_name: str):
    want = dict(zip(REQUESTS, expected, strict=True))[request_name]
    req = REQUESTS[request_name]
    # As an ALLOW policy: allowed exactly when the rule matches.
    allow = build(istio("p", {"action": "ALLOW", "rules": [rule]}))
    verdict = allow.evaluate(workload(), req)
    assert verdict.allowed is want
    assert (verdict.policy, verdict.rule) == (("app/p", 0) if want else (None, None))
    # As a DENY policy: denied exactly when the rule matches.
    deny = build(istio("p", {"action": "DENY", "rules": [rule]}))
    assert deny.evaluate(workload(), req).allowed is not want
    # The reference (unindexed) matcher agrees.
    (policy,) = deny.policies
    assert policy.rules[0].matches(req) is want
    assert matching_rule(policy, req) == (0 if want else None)


def test_bare_service_account_uses_the_policy_namespace():
    policy = allow_one({"from": [{"source": {"serviceAccounts": ["client-sa"]}}]}, ns="client-ns")
    assert policy.rules[0].clauses == (
        (Match(service_accounts=(ServiceAccountMatch("client-ns", "client-sa"),)),),
    )
    assert matching_rule(policy, TLS) == 0


@pytest.mark.parametrize(
    ("blocks", "req", "expected"),
    [
        (["fd00::5"], V6, True),
        (["fd00::/64"], V6, True),
        (["fd00:0:0:1::/64"], V6, False),
        (["10.0.0.0/8"], V6, False),  # an IPv4 block never matches an IPv6 peer
        (["::/0"], TLS, False),  # and the other way round
        (["10.0.0.5"], MAPPED, True),  # ::ffff:10.0.0.5 is the IPv4 peer 10.0.0.5
        (["10.0.0.0/24"], MAPPED, True),
    ],
)
def test_ip_blocks_v6_and_mapped(blocks: list[str], req: Request, expected: bool):
    policy = allow_one({"from": [{"source": {"ipBlocks": blocks}}]})
    assert (matching_rule(policy, req) == 0) is expected
    assert policy.rules[0].matches(req) is expected


def test_destination_ip_v6():
    policy = allow_one({"when": [{"key": "destination.ip", "values": ["fd01::/16"]}]})
    assert matching_rule(policy, V6) == 0
    assert matching_rule(policy, TLS) is None


def test_ports_may_be_numbers():
    policy = allow_one({"to": [{"operation": {"ports": [8080]}}]})
    assert policy.rules[0].clauses == ((Match(destination_ports=(8080,)),),)


# -- string matchers -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind", "value"),
    [
        ("*", MatchKind.PRESENCE, ""),
        ("abc*", MatchKind.PREFIX, "abc"),
        ("*abc", MatchKind.SUFFIX, "abc"),
        ("abc", MatchKind.EXACT, "abc"),
        ("a*c", MatchKind.EXACT, "a*c"),  # a star inside is literal
        ("**", MatchKind.SUFFIX, "*"),  # istiod reads a leading star first
    ],
)
def test_istio_notation(text: str, kind: MatchKind, value: str):
    assert StringMatch.istio(text) == StringMatch(kind, value)


TEXT = st.text(alphabet="ab*/.-", max_size=8)


@given(value=TEXT, candidate=TEXT)
def test_string_match_forms_agree_with_str(value: str, candidate: str):
    assert StringMatch(MatchKind.EXACT, value).matches(candidate) == (candidate == value)
    assert StringMatch(MatchKind.PREFIX, value).matches(candidate) == candidate.startswith(value)
    assert StringMatch(MatchKind.SUFFIX, value).matches(candidate) == candidate.endswith(value)
    assert StringMatch(MatchKind.PRESENCE).matches(candidate) == bool(candidate)


@given(pattern=TEXT.filter(bool), ns=st.text(alphabet="ab*-", min_size=1, max_size=8))
def test_compiled_namespace_matcher_agrees_with_istio_notation(pattern: str, ns: str):
    # The compiled (indexed) path and the reference StringMatch agree for any pattern.
    policy = allow_one({"from": [{"source": {"namespaces": [pattern]}}]})
    req = Request(TLS.src_ip, SpiffeId("td", ns, "sa"), TLS.dst_ip, 80)
    expected = StringMatch.istio(pattern).matches(ns)
    assert (matching_rule(policy, req) == 0) is expected
    assert (
        build(istio("p", {"rules": [policy_rule(pattern)]})).evaluate(workload(), req).allowed
    ) is expected


def policy_rule(ns_pattern: str) -> dict[str, Any]:
    return {"from": [{"source": {"namespaces": [ns_pattern]}}]}


# -- scope -----------------------------------------------------------------------------------------

DENY_ALL = {"action": "DENY", "rules": [{}]}


def deny_web(ns: str = NS, **extra_labels: str) -> RawPolicy:
    """DENY all, for workloads labelled app=web (and `extra_labels`)."""
    labels = {"app": "web", **extra_labels}
    return istio("p", {**DENY_ALL, "selector": {"matchLabels": labels}}, ns=ns)


def deny_xds(scope: str, ns: str = NS) -> RawPolicy:
    """DENY all in the xDS form, with an explicit scope."""
    return flat("p", ns=ns, scope=scope, action="DENY", groups=[{}])


@pytest.mark.parametrize(
    ("raw", "wl", "applies"),
    [
        # namespace scope: the policy's namespace only
        (istio("p", DENY_ALL, ns=NS), workload(), True),
        (istio("p", DENY_ALL, ns="elsewhere"), workload(), False),
        # selector by labels, in the workload's namespace
        (deny_web(), workload(labels={"app": "web", "v": "1"}), True),
        (deny_web(v="2"), workload(labels={"app": "web", "v": "1"}), False),
        (deny_web(), workload(labels={}), False),
        (deny_web(ns="elsewhere"), workload(labels={"app": "web"}), False),
        # selector via the key the control plane attached
        (deny_web(ns="elsewhere"), workload(attached=("elsewhere/p",)), True),
        (deny_web(), workload(attached=("app/other",)), False),
        # root namespace: without selector global, with selector across namespaces
        (istio("p", DENY_ALL, ns=ROOT), workload(ns="anything"), True),
        (deny_web(ns=ROOT), workload(ns="anything", labels={"app": "web"}), True),
        (deny_web(ns=ROOT), workload(ns="anything", labels={"app": "db"}), False),
        # an empty selector selects the whole namespace
        (istio("p", {**DENY_ALL, "selector": {"matchLabels": {}}}), workload(), True),
        # a flat entry without namespace is mesh-wide
        (flat("p", ns="", action="DENY", rules=[{}]), workload(ns="anything"), True),
        # xDS form: explicit scope
        (deny_xds("GLOBAL"), workload(ns="anything"), True),
        (deny_xds("NAMESPACE"), workload(ns="anything"), False),
        (deny_xds("NAMESPACE"), workload(), True),
        (deny_xds("NAMESPACE", ns=ROOT), workload(), False),
        (deny_xds("WORKLOAD_SELECTOR"), workload(), False),
        (deny_xds("WORKLOAD_SELECTOR"), workload(attached=("app/p",)), True),
    ],
)
def test_scope(raw: RawPolicy, wl: Workload, applies: bool):
    index = build(raw)
    assert [p.key for p in index.applicable(wl)] == ([raw.key] if applies else [])
    assert index.evaluate(wl, TLS).allowed is not applies


@pytest.mark.parametrize(
    ("raw", "scope"),
    [
        (istio("p", {}), Scope.NAMESPACE),
        (istio("p", {}, ns=ROOT), Scope.GLOBAL),
        (istio("p", {"selector": {"matchLabels": {"a": "b"}}}), Scope.WORKLOAD_SELECTOR),
        (istio("p", {"selector": {"matchLabels": {"a": "b"}}}, ns=ROOT), Scope.WORKLOAD_SELECTOR),
        (flat("p", scope="Global"), Scope.GLOBAL),  # ztunnel's spelling
        (flat("p", scope="WorkloadSelector"), Scope.WORKLOAD_SELECTOR),
    ],
)
def test_scope_is_derived_from_selector_and_namespace(raw: RawPolicy, scope: Scope):
    assert parse_policy(raw, ROOT).scope is scope


def test_applicable_is_ordered_by_key_and_cached():
    raws = [istio(n, DENY_ALL) for n in ("zeta", "alpha", "mid")]
    raws.append(istio("glob", DENY_ALL, ns=ROOT))
    index = build(*raws)
    first = index.applicable(workload())
    assert [p.key for p in first] == ["app/alpha", "app/mid", "app/zeta", f"{ROOT}/glob"]
    # An equal workload value (a fresh object) gets the same answer.
    assert index.applicable(workload()) is first


def test_root_namespace_is_configurable():
    raw = istio("p", DENY_ALL, ns="mesh-root")
    index = PolicyIndex.build(MeshState.build((), (), (raw,)), "mesh-root")
    assert index.policies[0].scope is Scope.GLOBAL
    assert not index.evaluate(workload(ns="x"), TLS).allowed


# -- evaluation order ------------------------------------------------------------------------------

ALLOW_CLIENT = {"rules": [{"from": [{"source": {"namespaces": ["client-ns"]}}]}]}
DENY_CLIENT = {"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["client-ns"]}}]}]}


def test_no_policy_allows():
    verdict = build().evaluate(workload(), TLS)
    assert verdict.allowed
    assert (verdict.policy, verdict.rule, verdict.action) == (None, None, None)
    assert verdict.reason == "allowed: no ALLOW policy applies"


def test_deny_beats_allow():
    index = build(istio("allow", ALLOW_CLIENT), istio("deny", DENY_CLIENT))
    verdict = index.evaluate(workload(), TLS)
    assert not verdict.allowed
    assert (verdict.policy, verdict.rule, verdict.action) == ("app/deny", 0, Action.DENY)
    assert verdict.reason == "denied by DENY policy app/deny rule 0"


def test_no_allow_policy_allows_what_no_deny_matches():
    index = build(istio("deny", DENY_CLIENT))
    verdict = index.evaluate(workload(), ALT)
    assert verdict.allowed
    assert verdict.reason == "allowed: no ALLOW policy applies"


def test_matching_allow_allows():
    verdict = build(istio("allow", ALLOW_CLIENT)).evaluate(workload(), TLS)
    assert verdict.allowed
    assert (verdict.policy, verdict.rule, verdict.action) == ("app/allow", 0, Action.ALLOW)
    assert verdict.reason == "allowed by ALLOW policy app/allow rule 0"


def test_allow_policies_but_none_matched_denies():
    index = build(istio("b", ALLOW_CLIENT), istio("a", ALLOW_CLIENT))
    verdict = index.evaluate(workload(), ALT)
    assert not verdict.allowed
    assert (verdict.policy, verdict.rule, verdict.action) == (None, None, None)
    assert verdict.reason == "denied: ALLOW policies apply (app/a, app/b) but none matched"


def test_reason_lists_at_most_five_allow_policies():
    index = build(*(istio(f"p{i}", ALLOW_CLIENT) for i in range(8)))
    assert index.evaluate(workload(), ALT).reason == (
        "denied: ALLOW policies apply (app/p0, app/p1, app/p2, app/p3, app/p4 and 3 more) "
        "but none matched"
    )


def test_first_matching_rule_is_reported():
    spec = {"rules": [{"to": [{"operation": {"ports": ["1"]}}]}, {}, {}]}
    verdict = build(istio("p", spec)).evaluate(workload(), TLS)
    assert verdict.rule == 1


def test_rules_or():
    spec = {
        "rules": [
            {"from": [{"source": {"namespaces": ["other"]}}]},
            {"from": [{"source": {"namespaces": ["client-ns"]}}]},
        ]
    }
    index = build(istio("p", spec))
    assert index.evaluate(workload(), TLS).rule == 1
    assert index.evaluate(workload(), ALT).rule == 0
    assert not index.evaluate(workload(), PLAIN).allowed


def test_global_and_namespace_allow_policies_combine():
    index = build(
        istio("ns", ALLOW_CLIENT),
        istio("mesh", {"rules": [{"to": [{"operation": {"ports": ["9090"]}}]}]}, ns=ROOT),
    )
    assert index.evaluate(workload(), TLS).policy == "app/ns"
    assert index.evaluate(workload(), ALT).policy == f"{ROOT}/mesh"
    # Another namespace only has the mesh-wide policy.
    assert not index.evaluate(workload(ns="b"), TLS).allowed


# -- empty rules -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "allowed", "warning"),
    [
        ({}, False, None),  # ALLOW nothing: deny all in scope
        ({"action": "ALLOW"}, False, None),
        ({"rules": []}, False, None),
        ({"rules": [{}]}, True, None),  # one rule without clauses: allow all
        ({"action": "DENY"}, True, "a DENY policy without rules denies nothing"),
        ({"action": "DENY", "rules": [{}]}, False, None),
    ],
)
def test_empty_rules_and_empty_rule(spec: dict[str, Any], allowed: bool, warning: str | None):
    index = build(istio("p", spec))
    for req in (TLS, PLAIN, ALT):
        assert index.evaluate(workload(), req).allowed is allowed
    warnings = index.policies[0].warnings
    if warning is None:
        assert warnings == ()
    else:
        assert any(warning in w for w in warnings)


# -- L7 fields -------------------------------------------------------------------------------------

L7_ALLOW_CASES = [
    ("methods", {"to": [{"operation": {"methods": ["GET"]}}]}),
    ("paths", {"to": [{"operation": {"ports": ["8080"], "paths": ["/x"]}}]}),
    ("hosts", {"to": [{"operation": {"hosts": ["a.example"]}}]}),
    ("notMethods", {"to": [{"operation": {"notMethods": ["POST"]}}]}),
    ("notPaths", {"to": [{"operation": {"notPaths": ["/admin"]}}]}),
    ("notHosts", {"to": [{"operation": {"notHosts": ["b.example"]}}]}),
    ("requestPrincipals", {"from": [{"source": {"requestPrincipals": ["iss/sub"]}}]}),
    ("notRequestPrincipals", {"from": [{"source": {"notRequestPrincipals": ["*"]}}]}),
    ("remoteIpBlocks", {"from": [{"source": {"remoteIpBlocks": ["10.0.0.0/8"]}}]}),
    ("notRemoteIpBlocks", {"from": [{"source": {"notRemoteIpBlocks": ["1.2.3.4"]}}]}),
    ("request.headers[x-user]", {"when": [{"key": "request.headers[x-user]", "values": ["a"]}]}),
    ("request.auth.claims[iss]", {"when": [{"key": "request.auth.claims[iss]", "values": ["i"]}]}),
    ("connection.sni", {"when": [{"key": "connection.sni", "values": ["a"]}]}),
    ("no.such.key", {"when": [{"key": "no.such.key", "values": ["a"]}]}),
]


@pytest.mark.parametrize(("field", "rule"), L7_ALLOW_CASES, ids=[c[0] for c in L7_ALLOW_CASES])
def test_l7_rule_is_dropped_from_allow(field: str, rule: dict[str, Any]):
    # The L7 rule would match everything at L4; dropped, the ALLOW policy matches nothing.
    index = build(istio("p", {"rules": [rule, {"to": [{"operation": {"ports": ["9090"]}}]}]}))
    (policy,) = index.policies
    assert [r.index for r in policy.rules] == [1]
    assert policy.warnings == (
        f"rule 0 uses L7 field `{field}`; dropped from this ALLOW policy (matches nothing; "
        "a waypoint can enforce HTTP rules)",
    )
    assert not index.evaluate(workload(), TLS).allowed
    assert index.evaluate(workload(), ALT).rule == 1


def test_allow_with_only_l7_rules_denies_all_and_says_so():
    index = build(istio("p", {"rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}))
    (policy,) = index.policies
    assert policy.rules == ()
    assert "no rule is left at L4" in policy.warnings[-1]
    assert not index.evaluate(workload(), TLS).allowed


def test_l7_in_deny_keeps_the_l4_part():
    spec = {
        "action": "DENY",
        "rules": [
            {
                "from": [{"source": {"namespaces": ["client-ns"], "requestPrincipals": ["*"]}}],
                "to": [{"operation": {"ports": ["8080"], "methods": ["POST"]}}],
                "when": [{"key": "request.auth.claims[group]", "values": ["admin"]}],
            }
        ],
    }
    index = build(istio("p", spec))
    (policy,) = index.policies
    assert policy.warnings == (
        "rule 0 uses L7 fields `requestPrincipals`, `methods`, `request.auth.claims[group]`; "
        "ignored in this DENY policy, so only its L4 part is enforced (stricter than requested)",
    )
    assert policy.rules[0].clauses == (
        (Match(namespaces=(StringMatch(MatchKind.EXACT, "client-ns"),)),),
        (Match(destination_ports=(8080,)),),
    )
    assert not index.evaluate(workload(), TLS).allowed  # client-ns on 8080: denied
    assert index.evaluate(workload(), ALT).allowed


@pytest.mark.parametrize(
    "rule",
    [
        {"to": [{"operation": {"methods": ["GET"]}}]},
        {"from": [{"source": {"requestPrincipals": ["*"]}}]},
        {"when": [{"key": "request.headers[x]", "values": ["1"]}]},
    ],
)
def test_deny_with_only_l7_denies_everything_in_scope(rule: dict[str, Any]):
    # Stricter than ztunnel today (istio/istio#61126), as sidecars and istiod's docs have it.
    index = build(istio("p", {"action": "DENY", "rules": [rule]}))
    (policy,) = index.policies
    assert policy.rules == (Rule((), 0),)
    assert "it now denies every connection in its scope" in policy.warnings[0]
    for req in (TLS, PLAIN, ALT):
        assert not index.evaluate(workload(), req).allowed


def test_l7_only_source_entry_in_deny_matches_any_source():
    # One source entry is L7-only: at L4 it matches anyone, so the from clause does too.
    rule = {
        "from": [{"source": {"namespaces": ["x"]}}, {"source": {"requestPrincipals": ["*"]}}],
        "to": [{"operation": {"ports": ["9090"]}}],
    }
    index = build(istio("p", {"action": "DENY", "rules": [rule]}))
    assert index.evaluate(workload(), TLS).allowed  # port 8080
    assert not index.evaluate(workload(), ALT).allowed  # port 9090, any source


def test_spiffe_prefixed_principal_warns():
    policy = allow_one({"from": [{"source": {"principals": ["spiffe://td/ns/a/sa/b"]}}]})
    assert policy.warnings == (
        "spec.rules[0].from[0].source.principals: 'spiffe://td/ns/a/sa/b' starts with "
        "spiffe://; principals are written without it, so this value never matches",
    )


# -- dry run, AUDIT, CUSTOM, waypoint policies -----------------------------------------------------


def test_dry_run_deny_is_reported_not_enforced():
    raw = istio("dry", DENY_CLIENT, annotations={"istio.io/dry-run": "true"})
    index = build(raw)
    assert index.policies[0].dry_run
    verdict = index.evaluate(workload(), TLS)
    assert verdict.allowed
    assert verdict.reason == "allowed: no ALLOW policy applies"
    assert verdict.dry_run == (DryRunResult("app/dry", Action.DENY, True, 0),)
    assert index.evaluate(workload(), ALT).dry_run == (
        DryRunResult("app/dry", Action.DENY, False, None),
    )


def test_dry_run_allow_does_not_count_as_applying():
    index = build(flat("dry", dryRun=True, action="ALLOW", rules=ALLOW_CLIENT["rules"]))
    for req, matched in ((TLS, True), (ALT, False)):
        verdict = index.evaluate(workload(), req)
        assert verdict.allowed  # no enforced ALLOW policy applies
        assert verdict.dry_run == (
            DryRunResult("app/dry", Action.ALLOW, matched, 0 if matched else None),
        )


def test_dry_run_next_to_enforced_policies():
    index = build(
        istio("enforced", ALLOW_CLIENT),
        istio("dry", {"action": "DENY", "rules": [{}]}, annotations={"istio.io/dry-run": "TRUE"}),
    )
    verdict = index.evaluate(workload(), TLS)
    assert (verdict.allowed, verdict.policy) == (True, "app/enforced")
    assert verdict.dry_run == (DryRunResult("app/dry", Action.DENY, True, 0),)
    assert verdict.to_json() == {
        "allowed": True,
        "policy": "app/enforced",
        "rule": 0,
        "action": "ALLOW",
        "reason": "allowed by ALLOW policy app/enforced rule 0",
        "mtls": "PERMISSIVE",
        "dryRun": [{"policy": "app/dry", "action": "DENY", "matched": True, "rule": 0}],
    }


def test_dry_run_annotation_false_is_enforced():
    index = build(istio("p", DENY_ALL, annotations={"istio.io/dry-run": "false"}))
    assert not index.evaluate(workload(), TLS).allowed


@pytest.mark.parametrize("action", ["AUDIT", "CUSTOM"])
def test_audit_and_custom_never_affect_the_verdict(action: str):
    spec: dict[str, Any] = {"action": action, "rules": [{}]}
    if action == "CUSTOM":
        spec["provider"] = {"name": "ext-authz"}
    index = build(istio("p", spec))
    (policy,) = index.policies
    assert policy.action is Action[action]
    assert not policy.enforced
    assert policy.warnings == (
        f"action {action} is not enforced by the tunnel; this policy never affects a "
        "connection here",
    )
    assert index.applicable(workload()) == (policy,)
    verdict = index.evaluate(workload(), TLS)
    assert verdict.allowed
    assert verdict.reason == "allowed: no ALLOW policy applies"  # not an ALLOW policy


def test_waypoint_policy_is_not_enforced_by_the_tunnel():
    spec = {"targetRefs": [{"kind": "Service", "group": "", "name": "web"}], "rules": []}
    index = build(istio("p", spec))
    (policy,) = index.policies
    assert policy.target_refs == ("Service/web",)
    assert not policy.enforced
    assert index.evaluate(workload(), TLS).allowed


# -- xDS form --------------------------------------------------------------------------------------


def b64(ip: str) -> str:
    return base64.b64encode(ip_address(ip).packed).decode()


XDS_MATCH: dict[str, Any] = {
    "namespaces": [{"exact": "client-ns"}, {"prefix": "oth"}],
    "notNamespaces": [{"suffix": "-blocked"}],
    "principals": [{"presence": {}}],
    "notPrincipals": [{"exact": "td2/ns/other/sa/evil"}],
    "serviceAccounts": [{"namespace": "client-ns", "serviceAccount": "client-sa"}, "other/x"],
    "notServiceAccounts": [{"namespace": "a", "serviceAccount": "b"}],
    "sourceIps": ["10.0.0.0/8", {"address": b64("192.168.7.9"), "length": 32}],
    "notSourceIps": ["10.9.0.0/16"],
    "destinationIps": ["10.1.0.0/24"],
    "notDestinationIps": ["10.1.0.200"],
    "destinationPorts": [8080, 9090],
    "notDestinationPorts": ["22"],
}
XDS_FULL: dict[str, Any] = {
    "scope": "NAMESPACE",
    "action": "ALLOW",
    "dryRun": False,
    "groups": [{"rules": [{"matches": [XDS_MATCH]}]}],
}


def test_xds_form_every_field():
    policy = parse_policy(flat("x", **XDS_FULL), ROOT)
    (rule,) = policy.rules
    (clause,) = rule.clauses
    assert clause == (
        Match(
            namespaces=(
                StringMatch(MatchKind.EXACT, "client-ns"),
                StringMatch(MatchKind.PREFIX, "oth"),
            ),
            not_namespaces=(StringMatch(MatchKind.SUFFIX, "-blocked"),),
            principals=(StringMatch(MatchKind.PRESENCE),),
            not_principals=(StringMatch(MatchKind.EXACT, "td2/ns/other/sa/evil"),),
            service_accounts=(
                ServiceAccountMatch("client-ns", "client-sa"),
                ServiceAccountMatch("other", "x"),
            ),
            not_service_accounts=(ServiceAccountMatch("a", "b"),),
            source_ips=(ip_network("10.0.0.0/8"), ip_network("192.168.7.9/32")),
            not_source_ips=(ip_network("10.9.0.0/16"),),
            destination_ips=(ip_network("10.1.0.0/24"),),
            not_destination_ips=(ip_network("10.1.0.200/32"),),
            destination_ports=(8080, 9090),
            not_destination_ports=(22,),
        ),
    )
    index = build(flat("x", **XDS_FULL))
    assert index.evaluate(workload(), TLS).allowed
    # ALT: namespace "other" (prefix oth), sa other/x, 192.168.7.9, but dst 10.1.0.2 port 9090
    assert index.evaluate(workload(), ALT).allowed
    assert not index.evaluate(workload(), PLAIN).allowed


def test_xds_empty_match_never_matches_but_empty_clause_does():
    # As ztunnel: a Match with nothing set is skipped; a clause with no matches is true.
    never = build(flat("p", scope="NAMESPACE", groups=[{"rules": [{"matches": [{}]}]}]))
    always = build(flat("p", scope="NAMESPACE", groups=[{"rules": [{"matches": []}]}]))
    no_clause = build(flat("p", scope="NAMESPACE", groups=[{"rules": []}]))
    no_group = build(flat("p", scope="NAMESPACE", groups=[]))
    assert not never.evaluate(workload(), TLS).allowed
    assert always.evaluate(workload(), TLS).allowed
    assert no_clause.evaluate(workload(), TLS).allowed
    assert not no_group.evaluate(workload(), TLS).allowed


def test_ztunnel_nested_rules_form():
    raw = flat(
        "p",
        scope="Namespace",
        action="Deny",
        rules=[[[{"namespaces": [{"Exact": "client-ns"}]}], [{"destinationPorts": [8080]}]]],
    )
    policy = parse_policy(raw, ROOT)
    assert policy.action is Action.DENY
    assert policy.rules[0].clauses == (
        (Match(namespaces=(StringMatch(MatchKind.EXACT, "client-ns"),)),),
        (Match(destination_ports=(8080,)),),
    )


def test_flat_form_like_the_discovery_example():
    # The shape tests/meshcore/test_discovery.py uses: Istio spec fields at the top.
    raw = flat(
        "allow-frontend",
        ns="travel",
        action="ALLOW",
        rules=[{"from": [{"source": {"principals": ["*"]}}]}],
    )
    index = build(raw)
    assert index.evaluate(workload(ns="travel"), TLS).allowed
    assert not index.evaluate(workload(ns="travel"), PLAIN).allowed


SAME_POLICY_FORMS = [
    istio(
        "p",
        {
            "action": "DENY",
            "rules": [
                {
                    **src(principals=["*/sa/x"], notIpBlocks=["10.0.0.0/8"]),
                    **op(ports=["9090", "8080"]),
                }
            ],
        },
    ),
    flat(
        "p",
        scope="NAMESPACE",
        action="DENY",
        groups=[
            {
                "rules": [
                    {
                        "matches": [
                            {"principals": [{"suffix": "/sa/x"}], "notSourceIps": ["10.0.0.0/8"]}
                        ]
                    },
                    {"matches": [{"destinationPorts": [9090, 8080]}]},
                ]
            }
        ],
    ),
    flat(
        "p",
        scope="NAMESPACE",
        action="DENY",
        rules=[
            [
                [{"principals": ["*/sa/x"], "notSourceIps": ["10.0.0.0/8"]}],
                [{"destinationPorts": [9090, 8080]}],
            ]
        ],
    ),
]


def test_istio_and_xds_forms_agree():
    requests = [
        TLS,
        PLAIN,
        ALT,
        V6,
        MAPPED,
        replace(ALT, dst_port=8080),
        replace(ALT, src_ip=ip_address("10.2.2.2")),
    ]
    verdicts = [
        [build(raw).evaluate(workload(), r).allowed for r in requests] for raw in SAME_POLICY_FORMS
    ]
    assert verdicts[0] == verdicts[1] == verdicts[2]
    assert verdicts[0] == [True, True, False, True, True, False, True]


# -- malformed policies ----------------------------------------------------------------------------


def in_rule(rule: dict[str, Any]) -> RawPolicy:
    return istio("p", {"rules": [rule]})


def in_match(match: dict[str, Any]) -> RawPolicy:
    return flat("p", groups=[{"rules": [{"matches": [match]}]}])


def envelope(**entry: Any) -> RawPolicy:
    return RawPolicy.from_mapping("p", NS, entry)


WEB_SELECTOR = {"matchLabels": {"a": "b"}}
SERVICE_REF = {"kind": "Service", "name": "s"}

MALFORMED: list[tuple[str, RawPolicy, str]] = [
    ("spec not a mapping", istio("p", ["x"]), "app/p: spec: expected a mapping, got a list"),
    (
        "unknown spec key",
        istio("p", {"rule": []}),
        "spec.rule: unknown field (expected one of action, provider, rules, selector, "
        "targetRef, targetRefs)",
    ),
    ("unknown flat key", flat("p", actions="DENY"), "app/p: actions: unknown field"),
    (
        "unknown envelope key",
        envelope(kind="AuthorizationPolicy", metadata={"name": "p"}, extra=1),
        "extra: unknown field",
    ),
    (
        "wrong kind",
        RawPolicy.from_mapping("p", NS, {"name": "p"}, kind="PeerAuthentication"),
        "is a PeerAuthentication",
    ),
    (
        "bad apiVersion",
        envelope(apiVersion="v1", kind="AuthorizationPolicy", metadata={}),
        "apiVersion: expected security.istio.io/<version>",
    ),
    (
        "bad action",
        istio("p", {"action": "REJECT"}),
        "spec.action: expected one of ALLOW, DENY, AUDIT, CUSTOM, got 'REJECT'",
    ),
    ("action not a string", istio("p", {"action": 1}), "spec.action: expected one of"),
    (
        "provider without CUSTOM",
        istio("p", {"provider": {"name": "x"}}),
        "spec.provider: only a CUSTOM policy has a provider",
    ),
    ("rules not a list", istio("p", {"rules": {}}), "spec.rules: expected a list, got a mapping"),
    (
        "rule not a mapping",
        istio("p", {"rules": ["x"]}),
        "rules[0]: expected a mapping, got a string",
    ),
    ("unknown rule key", in_rule({"too": []}), "spec.rules[0].too: unknown field"),
    ("empty from", in_rule({"from": []}), "spec.rules[0].from: `from` must not be empty"),
    ("empty to", in_rule({"to": []}), "spec.rules[0].to: `to` must not be empty"),
    ("from without source", in_rule({"from": [{}]}), "from[0].source: `source` is required"),
    ("empty source", in_rule(src({})), "from[0].source: `source` must set at least one field"),
    ("source of empty lists", in_rule(src(principals=[])), "`source` must set at least one field"),
    ("unknown source field", in_rule(src(principal=["a"])), "source.principal: unknown field"),
    (
        "empty operation",
        in_rule(op({})),
        "to[0].operation: `operation` must set at least one field",
    ),
    ("unknown operation field", in_rule(op(port=["80"])), "operation.port: unknown field"),
    (
        "principals not a list",
        in_rule(src(principals="a")),
        "source.principals: expected a list, got a string",
    ),
    (
        "principal not a string",
        in_rule(src(principals=[1])),
        "source.principals[0]: expected a string, got a number",
    ),
    (
        "empty principal",
        in_rule(src(principals=[""])),
        "source.principals[0]: empty values are not allowed",
    ),
    (
        "bad IP",
        in_rule(src(ipBlocks=["10.0.0.300"])),
        "source.ipBlocks[0]: '10.0.0.300' is not a valid IP address",
    ),
    (
        "bad CIDR",
        in_rule(src(notIpBlocks=["10.0.0.0/33"])),
        "source.notIpBlocks[0]: '10.0.0.0/33' is not a valid CIDR",
    ),
    ("bad port", in_rule(op(ports=["http"])), "operation.ports[0]: 'http' is not a port number"),
    (
        "port out of range",
        in_rule(op(notPorts=["70000"])),
        "operation.notPorts[0]: port 70000 is not in 0..65535",
    ),
    ("negative port", in_rule(op(ports=["-1"])), "'-1' is not a port number"),
    (
        "boolean port",
        in_match({"destinationPorts": [True]}),
        "destinationPorts[0]: True is not a port number",
    ),
    (
        "service account wildcard",
        in_rule(src(serviceAccounts=["ns/*"])),
        "wildcards are not supported in service accounts",
    ),
    (
        "service account shape",
        in_rule(src(serviceAccounts=["a/b/c"])),
        "'a/b/c' must be 'namespace/serviceaccount' or 'serviceaccount'",
    ),
    (
        "service accounts with principals",
        in_rule(src(serviceAccounts=["a/b"], principals=["x"])),
        "cannot set serviceAccounts with namespaces or principals",
    ),
    (
        "when without key",
        in_rule({"when": [{"values": ["a"]}]}),
        "spec.rules[0].when[0].key: must be a non-empty string",
    ),
    (
        "when without values",
        in_rule({"when": [{"key": "source.ip"}]}),
        "at least one of values or notValues must be set for source.ip",
    ),
    (
        "when bad IP",
        in_rule(when("destination.ip", notValues=["x"])),
        "when[0].notValues[0]: 'x' is not a valid IP address",
    ),
    (
        "when bad port",
        in_rule(when("destination.port", ["80x"])),
        "when[0].values[0]: '80x' is not a port number",
    ),
    (
        "when L7 value not a string",
        in_rule(when("request.headers[x]", [1])),  # type: ignore[list-item]
        "when[0].values[0]: expected a string, got a number",
    ),
    (
        "when unknown field",
        in_rule({"when": [{"key": "source.ip", "value": ["a"]}]}),
        "when[0].value: unknown field",
    ),
    (
        "selector not a mapping",
        istio("p", {"selector": "app=web"}),
        "spec.selector: expected a mapping, got a string",
    ),
    ("selector unknown key", istio("p", {"selector": {"labels": {}}}), "selector.labels: unknown"),
    (
        "label value not a string",
        istio("p", {"selector": {"matchLabels": {"v": 1}}}),
        "spec.selector.matchLabels.v: label value must be a string",
    ),
    (
        "selector and targetRefs",
        istio("p", {"selector": WEB_SELECTOR, "targetRef": SERVICE_REF}),
        "a policy has either a selector or targetRefs",
    ),
    (
        "target ref without name",
        istio("p", {"targetRefs": [{"kind": "Service"}]}),
        "a target reference needs a kind and a name",
    ),
    (
        "dry-run annotation value",
        istio("p", {}, annotations={"istio.io/dry-run": "yes"}),
        'metadata.annotations.istio.io/dry-run: expected "true" or "false", got \'yes\'',
    ),
    (
        "dryRun not a boolean",
        flat("p", dryRun="true"),
        "dryRun: expected true or false, got 'true'",
    ),
    (
        "bad scope",
        flat("p", scope="CLUSTER"),
        "scope: expected one of GLOBAL, NAMESPACE, WORKLOAD_SELECTOR, got 'CLUSTER'",
    ),
    (
        "scope and selector disagree",
        flat("p", scope="NAMESPACE", selector=WEB_SELECTOR),
        "selector: a NAMESPACE policy cannot have a selector",
    ),
    (
        "groups and rules",
        flat("p", groups=[], rules=[]),
        "give either groups (xDS form) or rules, not both",
    ),
    (
        "xds unknown match field",
        in_match({"sourceIp": []}),
        "groups[0].rules[0].matches[0].sourceIp: unknown field",
    ),
    (
        "xds string match two kinds",
        in_match({"principals": [{"exact": "a", "prefix": "b"}]}),
        "principals[0]: expected exactly one of exact, prefix, suffix, presence",
    ),
    (
        "xds string match unknown kind",
        in_match({"principals": [{"regex": "a"}]}),
        "principals[0].regex: unknown field",
    ),
    (
        "xds bad address bytes",
        in_match({"sourceIps": [{"address": "AAE=", "length": 8}]}),
        "sourceIps[0].address: expected 4 or 16 base64-encoded bytes",
    ),
    (
        "xds bad address length",
        in_match({"sourceIps": [{"address": b64("10.0.0.1"), "length": 33}]}),
        "sourceIps[0].length: 33 is not in 0..32",
    ),
    (
        "xds service account object",
        in_match({"serviceAccounts": [{"namespace": "a"}]}),
        "serviceAccounts[0].serviceAccount: must be a non-empty string",
    ),
    ("nested rules bad match", flat("p", rules=[[["x"]]]), "rules[0][0][0]: expected a mapping"),
    ("not JSON", RawPolicy("p", NS, "{not json"), "entry is not valid JSON"),
]


@pytest.mark.parametrize(("raw", "message"), [pytest.param(r, m, id=i) for i, r, m in MALFORMED])
def test_malformed_policy_is_a_clear_config_error(raw: RawPolicy, message: str):
    with pytest.raises(MeshConfigError) as info:
        parse_policy(raw, ROOT)
    assert message in str(info.value)
    assert str(info.value).startswith("AuthorizationPolicy app/p")


JSON_KEYS = st.sampled_from(
    [
        "action",
        "rules",
        "from",
        "to",
        "when",
        "source",
        "operation",
        "principals",
        "notPrincipals",
        "namespaces",
        "ipBlocks",
        "notIpBlocks",
        "ports",
        "notPorts",
        "methods",
        "key",
        "values",
        "notValues",
        "selector",
        "matchLabels",
        "serviceAccounts",
        "groups",
        "matches",
        "exact",
        "prefix",
        "presence",
        "sourceIps",
        "destinationPorts",
        "address",
        "length",
        "scope",
        "dryRun",
        "targetRefs",
        "kind",
        "name",
        "provider",
        "requestPrincipals",
        "notServiceAccounts",
        "x",
    ]
)
JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(
        [
            "ALLOW",
            "DENY",
            "AUDIT",
            "CUSTOM",
            "*",
            "a*",
            "*a",
            "10.0.0.0/8",
            "fd00::1",
            "80",
            "source.ip",
            "destination.port",
            "ns/sa",
            "GLOBAL",
            "",
            "AAAAAA==",
            "Service",
        ]
    ),
    st.text(max_size=6),
)
JSON = st.recursive(
    JSON_SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(JSON_KEYS, children, max_size=5)
    ),
    max_leaves=30,
)


def mostly(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`good` three times in four, else arbitrary JSON."""
    return st.one_of(good, good, good, JSON)


def shaped(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """Mappings with the known keys (each value mostly right-typed), now and then junk."""
    return mostly(st.fixed_dictionaries({}, optional={k: mostly(v) for k, v in fields.items()}))


VALUES = st.sampled_from(
    ["*", "a*", "*a", "ns", "td/ns/a/sa/b", "ns/sa", "10.0.0.0/8", "fd00::1", "80", "8080", "x"]
)
SCALAR_LISTS = st.lists(mostly(VALUES), max_size=3)
SOURCE_FUZZ = shaped(
    {
        k: SCALAR_LISTS
        for k in (
            "principals",
            "notPrincipals",
            "namespaces",
            "notNamespaces",
            "serviceAccounts",
            "notServiceAccounts",
            "ipBlocks",
            "notIpBlocks",
            "requestPrincipals",
            "remoteIpBlocks",
        )
    }
)
OPERATION_FUZZ = shaped({k: SCALAR_LISTS for k in ("ports", "notPorts", "methods", "hosts")})
WHEN_FUZZ = shaped(
    {
        "key": st.sampled_from(["source.ip", "destination.port", "source.principal", "request.x"]),
        "values": SCALAR_LISTS,
        "notValues": SCALAR_LISTS,
    }
)
RULE_FUZZ = shaped(
    {
        "from": st.lists(shaped({"source": SOURCE_FUZZ}), max_size=2),
        "to": st.lists(shaped({"operation": OPERATION_FUZZ}), max_size=2),
        "when": st.lists(WHEN_FUZZ, max_size=2),
    }
)
SELECTOR_FUZZ = shaped({"matchLabels": st.dictionaries(st.text(max_size=3), JSON_SCALARS)})
SPEC_FUZZ = shaped(
    {
        "action": st.sampled_from(["ALLOW", "DENY", "AUDIT", "CUSTOM"]),
        "rules": st.lists(RULE_FUZZ, max_size=3),
        "selector": SELECTOR_FUZZ,
    }
)
MATCH_FUZZ = shaped(
    {
        "namespaces": st.lists(
            shaped({"exact": JSON_SCALARS, "presence": JSON}) | JSON_SCALARS, max_size=2
        ),
        "principals": st.lists(
            shaped({"prefix": JSON_SCALARS, "suffix": JSON_SCALARS}), max_size=2
        ),
        "serviceAccounts": st.lists(
            shaped({"namespace": JSON_SCALARS, "serviceAccount": JSON_SCALARS}), max_size=2
        ),
        "sourceIps": st.lists(
            shaped({"address": JSON_SCALARS, "length": JSON_SCALARS}) | JSON_SCALARS, max_size=2
        ),
        "destinationPorts": SCALAR_LISTS,
        "notDestinationIps": SCALAR_LISTS,
    }
)
XDS_FUZZ = shaped(
    {
        "scope": st.sampled_from(["GLOBAL", "NAMESPACE", "WORKLOAD_SELECTOR", "Global"]),
        "action": st.sampled_from(["ALLOW", "DENY", "Allow"]),
        "dryRun": st.booleans(),
        "groups": st.lists(
            shaped({"rules": st.lists(shaped({"matches": st.lists(MATCH_FUZZ, max_size=2)}))}),
            max_size=2,
        ),
    }
)


FUZZ_ENTRIES = st.one_of(
    st.builds(lambda spec: istio("p", spec), JSON | SPEC_FUZZ),
    st.builds(lambda entry: RawPolicy("p", NS, json.dumps(entry)), JSON | XDS_FUZZ | SPEC_FUZZ),
)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(raw=FUZZ_ENTRIES)
def test_arbitrary_specs_parse_or_raise_config_error(raw: RawPolicy):
    error = None
    try:
        policy = parse_policy(raw, ROOT)
    except MeshConfigError as exc:
        error = str(exc)
    if error is not None:
        assert error.startswith("AuthorizationPolicy app/p")
        return
    # Whatever parses can be dumped and evaluated.
    json.dumps(policy.to_json())
    for req in (TLS, PLAIN, V6):
        matching_rule(policy, req)
    build(raw).evaluate(workload(), TLS)


# -- indexed evaluation agrees with the reference matcher ------------------------------------------

NAMES = st.sampled_from(["client-ns", "other", "client-*", "*-ns", "*", "oth*"])
PRINCIPALS = st.sampled_from(
    [
        "cluster.local/ns/client-ns/sa/client-sa",
        "td2/ns/other/sa/x",
        "*",
        "cluster.local/*",
        "*/sa/x",
    ]
)
IPS = st.sampled_from(["10.0.0.5", "10.0.0.0/8", "192.168.7.9", "fd00::/16", "10.1.0.0/24"])
PORTS = st.sampled_from(["8080", "9090", "22"])
SOURCE = st.fixed_dictionaries(
    {},
    optional={
        "principals": st.lists(PRINCIPALS, min_size=1, max_size=2),
        "notPrincipals": st.lists(PRINCIPALS, min_size=1, max_size=2),
        "namespaces": st.lists(NAMES, min_size=1, max_size=2),
        "notNamespaces": st.lists(NAMES, min_size=1, max_size=2),
        "ipBlocks": st.lists(IPS, min_size=1, max_size=2),
        "notIpBlocks": st.lists(IPS, min_size=1, max_size=2),
    },
).filter(bool)
OPERATION = st.fixed_dictionaries(
    {},
    optional={
        "ports": st.lists(PORTS, min_size=1, max_size=2),
        "notPorts": st.lists(PORTS, min_size=1, max_size=2),
    },
).filter(bool)
WHEN = st.builds(
    lambda key, values: {"key": key, "values": values},
    st.sampled_from(["source.ip", "destination.ip"]),
    st.lists(IPS, min_size=1, max_size=2),
) | st.builds(
    lambda values: {"key": "destination.port", "notValues": values},
    st.lists(PORTS, min_size=1, max_size=2),
)
RULE = st.fixed_dictionaries(
    {},
    optional={
        "from": st.lists(st.builds(lambda s: {"source": s}, SOURCE), min_size=1, max_size=2),
        "to": st.lists(st.builds(lambda o: {"operation": o}, OPERATION), min_size=1, max_size=2),
        "when": st.lists(WHEN, min_size=1, max_size=2),
    },
)
SPEC = st.fixed_dictionaries(
    {"action": st.sampled_from(["ALLOW", "DENY"]), "rules": st.lists(RULE, max_size=3)}
)
REQUEST = st.builds(
    Request,
    st.sampled_from([ip_address(a) for a in ("10.0.0.5", "192.168.7.9", "fd00::5", "10.1.0.9")]),
    st.sampled_from([CLIENT, OTHER, None, SpiffeId("cluster.local", "other", "x")]),
    st.sampled_from([ip_address(a) for a in ("10.1.0.1", "10.1.0.2", "fd01::1")]),
    st.sampled_from([8080, 9090, 22, 1]),
)


def reference_verdict(
    policies: tuple[Policy, ...], req: Request
) -> tuple[bool, str | None, int | None]:
    for p in policies:
        if p.action is Action.DENY:
            for r in p.rules:
                if r.matches(req):
                    return False, p.key, r.index
    allows = [p for p in policies if p.action is Action.ALLOW]
    if not allows:
        return True, None, None
    for p in allows:
        for r in p.rules:
            if r.matches(req):
                return True, p.key, r.index
    return False, None, None


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(specs=st.lists(SPEC, min_size=1, max_size=4), reqs=st.lists(REQUEST, min_size=1, max_size=6))
def test_indexed_evaluation_agrees_with_the_reference(
    specs: list[dict[str, Any]], reqs: list[Request]
):
    index = build(*(istio(f"p{i}", spec) for i, spec in enumerate(specs)))
    wl = workload()
    for req in reqs:
        verdict = index.evaluate(wl, req)
        assert (verdict.allowed, verdict.policy, verdict.rule) == reference_verdict(
            index.policies, req
        )


# -- broken policies fail closed -------------------------------------------------------------------

TYPO_ALLOW = {"selector": {"matchLabels": {"app": "web"}}, "rules": [src(namespace=["client-ns"])]}


def test_broken_allow_policy_denies_everything_it_selects():
    web = workload(labels={"app": "web"}, uid="web")
    db = workload(labels={"app": "db"}, uid="db", ip="10.1.0.2")
    index = build(istio("typo", TYPO_ALLOW), workloads=(web, db))
    assert index.errors == (
        "AuthorizationPolicy app/typo: spec.rules[0].from[0].source.namespace: unknown field "
        "(expected one of ipBlocks, namespaces, notIpBlocks, notNamespaces, notPrincipals, "
        "notRemoteIpBlocks, notRequestPrincipals, notServiceAccounts, principals, remoteIpBlocks, "
        "requestPrincipals, serviceAccounts); it denies every connection in its scope until fixed",
    )
    (stand_in,) = index.policies
    assert stand_in.error is not None
    assert stand_in.scope is Scope.WORKLOAD_SELECTOR
    assert stand_in.to_json()["error"] == stand_in.error
    for req in (TLS, PLAIN, ALT):
        verdict = index.evaluate(web, req)
        assert not verdict.allowed
        assert (verdict.policy, verdict.action) == ("app/typo", Action.DENY)
        assert verdict.reason.startswith(
            "denied: policy app/typo is invalid, so it denies everything it applies to (fail "
            "closed): AuthorizationPolicy app/typo: spec.rules[0].from[0].source.namespace"
        )
        # The selector still parsed, so other workloads are untouched.
        assert index.evaluate(db, req).allowed


def test_broken_policy_beats_a_matching_allow():
    index = build(istio("ok", {"rules": [{}]}), istio("typo", TYPO_ALLOW))
    assert not index.evaluate(workload(labels={"app": "web"}), TLS).allowed
    assert index.evaluate(workload(labels={"app": "db"}), TLS).allowed


def test_broken_selector_widens_to_the_namespace():
    index = build(istio("typo", {"selector": {"matchLabel": {"app": "web"}}, "action": "DENY"}))
    (stand_in,) = index.policies
    assert stand_in.scope is Scope.NAMESPACE
    assert not index.evaluate(workload(labels={"app": "db"}), TLS).allowed
    assert index.evaluate(workload(ns="elsewhere"), TLS).allowed


def test_broken_policy_in_root_namespace_denies_mesh_wide():
    index = build(istio("typo", {"action": "DENNY"}, ns=ROOT))
    assert not index.evaluate(workload(ns="anything"), TLS).allowed


def test_broken_attached_policy_applies_where_attached():
    # xDS form, attached by the control plane only: its scope is known despite the typo.
    raw = flat("typo", ns="other", scope="WORKLOAD_SELECTOR", groups="oops")
    index = build(raw)
    assert index.policies[0].scope is Scope.WORKLOAD_SELECTOR
    assert index.evaluate(workload(), TLS).allowed
    assert index.evaluate(workload(ns="other"), TLS).allowed
    assert not index.evaluate(workload(attached=("other/typo",)), TLS).allowed


def test_broken_xds_selector_widens_to_the_namespace():
    raw = flat("typo", scope="WORKLOAD_SELECTOR", selector={"matchLabels": "app=web"})
    index = build(raw)
    assert index.policies[0].scope is Scope.NAMESPACE
    assert not index.evaluate(workload(labels={"app": "db"}), TLS).allowed


def test_broken_dry_run_policy_is_reported_not_enforced():
    raw = istio("typo", TYPO_ALLOW, annotations={"istio.io/dry-run": "true"})
    index = build(raw)
    assert index.errors[0].endswith("it is not enforced by the tunnel, so nothing else changes")
    verdict = index.evaluate(workload(labels={"app": "web"}), TLS)
    assert verdict.allowed
    assert verdict.dry_run == (DryRunResult("app/typo", Action.DENY, True, None),)


def test_broken_audit_policy_changes_nothing():
    index = build(istio("typo", {"action": "AUDIT", "rules": "x"}))
    assert len(index.errors) == 1
    assert index.evaluate(workload(), TLS).allowed


def test_broken_policy_with_bad_dry_run_value_is_enforced():
    # A typo in the dry-run annotation itself must not make the policy harmless.
    index = build(istio("typo", {"action": "ALLOW"}, annotations={"istio.io/dry-run": "ture"}))
    assert not index.evaluate(workload(), TLS).allowed


def test_broken_waypoint_policy_is_not_enforced_by_the_tunnel():
    index = build(istio("typo", {"targetRefs": [{"kind": "Service"}], "action": "DENY"}))
    assert index.evaluate(workload(), TLS).allowed


# -- PeerAuthentication in evaluate ----------------------------------------------------------------


def peer_auth(name: str, spec: dict[str, Any], ns: str = NS) -> RawPolicy:
    entry = {
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }
    return RawPolicy.from_mapping(name, ns, entry, kind="PeerAuthentication")


def test_strict_mtls_denies_plaintext_before_policies():
    index = build(
        peer_auth("strict", {"mtls": {"mode": "STRICT"}}, ns=ROOT),
        peer_auth(
            "web",
            {
                "selector": {"matchLabels": {"app": "web"}},
                "portLevelMtls": {"8080": {"mode": "PERMISSIVE"}},
            },
        ),
        istio("allow-all", {"rules": [{}]}),
    )
    web, db = workload(labels={"app": "web"}), workload(labels={"app": "db"})
    assert index.mtls_mode(db, 8080) is MtlsMode.STRICT
    verdict = index.evaluate(db, PLAIN)
    assert not verdict.allowed
    assert (verdict.policy, verdict.rule, verdict.action) == (f"{ROOT}/strict", None, Action.DENY)
    assert verdict.reason == (
        f"denied: PeerAuthentication {ROOT}/strict requires mTLS (STRICT) on port 8080 and the "
        "connection is plaintext"
    )
    assert index.evaluate(db, TLS).allowed
    assert index.evaluate(web, PLAIN).allowed  # port-level PERMISSIVE
    assert not index.evaluate(web, replace(PLAIN, dst_port=9090)).allowed


# -- dumps -----------------------------------------------------------------------------------------


def test_policy_to_json():
    raw = istio(
        "p",
        {
            "action": "DENY",
            "selector": {"matchLabels": {"app": "web"}},
            "rules": [
                {
                    "from": [{"source": {"principals": ["*"], "ipBlocks": ["10.0.0.0/8"]}}],
                    "to": [{"operation": {"ports": ["80"], "methods": ["GET"]}}],
                }
            ],
        },
        annotations={"istio.io/dry-run": "true"},
    )
    dumped = parse_policy(raw, ROOT).to_json()
    assert dumped == {
        "name": "p",
        "namespace": "app",
        "scope": "WORKLOAD_SELECTOR",
        "action": "DENY",
        "dryRun": True,
        "selector": {"matchLabels": {"app": "web"}},
        "rules": [
            {
                "rule": 0,
                "clauses": [
                    [{"principals": [{"presence": {}}], "sourceIps": ["10.0.0.0/8"]}],
                    [{"destinationPorts": [80]}],
                ],
            }
        ],
        "warnings": [
            "rule 0 uses L7 field `methods`; ignored in this DENY policy, so only its L4 part "
            "is enforced (stricter than requested)"
        ],
    }
    json.dumps(dumped)


def test_index_to_json_lists_everything():
    index = build(
        istio("ok", {}), istio("typo", TYPO_ALLOW), peer_auth("pa", {"mtls": {"mode": "STRICT"}})
    )
    dumped = index.to_json()
    assert [p["name"] for p in dumped["policies"]] == ["ok", "typo"]
    assert [p["name"] for p in dumped["peerAuthentications"]] == ["pa"]
    assert len(dumped["errors"]) == 1
    json.dumps(dumped)


def test_policies_are_values():
    a = parse_policy(istio("p", ALLOW_CLIENT), ROOT)
    b = parse_policy(istio("p", ALLOW_CLIENT), ROOT)
    assert a == b and hash(a) == hash(b)
    assert a.key == "app/p"
    assert matching_rule(replace(a, name="q"), TLS) == 0  # compiled again on replace


# -- rebuilds --------------------------------------------------------------------------------------


def test_rebuild_reuses_parses_and_a_broken_policy_stays_fail_closed():
    raws = (istio("ok", ALLOW_CLIENT), istio("typo", TYPO_ALLOW))
    first, second = build(*raws), build(*raws)
    # Parses are memoized per entry: the same Policy objects, the same errors.
    assert first.policies[0] is second.policies[0]
    assert first.errors == second.errors and len(second.errors) == 1
    assert not second.evaluate(workload(labels={"app": "web"}), TLS).allowed
    # An edited entry is parsed afresh.
    edited = build(istio("ok", {"rules": [{}]}), istio("typo", TYPO_ALLOW))
    assert edited.policies[0] != first.policies[0]
    assert edited.evaluate(workload(), ALT).allowed


@pytest.mark.parametrize("enabled", [True, False])
def test_build_leaves_the_garbage_collector_as_it_found_it(enabled: bool):
    was = gc.isenabled()
    try:
        if not enabled:
            gc.disable()
        build(istio("p", ALLOW_CLIENT))
        assert gc.isenabled() is enabled
    finally:
        if was:
            gc.enable()
