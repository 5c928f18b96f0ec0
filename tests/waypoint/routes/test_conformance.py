# The case tables read best one case per line.
# ruff: noqa: E501
"""The Gateway API mesh conformance cases (kubernetes-sigs/gateway-api
conformance/tests/mesh), run against the route table: each case's id names the upstream
test and its case. The manifests are upstream's, in ./conformance.

Not ported, and why:
- MeshHTTPRouteWeight and MeshGRPCRouteWeight measure a distribution over real requests;
  here `choose_backend` is checked over a sweep of random numbers (the split is exact), the
  binomial check belongs to the end-to-end tier.
- MeshBasic, MeshFrontend, MeshFrontendHostname and MeshConsumerRoute need two clusters'
  worth of pods calling each other; the consumer-route rule is covered in test_table.
- MeshHTTPRouteNamedRule only checks that a rule may carry a name (parsed; see test_table).
- Response checks that need a real backend (the echoed hostname) are expressed as the
  chosen service.
"""

from __future__ import annotations

import pytest

from tests.waypoint.routes.support import MESH_NS, conformance_table, facts, key
from waypoint.routes.facts import RequestFacts
from waypoint.routes.filters import apply_request, apply_response
from waypoint.routes.model import Direct, Forward, Redirect
from waypoint.routes.table import choose_backend


def backend_of(table_name: str, f: RequestFacts, port: int = 80) -> str | int:
    decision = conformance_table(table_name).select(key("echo", MESH_NS), port, f)
    if isinstance(decision.action, Direct):
        return decision.action.status
    assert isinstance(decision.action, Forward)
    chosen = choose_backend(decision, 0.0).service_key
    assert chosen is not None
    return chosen.split("/")[1].split(".")[0]


MATCHING = [
    ("/", {}, "echo-v1"),
    ("/example", {}, "echo-v1"),
    ("/", {"Version": "one"}, "echo-v1"),
    ("/v2", {}, "echo-v2"),
    ("/v2/example", {}, "echo-v2"),
    ("/", {"Version": "two"}, "echo-v2"),
    ("/v2/", {}, "echo-v2"),
    ("/v2example", {}, "echo-v1"),
    ("/foo/v2/example", {}, "echo-v1"),
]


@pytest.mark.parametrize(
    ("path", "headers", "expected"),
    MATCHING,
    ids=[f"MeshHTTPRouteMatching/{i} {p} {h or ''} -> {e}" for i, (p, h, e) in enumerate(MATCHING)],
)
def test_matching(path, headers, expected):
    assert backend_of("httproute-matching", facts(path, headers=headers)) == expected


QUERY = [
    ("/?animal=whale", {}, "echo-v1"),
    ("/?animal=dolphin", {}, "echo-v2"),
    ("/?animal=whale&otherparam=irrelevant", {}, "echo-v1"),
    ("/?animal=dolphin&color=yellow", {}, "echo-v2"),
    ("/?color=blue", {}, 404),
    ("/?animal=dog", {}, 404),
    ("/?animal=whaledolphin", {}, 404),
    ("/", {}, 404),
    ("/path1?animal=whale", {}, "echo-v1"),
    ("/?animal=whale", {"version": "one"}, "echo-v2"),
    ("/path3?animal=shark", {}, "echo-v1"),
    ("/path4?animal=kraken", {"version": "three"}, "echo-v1"),
    ("/?animal=shark", {}, 404),
    ("/path4?animal=kraken", {}, 404),
    ("/path5?animal=hydra", {}, "echo-v1"),
]


@pytest.mark.parametrize(
    ("path", "headers", "expected"),
    QUERY,
    ids=[
        f"MeshHTTPRouteQueryParamMatching/{i} {p} {h or ''} -> {e}"
        for i, (p, h, e) in enumerate(QUERY)
    ],
)
def test_query_params(path, headers, expected):
    assert backend_of("httproute-query-param-matching", facts(path, headers=headers)) == expected


