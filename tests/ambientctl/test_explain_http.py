"""`ambientctl explain --http` and `ambientctl routes`: pure renderers over what the waypoint's
own functions compute (no cluster, no root)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ambientctl import views, waypoint_views
from ambientctl.cli import build_parser
from localcluster.spec import load_cluster
from tests.waypoint import test_explain as fx
from waypoint.explain import HttpProbe, explain_request
from waypoint.l7config import ROUTE_KINDS

DEMO = Path(__file__).resolve().parents[2] / "demo" / "travel-cluster.yaml"


def _http(method: str, path: str, authority: str = "10.96.0.20:80", host: str = "web") -> Any:
    probe = HttpProbe(method, path, host)
    return explain_request(fx.STATE, fx.WAYPOINT, authority, probe, fx.CLIENT).to_json()


TUNNEL: dict[str, Any] = {
    "source": {"workload": "shop/client-0", "identity": "spiffe://cluster.local/ns/shop/sa/client"},
    "destination": {"input": "web:80", "ip": "10.96.0.20", "port": 80, "service": "shop/web"},
    "route": "HBONE",
    "reason": "through a waypoint",
    "waypoint": {
        "name": "shop/waypoint.shop.svc.cluster.local",
        "status": "used",
        "authority": "10.96.0.20:80",
    },
    "waypoint_reason": "through waypoint shop/waypoint.shop.svc.cluster.local",
    "endpoints": [],
}


# -- the tunnel's answer -> the waypoint to ask ------------------------------------------------


@pytest.mark.parametrize(
    ("doc", "want"),
    [
        (TUNNEL, ("shop/waypoint.shop.svc.cluster.local", "10.96.0.20:80")),
        (
            {**TUNNEL, "waypoint": {**TUNNEL["waypoint"], "authority": None}},
            ("shop/waypoint.shop.svc.cluster.local", "10.96.0.20:80"),
        ),
        ({**TUNNEL, "waypoint": None, "waypoint_reason": "not bound"}, "no waypoint on the path"),
        (
            {**TUNNEL, "waypoint": {**TUNNEL["waypoint"], "status": "refused"}},
            "the waypoint is not used",
        ),
        ({}, "no waypoint on the path"),
        ({"waypoint": "odd"}, "no waypoint on the path"),
    ],
    ids=["used", "authority-from-destination", "none", "refused", "empty", "odd-shape"],
)
def test_waypoint_hop(doc: dict[str, Any], want: Any) -> None:
    got = views.waypoint_hop(doc)
    if isinstance(want, str):
        assert isinstance(got, str) and got.startswith(want)
    else:
        assert got == want


# -- rendering the L7 section ----------------------------------------------------------------


def test_http_section_shows_route_backends_with_weights_filters_retry_and_verdict() -> None:
    text = views.render_explain(TUNNEL) + views.render_http(_http("GET", "/api/items"))
    assert "Waypoint:     shop/waypoint.shop.svc.cluster.local (used)" in text
    assert "HTTP (L7, at the waypoint)" in text
    assert "Request:        GET /api/items (host web)" in text
    assert "Waypoint:       shop/waypoint (CONNECT 10.96.0.20:80" in text
    assert "Route:          HTTPRoute shop/web-split[0]" in text
    assert "Rewrite:        path ReplacePrefixMatch /v1" in text
    assert "Request hdrs:   set x-via: wp" in text
    assert "Retry:          2 retries on " in text and "(Istio's default" in text
    assert "Timeouts:       request 2s, per try none" in text
    assert "authorization:  ALLOWED by policy shop/get-only rule 0 (ALLOW)" in text
    assert "- shop/web.shop.svc.cluster.local:80 weight 90 (90%)" in text
    assert "- shop/reviews.shop.svc.cluster.local:80 weight 10 (10%)" in text
    assert "sent as:        /v1/items (host web)" in text
    assert "lb:             ROUND_ROBIN" in text  # reviews' DestinationRule
    assert "pool:           maxConnections 7" in text
    assert "outlier:        eject after 3 consecutive 5xx" in text
    assert "endpoints:      shop/web-0 10.244.2.20:8080, shop/web-1 10.244.2.21:8080" in text


@pytest.mark.parametrize(
    ("method", "path", "authority", "lines"),
    [
        (
            "POST",
            "/api",
            "10.96.0.20:80",
            ["Outcome:        403 RBAC: access denied", "authorization:  DENIED"],
        ),
        (
            "GET",
            "/old/x",
            "10.96.0.20:80",
            ["Action:         redirect 301 to http://new.example/old/x"],
        ),
        (
            "GET",
            "/nope",
            "10.96.0.20:80",
            ["Route:          default", "answer 404 route not found"],
        ),
        (
            "GET",
            "/slow",
            "10.96.0.40:80",
            [
                "Fault:          delay 1s for 50.0%",
                "Retry:          4 retries on 5xx, per try 0.5s",
                "subset:         v1",
            ],
        ),
        ("GET", "/", "10.96.0.50:80", ["passes the bytes through as TCP"]),
        ("GET", "/", "10.96.0.60:80", ["refuses the CONNECT (403)"]),
    ],
    ids=["denied", "redirect", "no-route", "virtualservice-fault-retry", "tcp", "refused"],
)
def test_http_section_cases(method: str, path: str, authority: str, lines: list[str]) -> None:
    text = views.render_http(_http(method, path, authority))
    for line in lines:
        assert line in text, text


def test_without_a_waypoint_http_says_so() -> None:
    hop = views.waypoint_hop({**TUNNEL, "waypoint": None, "waypoint_reason": "not bound"})
    assert isinstance(hop, str)
    doc = views.no_waypoint({"method": "GET", "path": "/", "authority": "web:80"}, hop)
    text = views.render_http(doc)
    assert "Waypoint:       none: no waypoint on the path: not bound" in text
    out = json.loads(views.render_explain_http(TUNNEL, doc, "json"))
    assert out["http"]["waypoint"] is None and out["route"] == "HBONE"


def test_json_keeps_the_tunnels_answer_and_adds_the_waypoints() -> None:
    http = _http("GET", "/api/items")
    out = json.loads(views.render_explain_http(TUNNEL, http, "json"))
    assert {k: out[k] for k in TUNNEL} == TUNNEL
    assert out["http"] == http
    assert [b["weight"] for b in out["http"]["backends"]] == [90, 10]


def test_the_http_renderer_tolerates_odd_shapes() -> None:
    odd: list[dict[str, Any]] = [
        {},
        {"waypoint": "x", "l7": True, "route": "odd", "backends": ["odd", {}]},
        {"waypoint": "x", "l7": True, "route": {"retry": "odd"}, "authorization": 3},
    ]
    for doc in odd:
        assert views.render_http(doc).endswith("\n")


def test_explain_http_parses() -> None:
    args = build_parser().parse_args(
        ["explain", "c.yaml", "shop/a", "web:80", "--http", "GET /x", "-H", "a: 1", "-H", "b: 2"]
    )
    assert (args.http, args.header) == ("GET /x", ["a: 1", "b: 2"])
    args = build_parser().parse_args(["explain", "c.yaml", "shop/a", "web:80", "--http"])
    assert (args.http, args.header) == ("GET /", None)


# -- routes: the status the waypoint computes ------------------------------------------------


def _route_rows(docs: list[dict[str, Any]]) -> list[waypoint_views.RouteRow]:
    state = fx._state(docs)
    documents = [r.document() for kind in ROUTE_KINDS for r in state.resources(kind)]
    statuses = waypoint_views.waypoint_statuses(documents, state.services, [fx.WAYPOINT])
    return waypoint_views.routes(load_cluster(DEMO), documents, statuses)


def test_routes_show_accepted_resolved_refs_and_the_conflict() -> None:
    shadowed = {
        **fx.VIRTUALSERVICE,
        "metadata": {"name": "web-vs", "namespace": "shop"},
        "spec": {"hosts": ["web"], "http": [{"route": [{"destination": {"host": "web"}}]}]},
    }
    rows = _route_rows([fx.HTTPROUTE, fx.VIRTUALSERVICE, shadowed])
    by = {(r.kind, r.route): r for r in rows}
    route = by[("HTTPRoute", "shop/web-split")]
    assert route.service == "web"
    # The third rule names a Service that does not exist: ResolvedRefs fails, with why.
    assert route.status == ("Accepted, ResolvedRefs=False BackendNotFound: no Service shop/missing")
    assert by[("VirtualService", "shop/reviews")].status == "Accepted"
    conflict = by[("VirtualService", "shop/web-vs")].status
    assert conflict.startswith("Accepted=False Conflicted: VirtualService shop/web-vs is not")
    assert "HTTPRoute shop/web-split targets it and wins" in conflict
    text = waypoint_views.render_routes(rows)
    assert text.splitlines()[0].split() == ["NAMESPACE", "SERVICE", "KIND", "ROUTE", "STATUS"]
    assert "Conflicted" in text
    resolved = route.to_json()["conditions"][1]
    assert (resolved["type"], resolved["status"], resolved["reason"]) == (
        "ResolvedRefs",
        "False",
        "BackendNotFound",
    )


def test_a_route_on_the_waypoint_gateway_is_accepted_by_that_waypoint_only() -> None:
    def on(gateway: str) -> dict[str, Any]:
        return {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": {"name": f"via-{gateway}", "namespace": "shop"},
            "spec": {
                "parentRefs": [{"kind": "Gateway", "name": gateway}],
                "rules": [{"backendRefs": [{"name": "web", "port": 80}]}],
            },
        }

    rows = _route_rows([on("waypoint"), on("elsewhere")])
    status = {r.route: r.status for r in rows}
    assert status["shop/via-waypoint"] == "Accepted, ResolvedRefs"
    assert status["shop/via-elsewhere"].startswith("Accepted=False NoMatchingParent")


def test_an_invalid_route_says_why() -> None:
    bad = {**fx.HTTPROUTE, "metadata": {"name": "bad", "namespace": "shop"}, "spec": {"rules": 3}}
    (row,) = [r for r in _route_rows([bad]) if r.route == "shop/bad"]
    assert row.status.startswith("Accepted=False UnsupportedValue: ")
