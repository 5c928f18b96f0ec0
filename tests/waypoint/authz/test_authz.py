"""L7 AuthorizationPolicy at the waypoint: fields, actions, order, dry run, fail closed."""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from typing import Any

import pytest

from meshcore.identity.spiffe import SpiffeId
from meshcore.policy.model import Action
from meshcore.policy.verdict import DryRunResult
from waypoint.authz.decide import (
    DestinationRef,
    WaypointRef,
    applicable,
    authorize_request,
    denied_response,
)
from waypoint.authz.facts import RequestFacts, facts_for
from waypoint.authz.parse import load_l7_policy, parse_l7_policy, validate_policy
from waypoint.http.message import BufferedBody, Request

WAYPOINT = WaypointRef("shop", "waypoint")
REVIEWS = DestinationRef("shop", "reviews")

FACTS = RequestFacts(
    source_identity=SpiffeId("cluster.local", "shop", "frontend"),
    source_ip=ipaddress.ip_address("10.0.1.5"),
    destination_ip=ipaddress.ip_address("10.96.0.10"),
    destination_port=9080,
    destination_service="reviews.shop.svc.cluster.local",
    method="GET",
    host="reviews.shop.svc.cluster.local:9080",
    path="/api/v1/books/42",
    headers=(("x-user", "alice"), ("x-tag", "a"), ("x-tag", "b")),
    remote_ip=ipaddress.ip_address("203.0.113.7"),
    sni="reviews.shop",
    request_principal="https://issuer.example/alice",
    claims={
        "iss": "https://issuer.example",
        "sub": "alice",
        "aud": ["shop", "books"],
        "azp": "web-app",
        "groups": ["admins", "dev"],
        "org": {"team": {"name": "storefront"}},
        "level": 3,
    },
)
PLAINTEXT = replace(FACTS, source_identity=None, request_principal=None, claims={})


def policy(
    rules: Any = None,
    action: str | None = "ALLOW",
    name: str = "p",
    namespace: str = "shop",
    targets: Any = None,
    dry_run: bool = False,
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "targetRefs": targets
        if targets is not None
        else [{"kind": "Service", "group": "", "name": "reviews"}]
    }
    if action is not None:
        spec["action"] = action
    if rules is not None:
        spec["rules"] = rules
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if dry_run:
        meta["annotations"] = {"istio.io/dry-run": "true"}
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": meta,
        "spec": spec,
    }


def src(**fields: Any) -> list[dict[str, Any]]:
    return [{"from": [{"source": fields}]}]


def op(**fields: Any) -> list[dict[str, Any]]:
    return [{"to": [{"operation": fields}]}]


def when(key: str, values: list[str] | None = None, not_values: list[str] | None = None):
    cond: dict[str, Any] = {"key": key}
    if values is not None:
        cond["values"] = values
    if not_values is not None:
        cond["notValues"] = not_values
    return [{"when": [cond]}]


def allowed(rules: Any, facts: RequestFacts = FACTS) -> bool:
    return authorize_request([parse_l7_policy(policy(rules))], facts).allowed