REDIRECTS = [
    ("MeshHTTPRoute303Redirect", "httproute-303-redirect", "/redirect", 303, "http://echo/redirect"),
    ("MeshHTTPRoute307Redirect", "httproute-307-redirect", "/temporary", 307, "http://echo/temporary"),
    ("MeshHTTPRoute308Redirect", "httproute-308-redirect", "/permanent", 308, "http://echo/permanent"),
    ("MeshHTTPRouteRedirectHostAndStatus", "httproute-redirect-host-and-status", "/hostname-redirect", 302, "http://example.org/hostname-redirect"),
    ("MeshHTTPRouteRedirectHostAndStatus", "httproute-redirect-host-and-status", "/host-and-status", 301, "http://example.org/host-and-status"),
    ("MeshHTTPRouteRedirectPath", "httproute-redirect-path", "/original-prefix/lemon", 302, "http://echo/replacement-prefix/lemon"),
    ("MeshHTTPRouteRedirectPath", "httproute-redirect-path", "/full/path/original", 302, "http://echo/full-path-replacement"),
    ("MeshHTTPRouteRedirectPath", "httproute-redirect-path", "/path-and-host", 302, "http://example.org/replacement-prefix"),
    ("MeshHTTPRouteRedirectPath", "httproute-redirect-path", "/path-and-status", 301, "http://echo/replacement-prefix"),
    ("MeshHTTPRouteRedirectPath", "httproute-redirect-path", "/full-path-and-host", 302, "http://example.org/replacement-full"),
    ("MeshHTTPRouteRedirectPath", "httproute-redirect-path", "/full-path-and-status", 301, "http://echo/replacement-full"),
    ("MeshHTTPRouteRedirectPort", "httproute-redirect-port", "/port", 302, "http://echo:8083/port"),
    ("MeshHTTPRouteRedirectPort", "httproute-redirect-port", "/port-and-host", 302, "http://example.org:8083/port-and-host"),
    ("MeshHTTPRouteRedirectPort", "httproute-redirect-port", "/port-and-status", 301, "http://echo:8083/port-and-status"),
    ("MeshHTTPRouteRedirectPort", "httproute-redirect-port", "/port-and-host-and-status", 302, "http://example.org:8083/port-and-host-and-status"),
    ("MeshHTTPRouteSchemeRedirect", "httproute-redirect-scheme", "/scheme", 302, "https://echo/scheme"),
    ("MeshHTTPRouteSchemeRedirect", "httproute-redirect-scheme", "/scheme-and-host", 302, "https://example.org/scheme-and-host"),
    ("MeshHTTPRouteSchemeRedirect", "httproute-redirect-scheme", "/scheme-and-status", 301, "https://echo/scheme-and-status"),
    ("MeshHTTPRouteSchemeRedirect", "httproute-redirect-scheme", "/scheme-and-host-and-status", 302, "https://example.org/scheme-and-host-and-status"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("test", "manifest", "path", "status", "location"),
    REDIRECTS,
    ids=[f"{t}/{p}" for t, _, p, _, _ in REDIRECTS],
)
def test_redirects(test, manifest, path, status, location):
    decision = conformance_table(manifest).select(key("echo", MESH_NS), 80, facts(path))
    assert decision.action == Redirect(status, location)


REWRITES = [
    ("/prefix/one/two", {}, "/one/two", {}, ()),
    ("/strip-prefix/three", {}, "/three", {}, ()),
    ("/strip-prefix", {}, "/", {}, ()),
    ("/full/one/two", {}, "/one", {}, ()),
    (
        "/full/rewrite-path-and-modify-headers/test",
        {"X-Header-Remove": "remove-val", "X-Header-Add-Append": "append-val-1", "X-Header-Set": "set-val"},
        "/test",
        {"x-header-add": "header-val-1", "x-header-add-append": "append-val-1,header-val-2", "x-header-set": "set-overwrites-values"},
        ("x-header-remove",),
    ),
    (
        "/prefix/rewrite-path-and-modify-headers/one",
        {"X-Header-Remove": "remove-val", "X-Header-Add-Append": "append-val-1", "X-Header-Set": "set-val"},
        "/prefix/one",
        {"x-header-add": "header-val-1", "x-header-add-append": "append-val-1,header-val-2", "x-header-set": "set-overwrites-values"},
        ("x-header-remove",),
    ),
]  # fmt: skip


def forwarded(manifest: str, f: RequestFacts, port: int = 80):
    decision = conformance_table(manifest).select(key("echo", MESH_NS), port, f)
    assert isinstance(decision.action, Forward), decision
    backend = choose_backend(decision, 0.0)
    path, _, headers = apply_request(decision.action, backend, f.path, f.authority, f.headers)
    joined: dict[str, str] = {}
    for n, v in headers:
        joined[n] = f"{joined[n]},{v}" if n in joined else v
    return backend, path, joined


@pytest.mark.parametrize(
    ("path", "headers", "out_path", "expected", "absent"),
    REWRITES,
    ids=[f"MeshHTTPRouteRewritePath/{i} {r[0]}" for i, r in enumerate(REWRITES)],
)
def test_rewrites(path, headers, out_path, expected, absent):
    _, sent_path, sent = forwarded("httproute-rewrite-path", facts(path, headers=headers))
    assert sent_path == out_path
    for name, value in expected.items():
        assert sent[name] == value
    for name in absent:
        assert name not in sent


HEADER_CASES = [
    ("/set", {"Some-Other-Header": "val"}, {"some-other-header": "val", "x-header-set": "set-overwrites-values"}, ()),
    ("/set", {"Some-Other-Header": "val", "X-Header-Set": "some-other-value"}, {"some-other-header": "val", "x-header-set": "set-overwrites-values"}, ()),
    ("/add", {"Some-Other-Header": "val"}, {"some-other-header": "val", "x-header-add": "add-appends-values"}, ()),
    ("/add", {"Some-Other-Header": "val", "X-Header-Add": "some-other-value"}, {"some-other-header": "val", "x-header-add": "some-other-value,add-appends-values"}, ()),
    ("/remove", {"X-Header-Remove": "val"}, {}, ("x-header-remove",)),
    (
        "/multiple",
        {"X-Header-Set-2": "set-val-2", "X-Header-Add-2": "add-val-2", "X-Header-Remove-2": "remove-val-2", "Another-Header": "another-header-val"},
        {"x-header-set-1": "header-set-1", "x-header-set-2": "header-set-2", "x-header-add-1": "header-add-1", "x-header-add-2": "add-val-2,header-add-2", "x-header-add-3": "header-add-3", "another-header": "another-header-val"},
        ("x-header-remove-1", "x-header-remove-2"),
    ),
    (
        "/case-insensitivity",
        {"x-header-set": "original-val-set", "x-header-add": "original-val-add", "x-header-remove": "original-val-remove", "Another-Header": "another-header-val"},
        {"x-header-set": "header-set", "x-header-add": "original-val-add,header-add", "another-header": "another-header-val"},
        ("x-header-remove",),
    ),
]  # fmt: skip


@pytest.mark.parametrize(
    "manifest",
    ["httproute-request-header-modifier", "httproute-request-header-modifier-backend"],
    ids=[
        "MeshHTTPRouteRequestHeaderModifier",
        "MeshHTTPRouteRequestHeaderModifier(backend filters)",
    ],
)
@pytest.mark.parametrize(
    ("path", "headers", "expected", "absent"),
    HEADER_CASES,
    ids=[f"{i} {c[0]}" for i, c in enumerate(HEADER_CASES)],
)
def test_request_header_modifier(manifest, path, headers, expected, absent):
    backend, _, sent = forwarded(manifest, facts(path, headers=headers), port=80)
    assert backend.service_key == key("echo-v1", MESH_NS)
    for name, value in expected.items():
        assert sent[name] == value
    for name in absent:
        assert name not in sent


GRPC_HEADER_CASES = [
    ("set", {"some-other-header": "this-header-should-be-set", "x-header-set": "this-value-should-be-overwritten"}, "echo-v1", {"x-test-case": "set", "some-other-header": "this-header-should-be-set", "x-header-set": "set-overwrites-values"}, ()),
    ("add", {"x-header-add": "this-value-should-be-appended"}, "echo-v1", {"x-test-case": "add", "x-header-add": "this-value-should-be-appended,add-appends-values"}, ()),
    ("remove", {"x-header-remove": "this-should-be-removed"}, "echo-v1", {"x-test-case": "remove"}, ("x-header-remove",)),
    ("multi", {"x-header-set-2": "set-header-2", "x-header-add-2": "add-header-2", "x-header-remove-2": "should-be-removed-2"}, "echo-v2", {"x-test-case": "multi", "x-header-set-1": "header-set-1", "x-header-set-2": "header-set-2", "x-header-add-1": "header-add-1", "x-header-add-2": "add-header-2,header-add-2"}, ("x-header-remove-1", "x-header-remove-2")),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "headers", "target", "expected", "absent"),
    GRPC_HEADER_CASES,
    ids=[f"MeshGRPCRouteRequestHeaderModifier/{c[0]}" for c in GRPC_HEADER_CASES],
)
def test_grpc_request_header_modifier(case, headers, target, expected, absent):
    f = facts("/grpc.testing.TestService/EmptyCall", "POST", {"x-test-case": case, **headers},
              authority="echo:7070", is_grpc=True)  # fmt: skip
    backend, _, sent = forwarded("grpcroute-request-header-modifier", f, port=7070)
    assert backend.service_key == key(target, MESH_NS)
    for name, value in expected.items():
        assert sent[name] == value
    for name in absent:
        assert name not in sent


