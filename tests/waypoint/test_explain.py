"""`waypoint.explain`: the waypoint's decision for one request, computed from a MeshState
by the waypoint's own functions (no root, no sockets)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshcore.discovery import parse_resource_entry
from meshcore.state import GatewayAddress, MeshState, Service, Workload
from tests.support.mesh import authorization_policy, ips, ports, serves, service, vips, workload
from tests.waypoint.loopback import WAYPOINT_HOST, with_port_protocol
from waypoint.explain import (
    GATEWAY_NAME_LABEL,
    ExplainError,
    HttpProbe,
    explain_request,
    gateway_of,
    parse_probe,
)

BOUND = GatewayAddress(hostname=WAYPOINT_HOST)
WAYPOINT = ("shop", "waypoint")


def _svc(name: str, vip: str, protocol: str = "http", bound: bool = True) -> Service:
    s = service(name=name, namespace="shop", vips=vips(vip), ports=ports({80: 8080}),
                waypoint=BOUND if bound else None)  # fmt: skip
    return with_port_protocol(s, protocol)


WEB = _svc("web", "10.96.0.20")
REVIEWS = _svc("reviews", "10.96.0.40")
DB = _svc("db", "10.96.0.50", protocol="tcp")
OTHER = _svc("other", "10.96.0.60", bound=False)
WP_SVC = service(name="waypoint", namespace="shop", vips=vips("10.96.0.31"),
                 ports=ports({15008: 15008}))  # fmt: skip

CLIENT = workload(name="client-0", namespace="shop", service_account="client",
                  ips=ips("10.244.1.10"))  # fmt: skip


def _pod(name: str, ip: str, svc: Service, version: str = "v1") -> Workload:
    return workload(name=name, namespace="shop", service_account=svc.name, ips=ips(ip),
                    node="node2", services=serves((svc, {})),
                    labels=(("app", svc.name), ("version", version)))  # fmt: skip


PODS = [
    CLIENT,
    workload(
        name="waypoint-0",
        namespace="shop",
        service_account="waypoint",
        ips=ips("10.244.1.5"),
        services=serves((WP_SVC, {})),
        labels=((GATEWAY_NAME_LABEL, "waypoint"),),
    ),
    _pod("web-0", "10.244.2.20", WEB, "v1"),
    _pod("web-1", "10.244.2.21", WEB, "v2"),
    _pod("reviews-0", "10.244.2.40", REVIEWS),
    _pod("db-0", "10.244.2.50", DB),
    _pod("other-0", "10.244.2.60", OTHER),
]

HTTPROUTE = {
    "apiVersion": "gateway.networking.k8s.io/v1",
    "kind": "HTTPRoute",
    "metadata": {"name": "web-split", "namespace": "shop"},
    "spec": {
        "parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}],
        "rules": [
            {
                "matches": [{"path": {"type": "PathPrefix", "value": "/api"}}],
                "filters": [
                    {
                        "type": "URLRewrite",
                        "urlRewrite": {
                            "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/v1"}
                        },
                    },
                    {
                        "type": "RequestHeaderModifier",
                        "requestHeaderModifier": {"set": [{"name": "x-via", "value": "wp"}]},
                    },
                ],
                "backendRefs": [
                    {"name": "web", "port": 80, "weight": 90},
                    {"name": "reviews", "port": 80, "weight": 10},
                ],
                "timeouts": {"request": "2s"},
            },
            {
                "matches": [{"path": {"type": "PathPrefix", "value": "/old"}}],
                "filters": [
                    {
                        "type": "RequestRedirect",
                        "requestRedirect": {"statusCode": 301, "hostname": "new.example"},
                    }
                ],
            },
            {
                "matches": [{"headers": [{"name": "x-canary", "value": "1"}]}],
                "backendRefs": [{"name": "missing", "port": 80}],
            },
        ],
    },
}
VIRTUALSERVICE = {
    "apiVersion": "networking.istio.io/v1",
    "kind": "VirtualService",
    "metadata": {"name": "reviews", "namespace": "shop"},
    "spec": {
        "hosts": ["reviews"],
        "http": [
            {
                "match": [{"uri": {"prefix": "/slow"}}],
                "fault": {"delay": {"fixedDelay": "1s", "percentage": {"value": 50}}},
                "timeout": "3s",
                "retries": {"attempts": 4, "retryOn": "5xx", "perTryTimeout": "500ms"},
                "route": [{"destination": {"host": "reviews", "subset": "v1"}}],
            },
            {"route": [{"destination": {"host": "reviews"}}]},
        ],
    },
}
DESTINATIONRULE = {
    "apiVersion": "networking.istio.io/v1",
    "kind": "DestinationRule",
    "metadata": {"name": "reviews", "namespace": "shop"},
    "spec": {
        "host": "reviews",
        "trafficPolicy": {
            "loadBalancer": {"simple": "ROUND_ROBIN"},
            "connectionPool": {"tcp": {"maxConnections": 7}},
            "outlierDetection": {"consecutive5xxErrors": 3, "interval": "5s"},
        },
        "subsets": [{"name": "v1", "labels": {"version": "v1"}}],
    },
}
GET_ONLY = {
    "targetRefs": [{"kind": "Service", "group": "", "name": "web"}],
    "action": "ALLOW",
    "rules": [{"to": [{"operation": {"methods": ["GET"]}}]}],
}


def _state(resources: list[dict[str, Any]] | None = None) -> MeshState:
    docs = resources if resources is not None else [HTTPROUTE, VIRTUALSERVICE, DESTINATIONRULE]
    raw = [parse_resource_entry(doc, f"resources[{k}]") for k, doc in enumerate(docs)]
    policies = [authorization_policy("get-only", GET_ONLY, namespace="shop")]
    return MeshState.build(PODS, [WEB, REVIEWS, DB, OTHER, WP_SVC], policies, raw)


STATE = _state()


def _explain(method: str, path: str, authority: str = "10.96.0.20:80", **kw: Any) -> Any:
    probe = HttpProbe(method, path, kw.pop("host", "web:80"), tuple(kw.pop("headers", ())))
    return explain_request(STATE, WAYPOINT, authority, probe, CLIENT)


# -- the decision table -----------------------------------------------------------------------

CASES = [
    # (method, path, authority, headers, status, summary has, route matched)
    ("GET", "/api/items", "10.96.0.20:80", (), None,
     "forwarded to shop/web.shop.svc.cluster.local:80 90%", "HTTPRoute shop/web-split[0]"),
    ("GET", "/old/page", "10.96.0.20:80", (), 301,
     "301 redirect to http://new.example/old/page", "HTTPRoute shop/web-split[1]"),
    ("GET", "/", "10.96.0.20:80", (("x-canary", "1"),), 500,
     "no healthy backend", "HTTPRoute shop/web-split[2]"),
    ("GET", "/elsewhere", "10.96.0.20:80", (), 404, "route not found", None),
    ("POST", "/api/items", "10.96.0.20:80", (), 403,
     "403 RBAC: access denied: denied: ALLOW policies apply (shop/get-only)",
     "HTTPRoute shop/web-split[0]"),
    ("GET", "/slow", "10.96.0.40:80", (), None,
     "forwarded to shop/reviews.shop.svc.cluster.local:80 (subset v1)",
     "VirtualService shop/reviews[0]"),
    ("POST", "/x", "10.96.0.40:80", (), None, "forwarded to shop/reviews",
     "VirtualService shop/reviews[1]"),
    ("GET", "/", "10.96.0.50:80", (), None, "passes the bytes through as TCP", None),
    ("GET", "/", "10.96.0.60:80", (), 403, "does not use this waypoint", None),
    ("GET", "/", "10.96.9.9:80", (), 404, "neither a service nor a workload", None),
    ("GET", "/", "web:80", (), 400, "is not an ip:port", None),
    ("GET", "/", "10.244.2.40:8080", (), 403, "workload shop/reviews-0 does not use", None),
]  # fmt: skip
IDS = [
    "prefix-match-weighted-split",
    "redirect",
    "unresolved-backend-500",
    "no-match-404",
    "denied-by-allow-policy",
    "virtualservice-subset",
    "virtualservice-catch-all",
    "tcp-port-passes-through",
    "service-not-bound-refused",
    "unknown-address-refused",
    "hostname-authority-refused",
    "pod-not-bound-refused",
]


@pytest.mark.parametrize(("method", "path", "authority", "headers", "status", "summary", "route"),
                         CASES, ids=IDS)  # fmt: skip
def test_explain_decides_as_the_waypoint(
    method: str,
    path: str,
    authority: str,
    headers: tuple[tuple[str, str], ...],
    status: int | None,
    summary: str,
    route: str | None,
) -> None:
    got = _explain(method, path, authority, headers=headers)
    assert got.status == status
    assert summary in got.summary
    matched = got.decision.route if got.decision is not None else None
    assert (str(matched) if matched is not None else None) == route
    json.dumps(got.to_json())  # always JSON-able


def test_weighted_backends_each_show_their_share_rewrite_and_headers() -> None:
    got = _explain("GET", "/api/items?q=1").to_json()
    route = got["route"]
    assert route["action"] == "forward"
    assert route["rewrite"]["path"] == {"kind": "ReplacePrefixMatch", "value": "/v1"}
    assert route["requestHeaders"]["set"] == [["x-via", "wp"]]
    assert route["timeouts"] == {"request": 2.0, "backendRequest": None}
    assert route["retry"]["default"] is True  # the route sets none: Istio's default
    assert route["retry"]["attempts"] == 2
    web, reviews = got["backends"]
    assert (web["service"], web["weight"], web["share"]) == (
        "shop/web.shop.svc.cluster.local", 90, 0.9)  # fmt: skip
    assert (reviews["service"], reviews["share"]) == ("shop/reviews.shop.svc.cluster.local", 0.1)
    assert web["path"] == "/v1/items?q=1"
    assert ["x-via", "wp"] in web["headers"]
    assert web["endpoints"] == [
        "shop/web-0 10.244.2.20:8080",
        "shop/web-1 10.244.2.21:8080",
    ]
    assert web["trafficPolicy"]["loadBalancer"] == {"kind": "LEAST_REQUEST"}  # no rule: default
    assert web["trafficPolicy"]["outlierDetection"] is None
    # The reviews backend has a DestinationRule.
    assert reviews["trafficPolicy"]["loadBalancer"] == {"kind": "ROUND_ROBIN"}
    assert reviews["trafficPolicy"]["connectionPool"]["maxConnections"] == 7
    assert reviews["trafficPolicy"]["outlierDetection"]["consecutive5xxErrors"] == 3
    assert got["authorization"]["allowed"] is True
    assert got["authorization"]["policy"] == "shop/get-only"
    assert got["authorization"]["rule"] == 0
    assert got["authorization"]["policies"] == ["shop/get-only"]


def test_virtualservice_retry_timeout_fault_and_subset_endpoints() -> None:
    got = _explain("GET", "/slow", "10.96.0.40:80", host="reviews").to_json()
    route = got["route"]
    assert route["retry"] == {
        "default": False,
        "attempts": 4,
        "retryOn": ["5xx"],
        "codes": [],
        "perTryTimeout": 0.5,
    }
    assert route["timeouts"]["request"] == 3.0
    assert route["fault"] == {"delay": {"seconds": 1.0, "percent": 50.0}, "abort": None}
    (backend,) = got["backends"]
    assert backend["subset"] == "v1"
    assert backend["endpoints"] == ["shop/reviews-0 10.244.2.40:8080"]
    assert got["authorization"]["reason"] == "allowed: no ALLOW policy applies"


def test_a_virtualservice_shadowed_by_an_httproute_is_not_used() -> None:
    to_db = [{"route": [{"destination": {"host": "db"}}]}]
    vs_web = {
        **VIRTUALSERVICE,
        "metadata": {"name": "web-vs", "namespace": "shop"},
        "spec": {"hosts": ["web"], "http": to_db},
    }
    state = _state([HTTPROUTE, vs_web])
    got = explain_request(state, WAYPOINT, "10.96.0.20:80", HttpProbe("GET", "/api", "web"), CLIENT)
    assert got.decision is not None
    assert str(got.decision.route) == "HTTPRoute shop/web-split[0]"


def test_without_routes_the_default_route_goes_to_the_service() -> None:
    got = explain_request(_state([]), WAYPOINT, "10.96.0.40:80", HttpProbe("GET", "/", "r"), None)
    doc = got.to_json()
    assert doc["route"]["default"] is True and doc["route"]["matched"] is None
    assert [b["service"] for b in doc["backends"]] == ["shop/reviews.shop.svc.cluster.local"]
    assert doc["route"]["retry"]["default"] is True
    assert got.status is None


# -- finding the waypoint and reading the request --------------------------------------------


@pytest.mark.parametrize(
    ("address", "want"),
    [
        (WAYPOINT_HOST, WAYPOINT),
        (f"{WAYPOINT_HOST}:15009", WAYPOINT),
        ("10.244.1.5", WAYPOINT),
        ("/10.244.1.5", WAYPOINT),
    ],
    ids=["hostname", "hostname-with-port", "address", "network-address"],
)
def test_gateway_of_names_the_waypoint_gateway(address: str, want: tuple[str, str]) -> None:
    assert gateway_of(STATE, address) == want


@pytest.mark.parametrize(
    ("address", "error"),
    [
        ("shop/nope.shop.svc.cluster.local", "neither a service"),
        ("10.244.2.20", "is no waypoint"),
        ("10.9.9.9", "no workload"),
        ("garbage", "nor an address"),
    ],
    ids=["unknown-service", "pod-not-a-waypoint", "unknown-ip", "garbage"],
)
def test_gateway_of_refuses_what_is_no_waypoint(address: str, error: str) -> None:
    with pytest.raises(ExplainError, match=error):
        gateway_of(STATE, address)


@pytest.mark.parametrize(
    ("line", "headers", "want"),
    [
        ("GET /a?b=1", [], HttpProbe("GET", "/a?b=1", "web:80")),
        ("/a", [], HttpProbe("GET", "/a", "web:80")),
        (
            "post /x",
            ["X-Env: prod", "host: api.example"],
            HttpProbe("POST", "/x", "api.example", (("x-env", "prod"),)),
        ),
        ("GET /", ["a: 1", "a: 2"], HttpProbe("GET", "/", "web:80", (("a", "1"), ("a", "2")))),
    ],
    ids=["method-path", "path-only-is-get", "headers-and-host", "repeated-header"],
)
def test_parse_probe(line: str, headers: list[str], want: HttpProbe) -> None:
    assert parse_probe(line, headers, "web:80") == want


@pytest.mark.parametrize(
    ("line", "headers", "error"),
    [
        ("GET", [], "must be"),
        ("GET a", [], "must start with"),
        ("G3T /", [], "not an HTTP method"),
        ("GET / extra", [], "must be"),
        ("GET /", ["novalue"], "must be 'name: value'"),
        ("GET /", [": v"], "must be 'name: value'"),
        ("GET /", ["a b: v"], "must be 'name: value'"),
    ],
    ids=[
        "no-path",
        "relative-path",
        "bad-method",
        "three-words",
        "no-colon",
        "no-name",
        "space-in-name",
    ],
)
def test_parse_probe_refuses_bad_input(line: str, headers: list[str], error: str) -> None:
    with pytest.raises(ExplainError, match=error):
        parse_probe(line, headers, "web:80")


@given(st.text(max_size=40), st.lists(st.text(max_size=30), max_size=3))
def test_parse_probe_never_crashes(line: str, headers: list[str]) -> None:
    try:
        probe = parse_probe(line, headers, "web:80")
    except ExplainError:
        return
    assert probe.path.startswith("/")
    got = explain_request(STATE, WAYPOINT, "10.96.0.20:80", probe, CLIENT)
    json.dumps(got.to_json())