FIELD_CASES = [
    # (rules, facts, allowed) for a single ALLOW policy: allowed == the rule matched.
    ("principal exact", src(principals=["cluster.local/ns/shop/sa/frontend"]), FACTS, True),
    ("principal other", src(principals=["cluster.local/ns/shop/sa/other"]), FACTS, False),
    ("principal prefix", src(principals=["cluster.local/ns/shop/*"]), FACTS, True),
    ("principal suffix", src(principals=["*/sa/frontend"]), FACTS, True),
    ("principal presence, none proven", src(principals=["*"]), PLAINTEXT, False),
    ("notPrincipals matches", src(notPrincipals=["*/sa/frontend"]), FACTS, False),
    ("notPrincipals, none proven", src(notPrincipals=["*"]), PLAINTEXT, True),
    ("requestPrincipals", src(requestPrincipals=["https://issuer.example/*"]), FACTS, True),
    ("requestPrincipals, no JWT", src(requestPrincipals=["*"]), PLAINTEXT, False),
    ("notRequestPrincipals *, no JWT", src(notRequestPrincipals=["*"]), PLAINTEXT, True),
    ("namespaces", src(namespaces=["shop"]), FACTS, True),
    ("notNamespaces", src(notNamespaces=["shop"]), FACTS, False),
    ("serviceAccounts ns/sa", src(serviceAccounts=["shop/frontend"]), FACTS, True),
    ("serviceAccounts bare (policy ns)", src(serviceAccounts=["frontend"]), FACTS, True),
    ("serviceAccounts other ns", src(serviceAccounts=["prod/frontend"]), FACTS, False),
    ("notServiceAccounts", src(notServiceAccounts=["shop/frontend"]), FACTS, False),
    ("ipBlocks cidr", src(ipBlocks=["10.0.0.0/16"]), FACTS, True),
    ("ipBlocks host", src(ipBlocks=["10.0.1.6"]), FACTS, False),
    ("notIpBlocks", src(notIpBlocks=["10.0.1.0/24"]), FACTS, False),
    ("remoteIpBlocks", src(remoteIpBlocks=["203.0.113.0/24"]), FACTS, True),
    ("remoteIpBlocks is not source", src(remoteIpBlocks=["10.0.1.5"]), FACTS, False),
    ("notRemoteIpBlocks", src(notRemoteIpBlocks=["203.0.113.7"]), FACTS, False),
    ("hosts without port", op(hosts=["reviews.shop.svc.cluster.local"]), FACTS, True),
    ("hosts case-insensitive", op(hosts=["Reviews.Shop.svc.cluster.local"]), FACTS, True),
    ("hosts with port", op(hosts=["reviews.shop.svc.cluster.local:9080"]), FACTS, True),
    ("hosts other port", op(hosts=["reviews.shop.svc.cluster.local:80"]), FACTS, False),
    ("hosts suffix", op(hosts=["*.svc.cluster.local"]), FACTS, True),
    ("notHosts", op(notHosts=["reviews.*"]), FACTS, False),
    ("ports", op(ports=["9080"]), FACTS, True),
    ("ports other", op(ports=["80"]), FACTS, False),
    ("notPorts", op(notPorts=["9080"]), FACTS, False),
    ("methods", op(methods=["GET", "HEAD"]), FACTS, True),
    ("methods other", op(methods=["POST"]), FACTS, False),
    ("notMethods", op(notMethods=["GET"]), FACTS, False),
    ("paths exact", op(paths=["/api/v1/books/42"]), FACTS, True),
    ("paths exact other", op(paths=["/api/v1/books"]), FACTS, False),
    ("paths prefix", op(paths=["/api/*"]), FACTS, True),
    ("paths suffix", op(paths=["*/42"]), FACTS, True),
    ("paths {*}", op(paths=["/api/{*}/books/{*}"]), FACTS, True),
    ("paths {*} one segment only", op(paths=["/api/{*}/{*}"]), FACTS, False),
    ("paths {**}", op(paths=["/api/{**}"]), FACTS, True),
    ("paths {*} then {**}", op(paths=["/{*}/v1/{**}"]), FACTS, True),
    ("notPaths", op(notPaths=["/api/{**}"]), FACTS, False),
    ("header", when("request.headers[x-user]", ["alice"]), FACTS, True),
    ("header name case", when("request.headers[X-User]", ["ali*"]), FACTS, True),
    ("header absent", when("request.headers[x-none]", ["*"]), FACTS, False),
    ("header absent, notValues", when("request.headers[x-none]", None, ["x"]), FACTS, True),
    ("header repeated, joined", when("request.headers[x-tag]", ["a,b"]), FACTS, True),
    ("header notValues", when("request.headers[x-user]", None, ["alice"]), FACTS, False),
    ("claim string", when("request.auth.claims[sub]", ["alice"]), FACTS, True),
    ("claim list", when("request.auth.claims[groups]", ["admins"]), FACTS, True),
    ("claim list miss", when("request.auth.claims[groups]", ["ops"]), FACTS, False),
    ("claim nested", when("request.auth.claims[org][team][name]", ["store*"]), FACTS, True),
    ("claim nested missing", when("request.auth.claims[org][x]", ["*"]), FACTS, False),
    ("claim number never matches", when("request.auth.claims[level]", ["3"]), FACTS, False),
    ("claim, no JWT", when("request.auth.claims[sub]", ["alice"]), PLAINTEXT, False),
    ("auth.principal", when("request.auth.principal", ["*/alice"]), FACTS, True),
    ("auth.audiences", when("request.auth.audiences", ["books"]), FACTS, True),
    ("auth.presenter", when("request.auth.presenter", ["web-app"]), FACTS, True),
    ("source.ip", when("source.ip", ["10.0.1.0/24"]), FACTS, True),
    ("remote.ip", when("remote.ip", ["203.0.113.7"]), FACTS, True),
    ("source.namespace", when("source.namespace", None, ["shop"]), FACTS, False),
    ("source.principal", when("source.principal", ["*/frontend"]), FACTS, True),
    ("destination.ip", when("destination.ip", ["10.96.0.0/12"]), FACTS, True),
    ("destination.port", when("destination.port", ["9080"]), FACTS, True),
    ("destination.port other", when("destination.port", ["80"]), FACTS, False),
    ("connection.sni", when("connection.sni", ["reviews.*"]), FACTS, True),
    ("connection.sni absent", when("connection.sni", ["*"]), replace(FACTS, sni=None), False),
    ("empty rule matches all", [{}], FACTS, True),
    ("fields of an entry AND", src(namespaces=["shop"], ipBlocks=["192.0.2.0/24"]), FACTS, False),
    (
        "entries of from OR",
        [{"from": [{"source": {"namespaces": ["x"]}}, {"source": {"namespaces": ["shop"]}}]}],
        FACTS,
        True,
    ),
    (
        "from AND to",
        [
            {
                "from": [{"source": {"namespaces": ["shop"]}}],
                "to": [{"operation": {"methods": ["POST"]}}],
            }
        ],
        FACTS,
        False,
    ),
    ("rules OR", [*op(methods=["POST"]), *op(methods=["GET"])], FACTS, True),
    (
        "positive and not together",
        src(namespaces=["shop"], notPrincipals=["*/frontend"]),
        FACTS,
        False,
    ),
]