def shares(manifest: str, port: int, f: RequestFacts) -> dict[str, int]:
    decision = conformance_table(manifest).select(key("echo", MESH_NS), port, f)
    counts: dict[str, int] = {}
    for i in range(1000):
        chosen = choose_backend(decision, i / 1000).service_key
        assert chosen is not None
        name = chosen.split("/")[1].split(".")[0]
        counts[name] = counts.get(name, 0) + 1
    return counts


def test_weight_sweep():
    """MeshHTTPRouteWeight: 70/30, exactly, over a sweep of the random number."""
    assert shares("httproute-weight", 80, facts()) == {"echo-v1": 700, "echo-v2": 300}


def test_grpc_weight_sweep():
    """MeshGRPCRouteWeight: 70/30/0; the backend of weight 0 never gets a request."""
    f = facts("/svc/Method", "POST", authority="echo:7070", is_grpc=True)
    assert shares("grpcroute-weight", 7070, f) == {"echo-v1": 700, "echo-v2": 300}


MESH_PORTS = [
    ("echo-v1", 80, "v1"),
    ("echo-v1", 8080, None),
    ("echo-v2", 80, "v2"),
    ("echo-v2", 8080, "v2"),
]


@pytest.mark.parametrize(
    ("svc", "port", "header"),
    MESH_PORTS,
    ids=[
        "MeshPorts/Explicit port set, send to that port",
        "MeshPorts/Explicit port, send to an excluded port",
        "MeshPorts/No port set (80)",
        "MeshPorts/No port set (8080)",
    ],
)
def test_mesh_ports(svc, port, header):
    decision = conformance_table("mesh-ports").select(key(svc, MESH_NS), port, facts(authority=svc))
    assert isinstance(decision.action, Forward)
    backend = choose_backend(decision, 0.5)
    assert backend.service_key == key(svc, MESH_NS)
    sent = dict(apply_response(decision.action, backend, []))
    assert sent.get("x-header-set") == header
    assert (decision.route is None) == (header is None)


@pytest.mark.parametrize(
    ("path", "target"),
    [("/v1", "echo-v1"), ("/v2", "echo-v2")],
    ids=["MeshSplit/v1", "MeshSplit/v2"],
)
def test_mesh_split(path, target):
    assert backend_of("mesh-split", facts(path, authority="echo")) == target


def test_simple_same_namespace():
    """MeshHTTPRouteSimpleSameNamespace: every request to echo goes to echo-v1."""
    assert backend_of("httproute-simple-same-namespace", facts("/anything")) == "echo-v1"
