# The case tables read best one case per line.
# ruff: noqa: E501
"""Table tests for the pure decisions: retries, back-off, faults, prefix rewrites,
precedence, statuses, VirtualService conflicts, DestinationRules and the pool gate."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.waypoint.routes.support import facts, http_route, key, service
from waypoint.routes.destinationrule import ConnectionPool, LbKind
from waypoint.routes.fault import Abort, Fault, fault_decision
from waypoint.routes.filters import replace_prefix
from waypoint.routes.model import Direct, Forward
from waypoint.routes.pool import PoolVerdict, admit_request, admit_retry
from waypoint.routes.retry import (
    DEFAULT_RETRY,
    Failure,
    GrpcStatus,
    RetryPolicy,
    backoff,
    should_retry,
)
from waypoint.routes.table import RouteTable, choose_backend
from waypoint.routes.validate import validate_resource

SERVICES = (service("svc"), service("a"), service("b"), service("c"))

RETRY_CASES = [
    ("default: connect failure", DEFAULT_RETRY, 1, Failure.CONNECT_FAILURE, True),
    ("default: refused stream", DEFAULT_RETRY, 1, Failure.REFUSED_STREAM, True),
    ("default: 503 not retried", DEFAULT_RETRY, 1, 503, False),
    ("default: reset not retried", DEFAULT_RETRY, 1, Failure.RESET, False),
    ("default: grpc unavailable", DEFAULT_RETRY, 1, GrpcStatus(14), True),
    ("default: grpc cancelled", DEFAULT_RETRY, 2, GrpcStatus(1), True),
    ("default: grpc internal not retried", DEFAULT_RETRY, 1, GrpcStatus(13), False),
    ("default: third try exhausted", DEFAULT_RETRY, 3, Failure.CONNECT_FAILURE, False),
    ("5xx: 500", RetryPolicy(3, frozenset({"5xx"})), 1, 500, True),
    ("5xx: timeout", RetryPolicy(3, frozenset({"5xx"})), 1, Failure.TIMEOUT, True),
    ("5xx: 404 not", RetryPolicy(3, frozenset({"5xx"})), 1, 404, False),
    ("gateway-error: 502", RetryPolicy(3, frozenset({"gateway-error"})), 1, 502, True),
    ("gateway-error: 500 not", RetryPolicy(3, frozenset({"gateway-error"})), 1, 500, False),
    ("reset: reset", RetryPolicy(1, frozenset({"reset"})), 1, Failure.RESET, True),
    ("retriable-4xx: 409", RetryPolicy(1, frozenset({"retriable-4xx"})), 1, 409, True),
    ("codes: 503 listed", RetryPolicy(1, frozenset({"retriable-status-codes"}), frozenset({503})), 1, 503, True),
    ("zero attempts", RetryPolicy(0, frozenset({"5xx"})), 1, 500, False),
]  # fmt: skip


@pytest.mark.parametrize(("policy", "attempt", "outcome", "expected"),
                         [c[1:] for c in RETRY_CASES], ids=[c[0] for c in RETRY_CASES])  # fmt: skip
def test_should_retry(policy, attempt, outcome, expected):
    assert should_retry(policy, attempt, outcome) is expected


@pytest.mark.parametrize(
    ("attempt", "rnd", "expected"),
    [(1, 0.5, 0.0125), (2, 0.5, 0.0375), (3, 0.999, 0.174825), (4, 1.0, 0.25), (10, 0.5, 0.125), (1, 0.0, 0.0)],
    ids=["first: half of 25ms", "second: half of 75ms", "third: 175ms", "fourth: capped at 250ms", "tenth: capped", "zero"],
)  # fmt: skip
def test_backoff(attempt, rnd, expected):
    assert backoff(DEFAULT_RETRY, attempt, rnd) == pytest.approx(expected)


FAULT = Fault(delay=2.0, delay_percent=10.0, abort=Abort(http_status=503), abort_percent=50.0)


@pytest.mark.parametrize(
    ("fault", "rnd_delay", "rnd_abort", "expected"),
    [
        (None, 0.0, 0.0, (None, None)),
        (FAULT, 0.05, 0.9, (2.0, None)),
        (FAULT, 0.1, 0.49, (None, Abort(http_status=503))),
        (FAULT, 0.0, 0.0, (2.0, Abort(http_status=503))),
        (Fault(abort=Abort(grpc_status=14)), 0.99, 0.99, (None, Abort(grpc_status=14))),
        (Fault(delay=1.0, delay_percent=0.0), 0.0, 0.0, (None, None)),
    ],
    ids=["no fault", "delayed only", "aborted only", "both", "100% by default", "0% never"],
)
def test_fault_decision(fault, rnd_delay, rnd_abort, expected):
    assert fault_decision(fault, rnd_delay, rnd_abort) == expected


# The Gateway API's ReplacePrefixMatch table (HTTPPathModifier docs).
PREFIX_TABLE = [
    ("/foo", "/foo/bar", "/xyz", "/xyz/bar"), ("/foo", "/foo/bar", "/xyz/", "/xyz/bar"),
    ("/foo/", "/foo/bar", "/xyz", "/xyz/bar"), ("/foo/", "/foo/bar", "/xyz/", "/xyz/bar"),
    ("/foo", "/foo", "/xyz", "/xyz"), ("/foo/", "/foo", "/xyz", "/xyz"),
    ("/foo", "/foo/", "/xyz", "/xyz/"), ("/foo/", "/foo/", "/xyz", "/xyz/"),
    ("/foo", "/foo", "", "/"), ("/foo/", "/foo", "", "/"), ("/foo", "/foo/", "", "/"),
    ("/foo/", "/foo/", "", "/"), ("/foo", "/foo", "/", "/"), ("/foo/", "/foo", "/", "/"),
    ("/foo", "/foo/", "/", "/"), ("/foo/", "/foo/", "/", "/"),
]  # fmt: skip


@pytest.mark.parametrize(("prefix", "path", "replacement", "expected"), PREFIX_TABLE,
                         ids=[f"{p} {q} {r!r}" for p, q, r, _ in PREFIX_TABLE])  # fmt: skip
def test_replace_prefix(prefix, path, replacement, expected):
    assert replace_prefix(path, prefix, replacement) == expected


def m(path_type: str = "PathPrefix", value: str = "/", **kw: Any) -> dict[str, Any]:
    return {"path": {"type": path_type, "value": value}, **kw}


def rule(backend: str, *matches: dict[str, Any]) -> dict[str, Any]:
    return {"matches": list(matches), "backendRefs": [{"name": backend, "port": 80}]}


PRECEDENCE = [
    ("exact beats prefix", [rule("a", m(value="/x")), rule("b", m("Exact", "/x"))], facts("/x"), "b"),
    ("longest prefix", [rule("a", m(value="/x")), rule("b", m(value="/x/y"))], facts("/x/y/z"), "b"),
    ("prefix beats regex", [rule("a", m("RegularExpression", "/x/.*")), rule("b", m(value="/x"))], facts("/x/y"), "b"),
    ("method wins a tie", [rule("a", m()), rule("b", m(method="POST"))], facts("/", "POST"), "b"),
    ("more headers", [rule("a", m(headers=[{"name": "h1", "value": "1"}])),
                      rule("b", m(headers=[{"name": "h1", "value": "1"}, {"name": "h2", "value": "2"}]))],
     facts("/", headers={"h1": "1", "h2": "2"}), "b"),
    ("more query params", [rule("a", m()), rule("b", m(queryParams=[{"name": "q", "value": "1"}]))], facts("/?q=1"), "b"),
    ("rule order on a tie", [rule("a", m()), rule("b", m())], facts("/"), "a"),
    ("regex full match only", [rule("a", m("RegularExpression", "/v[0-9]")), rule("b", m(value="/"))], facts("/v12"), "b"),
    ("regex excludes query", [rule("a", m("RegularExpression", "/v[0-9]")), rule("b", m("Exact", "/z"))], facts("/v1?x=/v2"), "a"),
    ("header regex", [rule("a", m(headers=[{"type": "RegularExpression", "name": "X-V", "value": "v[12]"}])), rule("b", m())],
     facts("/", headers={"x-v": "v2"}), "a"),
    ("header value case-sensitive", [rule("a", m(headers=[{"name": "x", "value": "One"}])), rule("b", m())],
     facts("/", headers={"x": "one"}), "b"),
    ("query regex", [rule("a", m(queryParams=[{"type": "RegularExpression", "name": "q", "value": "[0-9]+"}])), rule("b", m())],
     facts("/?q=42"), "a"),
]  # fmt: skip


@pytest.mark.parametrize(("rules", "f", "expected"), [c[1:] for c in PRECEDENCE],
                         ids=[c[0] for c in PRECEDENCE])  # fmt: skip
def test_precedence(rules, f, expected):
    table = RouteTable.build([http_route(*rules)], SERVICES)
    assert choose_backend(table.select(key("svc"), 80, f), 0.0).service_key == key(expected)


def test_precedence_across_routes_oldest_first():
    old = http_route(rule("a", m()), name="z", created="2024-01-01T00:00:00Z")
    new = http_route(rule("b", m()), name="a", created="2025-01-01T00:00:00Z")
    table = RouteTable.build([new, old], SERVICES)
    decision = table.select(key("svc"), 80, facts())
    assert decision.route is not None and decision.route.name == "z"


def test_no_route_is_the_default_forward():
    decision = RouteTable.build([], SERVICES).select(key("svc"), 80, facts())
    assert decision.route is None
    assert isinstance(decision.action, Forward)
    assert decision.action.retry == DEFAULT_RETRY
    assert choose_backend(decision, 0.3).service_key == key("svc")


STATUS_CASES = [
    ("missing backend", [{"backendRefs": [{"name": "nope", "port": 80}]}], "ResolvedRefs", "BackendNotFound"),
    ("wrong kind", [{"backendRefs": [{"kind": "Pod", "name": "a", "port": 80}]}], "ResolvedRefs", "InvalidKind"),
    ("cross namespace without grant", [{"backendRefs": [{"name": "a", "namespace": "other", "port": 80}]}], "ResolvedRefs", "RefNotPermitted"),
]  # fmt: skip


@pytest.mark.parametrize(("rules", "ctype", "reason"), [c[1:] for c in STATUS_CASES],
                         ids=[c[0] for c in STATUS_CASES])  # fmt: skip
def test_status_reasons(rules, ctype, reason):
    table = RouteTable.build([http_route(*rules)], SERVICES)
    (status,) = table.statuses()
    assert any(c.type == ctype and not c.status and c.reason == reason for c in status.conditions)
    action = table.select(key("svc"), 80, facts()).action
    assert isinstance(action, Direct) and action.status == 500


def test_missing_backend_share_gets_500():
    doc = http_route(
        {
            "backendRefs": [
                {"name": "a", "port": 80, "weight": 1},
                {"name": "nope", "port": 80, "weight": 1},
            ]
        }
    )
    decision = RouteTable.build([doc], SERVICES).select(key("svc"), 80, facts())
    assert choose_backend(decision, 0.2).service_key == key("a")
    assert choose_backend(decision, 0.7).status == 500


def test_all_weights_zero_is_500():
    doc = http_route({"backendRefs": [{"name": "a", "port": 80, "weight": 0}]})
    action = RouteTable.build([doc], SERVICES).select(key("svc"), 80, facts()).action
    assert isinstance(action, Direct) and action.status == 500


def test_missing_parent_not_accepted_and_bad_document_isolated():
    bad = http_route(rule("a", m("Regex", "/")), name="bad")
    orphan = http_route(rule("a", m()), name="orphan", parent="nope")
    good = http_route(rule("b", m()), name="good")
    table = RouteTable.build([bad, orphan, good], SERVICES)
    by_name = {s.name: s for s in table.statuses()}
    assert not by_name["bad"].accepted and by_name["bad"].errors
    assert [c.reason for c in by_name["orphan"].conditions if c.type == "Accepted"] == [
        "NoMatchingParent"
    ]
    assert by_name["good"].accepted
    assert choose_backend(table.select(key("svc"), 80, facts()), 0).service_key == key("b")


def vs(name: str = "v", http: Any = None, created: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if created:
        meta["creationTimestamp"] = created
    return {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": meta,
            "spec": {"hosts": ["svc"], "http": http or [{"route": [{"destination": {"host": "c"}}]}]}}  # fmt: skip


def test_httproute_wins_over_virtual_service():
    table = RouteTable.build([vs(), http_route(rule("a", m()))], SERVICES)
    assert choose_backend(table.select(key("svc"), 80, facts()), 0).service_key == key("a")
    status = next(s for s in table.statuses() if s.kind == "VirtualService")
    (cond,) = status.conditions
    assert cond.reason == "Conflicted" and "HTTPRoute default/r" in cond.message
    assert table.messages == (cond.message,)


def test_virtual_service_alone_applies_with_fault_retries_and_order():
    http = [
        {"match": [{"uri": {"prefix": "/api"}}], "route": [{"destination": {"host": "a"}, "weight": 80},
                                                          {"destination": {"host": "b"}, "weight": 20}],
         "retries": {"attempts": 3, "retryOn": "5xx,503", "perTryTimeout": "1s"}, "timeout": "5s",
         "fault": {"abort": {"httpStatus": 418, "percentage": {"value": 50}}},
         "rewrite": {"uri": "/v2"}},
        {"route": [{"destination": {"host": "c"}}]},
    ]  # fmt: skip
    table = RouteTable.build([vs(http=http)], SERVICES)
    decision = table.select(key("svc"), 80, facts("/api/x"))
    action = decision.action
    assert isinstance(action, Forward)
    assert [b.weight for b in action.backends] == [80, 20]
    assert (
        action.retry.attempts == 3
        and 503 in action.retry.codes
        and action.retry.per_try_timeout == 1.0
    )
    assert action.timeouts.request == 5.0
    assert fault_decision(action.fault, 0, 0.4)[1] == Abort(http_status=418)
    assert choose_backend(table.select(key("svc"), 80, facts("/other")), 0).service_key == key("c")


def test_destination_rule_policy():
    dr = {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": {"name": "d"},
          "spec": {"host": "svc", "trafficPolicy": {
              "connectionPool": {"tcp": {"maxConnections": 1}, "http": {"http1MaxPendingRequests": 2}},
              "loadBalancer": {"simple": "ROUND_ROBIN"},
              "outlierDetection": {"consecutive5xxErrors": 2, "baseEjectionTime": "10s"},
              "portLevelSettings": [{"port": {"number": 80}, "loadBalancer": {"simple": "RANDOM"}}]},
              "subsets": [{"name": "v1", "labels": {"version": "v1"}}]}}  # fmt: skip
    table = RouteTable.build([dr], SERVICES)
    policy = table.traffic_policy(key("svc"))
    assert policy.pool.max_connections == 1 and policy.lb.kind is LbKind.ROUND_ROBIN
    assert policy.outlier is not None and policy.outlier.base_ejection_time == 10.0
    assert table.traffic_policy(key("svc"), 80).lb.kind is LbKind.RANDOM
    assert table.subset_labels(key("svc"), "v1") == (("version", "v1"),)
    default = table.traffic_policy(key("a"))
    assert default.lb.kind is LbKind.LEAST_REQUEST and default.outlier is None


POOL = ConnectionPool(max_connections=2, http1_max_pending_requests=1, http2_max_requests=3)


@pytest.mark.parametrize(
    ("http2", "active", "pending", "conns", "expected"),
    [(False, 0, 0, 1, PoolVerdict.PROCEED), (False, 2, 0, 2, PoolVerdict.QUEUE),
     (False, 3, 1, 2, PoolVerdict.OVERFLOW), (True, 2, 0, 1, PoolVerdict.PROCEED),
     (True, 3, 0, 1, PoolVerdict.OVERFLOW)],
    ids=["h1 below max connections", "h1 queued", "h1 overflow", "h2 below max", "h2 overflow"],
)  # fmt: skip
def test_pool_gate(http2, active, pending, conns, expected):
    verdict = admit_request(
        POOL, http2=http2, active_requests=active, pending=pending, connections=conns
    )
    assert verdict is expected


def test_retry_budget():
    assert admit_retry(ConnectionPool(max_retries=1), 0) and not admit_retry(
        ConnectionPool(max_retries=1), 1
    )


VALIDATION = [
    ("bad path type", http_route(rule("a", m("Regex", "/"))), "spec.rules[0].matches[0].path.type: 'Regex' is not one of Exact, PathPrefix, RegularExpression"),
    ("unknown field", http_route({"bogus": 1}), "spec.rules[0].bogus: unknown field"),
    ("bad regex", http_route(rule("a", m("RegularExpression", "(?=x)"))), "spec.rules[0].matches[0].path.value: '(?=x)' is not an RE2 regular expression"),
    ("bad duration", http_route({"timeouts": {"request": "1.5s"}}), "spec.rules[0].timeouts.request: '1.5s' is not a Gateway API duration"),
    ("redirect with backends", http_route({"filters": [{"type": "RequestRedirect", "requestRedirect": {}}], "backendRefs": [{"name": "a", "port": 80}]}), "must have no backendRefs"),
    ("bad status", http_route({"filters": [{"type": "RequestRedirect", "requestRedirect": {"statusCode": 304}}]}), "304 is not one of"),
    ("vs retryOn", vs(http=[{"route": [{"destination": {"host": "a"}}], "retries": {"attempts": 1, "retryOn": "bogus"}}]), "spec.http[0].retries.retryOn: 'bogus' is not a retry condition"),
    ("dr lb", {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": {"name": "d"}, "spec": {"host": "a", "trafficPolicy": {"loadBalancer": {"simple": "FASTEST"}}}}, "spec.trafficPolicy.loadBalancer.simple: 'FASTEST' is not one of"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("doc", "error"), [c[1:] for c in VALIDATION], ids=[c[0] for c in VALIDATION]
)
def test_validate_errors(doc, error):
    errors = validate_resource(doc)
    assert any(error in e for e in errors), errors


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=12,
)
keys = st.sampled_from(["apiVersion", "kind", "metadata", "spec", "rules", "matches", "path", "type", "value", "name",
                        "backendRefs", "http", "route", "destination", "host", "hosts", "parentRefs", "filters"])  # fmt: skip
structured = st.recursive(json_values, lambda inner: st.dictionaries(keys, inner, max_size=4) | st.lists(inner, max_size=3),
                          max_leaves=20)  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(
    kind=st.sampled_from(
        ["HTTPRoute", "GRPCRoute", "VirtualService", "DestinationRule", "ReferenceGrant", "X"]
    ),
    spec=structured,
)
def test_arbitrary_documents_validate_or_give_errors(kind, spec):
    version = {
        "VirtualService": "networking.istio.io/v1",
        "DestinationRule": "networking.istio.io/v1",
    }.get(kind, "gateway.networking.k8s.io/v1")
    doc = {"apiVersion": version, "kind": kind, "metadata": {"name": "x"}, "spec": spec}
    errors = validate_resource(doc)
    assert isinstance(errors, list) and all(isinstance(e, str) and e for e in errors)
    RouteTable.build([doc], SERVICES)  # never raises either