@pytest.mark.parametrize(
    ("rules", "facts", "expected"),
    [c[1:] for c in FIELD_CASES],
    ids=[c[0] for c in FIELD_CASES],
)
def test_fields(rules, facts, expected):
    assert allowed(rules, facts) is expected


def P(action: str, rules: Any = None, name: str = "p", **kw: Any) -> Any:
    return load_l7_policy(policy([{}] if rules is None else rules, action, name=name, **kw))


ORDER_CASES = [
    ("no policy allows", [], True, None),
    ("ALLOW matching", [P("ALLOW", name="a")], True, "shop/a"),
    ("ALLOW not matching denies", [P("ALLOW", op(methods=["POST"]), name="a")], False, None),
    ("ALLOW with no rules allows nothing", [P("ALLOW", [], name="a")], False, None),
    ("DENY matching", [P("DENY", name="d")], False, "shop/d"),
    ("DENY with no rules denies nothing", [P("DENY", [], name="d")], True, None),
    ("DENY before ALLOW", [P("ALLOW", name="a"), P("DENY", name="d")], False, "shop/d"),
    (
        "DENY not matching, ALLOW matching",
        [P("DENY", op(methods=["POST"]), name="d"), P("ALLOW", name="a")],
        True,
        "shop/a",
    ),
    (
        "second ALLOW matches",
        [P("ALLOW", op(methods=["POST"]), name="a1"), P("ALLOW", name="a2")],
        True,
        "shop/a2",
    ),
    ("AUDIT never denies", [P("AUDIT", name="au")], True, None),
    ("AUDIT does not count as ALLOW", [P("AUDIT", name="au"), P("DENY", [], name="d")], True, None),
    ("dry-run DENY not enforced", [P("DENY", name="d", dry_run=True)], True, None),
    (
        "dry-run ALLOW not counted",
        [P("ALLOW", op(methods=["POST"]), name="a", dry_run=True)],
        True,
        None,
    ),
    ("invalid policy fails closed", [P("ALLOW", op(methods="GET"), name="bad")], False, "shop/bad"),
    ("CUSTOM refused, fails closed", [P("CUSTOM", name="ext")], False, "shop/ext"),
    (
        "invalid DENY beats matching ALLOW",
        [P("ALLOW", name="a"), P("DENY", src(ipBlocks=["nope"]), name="bad")],
        False,
        "shop/bad",
    ),
]


@pytest.mark.parametrize(
    ("policies", "expected", "by"), [c[1:] for c in ORDER_CASES], ids=[c[0] for c in ORDER_CASES]
)
def test_evaluation_order(policies, expected, by):
    verdict = authorize_request(policies, FACTS)
    assert verdict.allowed is expected
    assert verdict.policy == by
    assert verdict.reason


def test_verdict_names_rule_and_action():
    v = authorize_request(
        [P("DENY", [*op(methods=["POST"]), *op(methods=["GET"])], name="d")], FACTS
    )
    assert (v.allowed, v.policy, v.rule, v.action) == (False, "shop/d", 1, Action.DENY)
    assert v.reason == "denied by DENY policy shop/d rule 1"
    assert v.to_json()["action"] == "DENY"


def test_audit_and_dry_run_are_reported():
    policies = [
        P("AUDIT", name="au"),
        P("AUDIT", op(methods=["POST"]), name="au-miss"),
        P("DENY", op(methods=["GET"]), name="dry", dry_run=True),
        P("ALLOW", op(methods=["POST"]), name="dry-miss", dry_run=True),
        P("ALLOW", name="a"),
    ]
    v = authorize_request(policies, FACTS)
    assert v.allowed and v.policy == "shop/a"
    assert v.audited == ("shop/au",)
    assert v.dry_run == (
        DryRunResult("shop/dry", Action.DENY, True, 0),
        DryRunResult("shop/dry-miss", Action.ALLOW, False, None),
    )


def test_broken_dry_run_policy_is_reported_not_enforced():
    bad = load_l7_policy(policy(op(paths=["/a/{**}/b"]), "DENY", name="bad", dry_run=True))
    assert bad.error is not None and bad.dry_run
    v = authorize_request([bad], FACTS)
    assert v.allowed
    assert v.dry_run == (DryRunResult("shop/bad", Action.DENY, True, None),)


GW = {"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "waypoint"}
GWC = {"kind": "GatewayClass", "group": "gateway.networking.k8s.io", "name": "istio-waypoint"}
SVC = {"kind": "Service", "group": "", "name": "reviews"}
SE = {"kind": "ServiceEntry", "group": "networking.istio.io", "name": "reviews"}

SCOPE_CASES = [
    ("gateway in its namespace", [GW], "shop", REVIEWS, True),
    ("gateway, other destination", [GW], "shop", DestinationRef("shop", "ratings"), True),
    ("gateway, pod destination", [GW], "shop", None, True),
    ("gateway of same name, other namespace", [GW], "prod", DestinationRef("prod", "x"), False),
    ("gatewayclass from root namespace", [GWC], "istio-system", REVIEWS, True),
    ("service", [SVC], "shop", REVIEWS, True),
    ("service, other service", [SVC], "shop", DestinationRef("shop", "ratings"), False),
    ("service, same name other namespace", [SVC], "prod", DestinationRef("shop", "reviews"), False),
    ("service entry vs service", [SE], "shop", REVIEWS, False),
    ("service entry", [SE], "shop", DestinationRef("shop", "reviews", "ServiceEntry"), True),
    ("one of several targets", [SVC, GW], "shop", DestinationRef("shop", "other"), True),
]


@pytest.mark.parametrize(
    ("refs", "namespace", "dest", "applies"),
    [c[1:] for c in SCOPE_CASES],
    ids=[c[0] for c in SCOPE_CASES],
)
def test_applicable(refs, namespace, dest, applies):
    p = parse_l7_policy(policy([{}], targets=refs, namespace=namespace))
    assert (applicable([p], WAYPOINT, dest) == (p,)) is applies


def test_older_target_ref_field():
    doc = policy([{}])
    doc["spec"] = {"targetRef": SVC, "rules": [{}]}
    p = parse_l7_policy(doc)
    assert [str(t) for t in p.target_refs] == ["Service/reviews"]


def test_policy_without_targets_is_not_the_waypoints():
    doc = policy([{}], "DENY")
    del doc["spec"]["targetRefs"]
    assert applicable([parse_l7_policy(doc)], WAYPOINT, REVIEWS) == ()


def test_unreadable_targets_fail_closed_for_the_whole_waypoint():
    p = load_l7_policy(policy([{}], targets=[{"kind": "Gateway", "name": 7}]))
    assert p.error is not None and p.targets_unknown
    assert applicable([p], WAYPOINT, DestinationRef("shop", "anything")) == (p,)
    assert not authorize_request([p], FACTS).allowed


ERROR_CASES = [
    ("unknown spec field", {"spec": {"rule": []}}, "spec.rule: unknown field"),
    ("unknown source field", {"rules": src(principal=["x"])}, "source.principal: unknown field"),
    ("unknown operation field", {"rules": op(verbs=["GET"])}, "operation.verbs: unknown field"),
    ("bad ip", {"rules": src(ipBlocks=["10.0.0.300"])}, "ipBlocks[0]: '10.0.0.300' is not a valid"),
    ("bad port", {"rules": op(ports=["http"])}, "ports[0]: 'http' is not a port number"),
    ("port out of range", {"rules": op(ports=[70000])}, "port 70000 is not in"),
    ("list expected", {"rules": op(methods="GET")}, "methods: expected a list"),
    ("empty value", {"rules": op(methods=[""])}, "methods[0]: expected a non-empty string"),
    ("mid wildcard", {"rules": src(principals=["a*b"])}, "principals[0]: 'a*b'"),
    ("template {**} not last", {"rules": op(paths=["/{**}/x"])}, "may only be the last segment"),
    ("template partial segment", {"rules": op(paths=["/a{*}"])}, "must each be a whole path"),
    ("template with *", {"rules": op(paths=["/{*}/x*"])}, "may not contain another '*'"),
    ("empty from", {"rules": [{"from": []}]}, "from: must not be empty"),
    ("empty source", {"rules": [{"from": [{"source": {}}]}]}, "must set at least one field"),
    ("sa with namespaces", {"rules": src(serviceAccounts=["a"], namespaces=["b"])}, "cannot set"),
    ("unknown when key", {"rules": when("request.method", ["GET"])}, "not a supported key"),
    ("when without values", {"rules": when("source.ip")}, "at least one of values or notValues"),
    ("bad action", {"action": "REJECT"}, "spec.action: expected one of"),
    ("CUSTOM", {"action": "CUSTOM"}, "CUSTOM (external authorization) is not supported"),
    ("provider", {"provider": {"name": "x"}}, "spec.provider"),
    ("bad target kind", {"targets": [{"kind": "Pod", "name": "x"}]}, "kind: expected one of"),
    ("gateway without group", {"targets": [{"kind": "Gateway", "name": "w"}]}, "group"),
    (
        "gatewayclass outside root",
        {"targets": [GWC]},
        "must be in the root namespace istio-system",
    ),
    (
        "gatewayclass other name",
        {"targets": [{**GWC, "name": "istio"}], "namespace": "istio-system"},
        "targets only GatewayClass istio-waypoint",
    ),
    ("cross-namespace target", {"targets": [{**SVC, "namespace": "prod"}]}, "its own namespace"),
    ("too many targets", {"targets": [SVC] * 17}, "at most 16 targets, got 17"),
]


@pytest.mark.parametrize(
    ("change", "message"), [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES]
)
def test_validate_policy_names_the_field(change, message):
    doc = policy(
        change.get("rules", [{}]),
        change.get("action", "ALLOW"),
        namespace=change.get("namespace", "shop"),
        targets=change.get("targets"),
    )
    if "spec" in change:
        doc["spec"].update(change["spec"])
    if "provider" in change:
        doc["spec"]["provider"] = change["provider"]
    errors = validate_policy(doc)
    assert len(errors) == 1, errors
    assert errors[0].startswith("AuthorizationPolicy ")
    assert message in errors[0]
    stand_in = load_l7_policy(doc)
    assert stand_in.error == errors[0]
    assert not authorize_request([stand_in], FACTS).allowed


def test_valid_policy_has_no_errors():
    assert validate_policy(policy(op(paths=["/api/{*}/books/{**}"], methods=["GET"]))) == []


def test_not_a_resource_is_refused():
    assert validate_policy({"spec": {}})
    assert validate_policy([1, 2])
    assert not authorize_request([load_l7_policy("nonsense")], FACTS).allowed


def test_denied_response():
    resp = denied_response()
    assert resp.status == 403
    assert isinstance(resp.body, BufferedBody) and resp.body.data == b"RBAC: access denied"


def test_facts_for_request_drops_query():
    req = Request("GET", "h:80", "/a/b?x=1#f", [("x-a", "1")])
    f = facts_for(
        req,
        source_identity=None,
        source_ip=ipaddress.ip_address("::ffff:10.0.0.1"),
        destination_ip=ipaddress.ip_address("10.0.0.2"),
        destination_port=80,
    )
    assert f.path == "/a/b" and f.host == "h:80" and f.header("x-a") == "1"
    assert f.client_ip == ipaddress.ip_address("10.0.0.1") == f.original_ip
