"""HTTP/1.1 through the waypoint on loopback: the router's decisions carried out for real
(routes, weights, filters, authorization, retries, timeouts, faults, metrics), each request
an HBONE CONNECT stream to the waypoint as the client's tunnel sends it, each upstream leg
HBONE to the endpoint's tunnel."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshcore.sockets import SocketAddr
from meshcore.state import HealthStatus, MeshState, Service
from tests.support.aio import Loop
from tests.waypoint.apps import app, get, parse
from tests.waypoint.loopback import CLIENT_ID, start_mesh
from waypoint import router as router_module
from waypoint.destination import Destination, L7Protocol
from waypoint.endpoints import Endpoint, service_endpoints
from waypoint.routes.model import Backend
from waypoint.server import Inbound
from waypoint.telemetry import tracing


@pytest.fixture
def aio() -> Iterator[Loop]:
    loop = Loop("uvloop")
    yield loop
    loop.close()


def route(name: str, rules: list[dict[str, object]], parent: str = "web") -> dict[str, object]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": parent}],
                 "rules": rules},
    }  # fmt: skip


def backend(name: str, weight: int = 1) -> dict[str, object]:
    return {"name": name, "port": 80, "weight": weight}


def test_a_request_reaches_the_service_through_the_waypoint(aio: Loop) -> None:
    async def main() -> None:
        mesh = await start_mesh(aio, {"web": [app("web-a")]})
        status, _, body = parse(await mesh.request("web", get("/hello?x=1")))
        assert status == 200
        info = json.loads(body)
        assert info["app"] == "web-a" and info["path"] == "/hello?x=1"
        # The waypoint added a request id and a trace context the app can propagate.
        assert info["headers"]["x-request-id"]
        assert info["headers"]["traceparent"].startswith("00-")
        metrics = mesh.lw.waypoint.render().decode()
        total = sum(
            s.value
            for f in text_string_to_metric_families(metrics)
            for s in f.samples
            if s.name == "istio_requests_total"
            and s.labels["reporter"] == "waypoint"
            and s.labels["response_code"] == "200"
            and s.labels["destination_service_name"] == "web"
            and s.labels["source_principal"] == "spiffe://cluster.local/ns/shop/sa/client"
        )
        assert total == 1

    aio.run(main)


def test_without_an_exporter_the_trace_goes_on_but_no_span_is_made(
    aio: Loop, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[str] = []
    real = tracing.Span

    def counted(*args: Any, **kwargs: Any) -> tracing.Span:
        span = real(*args, **kwargs)
        made.append(span.name)
        return span

    monkeypatch.setattr(tracing, "Span", counted)

    async def main() -> None:
        mesh = await start_mesh(aio, {"web": [app("web-a")]})
        assert mesh.lw.waypoint.exporter is None
        parent = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
        request = get("/", headers=f"traceparent: {parent}\r\n")
        status, _, body = parse(await mesh.request("web", request))
        assert status == 200
        sent = json.loads(body)["headers"]["traceparent"]
        # Same trace, the waypoint's own span id as the parent of the upstream's.
        assert sent.startswith("00-" + "ab" * 16 + "-") and "cd" * 8 not in sent
        assert made == []

    aio.run(main)


def test_weights_split_between_versions(aio: Loop) -> None:
    split = route("split", [{"backendRefs": [backend("web-v1", 90), backend("web-v2", 10)]}])

    async def main() -> None:
        mesh = await start_mesh(
            aio,
            {"web": [app("web")], "web-v1": [app("v1")], "web-v2": [app("v2")]},
            resources=[split],
        )
        served = {"v1": 0, "v2": 0}
        for _ in range(100):
            _, headers, _ = parse(await mesh.request("web", get("/")))
            served[headers["x-served-by"]] += 1
        # Binomial(100, 0.1): mean 10, sd 3; 1..22 is 3 sd or more either way. (The e2e
        # tier checks the split over 1000 requests through both tunnels.)
        assert 1 <= served["v2"] <= 22, served
        assert served["v1"] + served["v2"] == 100

    aio.run(main, limit=120)


def test_matches_and_filters(aio: Loop) -> None:
    rules = route(
        "rules",
        [
            {
                "matches": [{"path": {"type": "PathPrefix", "value": "/v2"}}],
                "filters": [
                    {"type": "URLRewrite",
                     "urlRewrite": {"path": {"type": "ReplacePrefixMatch",
                                             "replacePrefixMatch": "/"}}},
                    {"type": "RequestHeaderModifier",
                     "requestHeaderModifier": {"set": [{"name": "x-canary", "value": "yes"}]}},
                    {"type": "ResponseHeaderModifier",
                     "responseHeaderModifier": {"add": [{"name": "x-route", "value": "v2"}]}},
                ],
                "backendRefs": [backend("web-v2")],
            },
            {
                "matches": [{"path": {"type": "Exact", "value": "/old"}}],
                "filters": [{"type": "RequestRedirect",
                             "requestRedirect": {"path": {"type": "ReplaceFullPath",
                                                          "replaceFullPath": "/new"},
                                                 "statusCode": 301}}],
            },
            {"matches": [{"method": "POST"}], "backendRefs": [backend("web-v1")]},
        ],
    )  # fmt: skip

    async def main() -> None:
        mesh = await start_mesh(
            aio, {"web": [app("web")], "web-v1": [app("v1")], "web-v2": [app("v2")]},
            resources=[rules],
        )  # fmt: skip
        status, headers, body = parse(await mesh.request("web", get("/v2/items")))
        info = json.loads(body)
        assert (status, info["app"], info["path"]) == (200, "v2", "/items")
        assert info["headers"]["x-canary"] == "yes" and headers["x-route"] == "v2"
        status, headers, _ = parse(await mesh.request("web", get("/old")))
        assert status == 301 and headers["location"] == "http://web/new"
        status, _, body = parse(await mesh.request("web", get("/x", method="POST", body=b"{}")))
        assert json.loads(body)["app"] == "v1"
        # Routes exist for the service, none matches: 404.
        status, _, _ = parse(await mesh.request("web", get("/nothing")))
        assert status == 404

    aio.run(main)


def test_l7_policy_denies_post_and_allows_get(aio: Loop) -> None:
    policy = {
        "name": "get-only",
        "spec": {
            "targetRefs": [{"kind": "Service", "group": "", "name": "web"}],
            "action": "ALLOW",
            "rules": [{"to": [{"operation": {"methods": ["GET"]}}]}],
        },
    }

    async def main() -> None:
        mesh = await start_mesh(aio, {"web": [app("web")]}, policies=[policy])
        status, _, _ = parse(await mesh.request("web", get("/")))
        assert status == 200
        status, _, body = parse(await mesh.request("web", get("/", method="POST", body=b"x")))
        assert (status, body) == (403, b"RBAC: access denied")

    aio.run(main)


def test_retries_hide_a_backend_that_resets_one_connection_in_three(aio: Loop) -> None:
    # Istio's default policy does not retry a reset (only connect-failure, refused-stream,
    # unavailable, cancelled): the VirtualService asks for it, as users do.
    vs = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "retry", "namespace": "shop"},
        "spec": {
            "hosts": ["web.shop.svc.cluster.local"],
            "http": [
                {
                    "route": [{"destination": {"host": "web.shop.svc.cluster.local"}}],
                    "retries": {"attempts": 3, "retryOn": "reset,connect-failure"},
                }
            ],
        },
    }

    async def main() -> None:
        mesh = await start_mesh(aio, {"web": [app("flaky", reset_every=3)]}, resources=[vs])
        statuses = [parse(await mesh.request("web", get("/")))[0] for _ in range(30)]
        assert statuses == [200] * 30
        text = mesh.lw.waypoint.render().decode()
        assert 'response_code="503"' not in text

    aio.run(main, limit=120)


def test_without_a_retry_policy_for_resets_the_reset_is_a_503(aio: Loop) -> None:
    async def main() -> None:
        mesh = await start_mesh(aio, {"web": [app("flaky", reset_every=1)]})
        status, _, body = parse(await mesh.request("web", get("/")))
        assert status == 503 and b"reset" in body
        assert 'response_flags="UC"' in mesh.lw.waypoint.render().decode()

    aio.run(main)


def test_a_request_timeout_is_a_504(aio: Loop) -> None:
    slow = route("slow", [{"backendRefs": [backend("web")], "timeouts": {"request": "200ms"}}])

    async def main() -> None:
        mesh = await start_mesh(aio, {"web": [app("slow", delay=2.0)]}, resources=[slow])
        status, _, body = parse(await mesh.request("web", get("/")))
        assert status == 504 and b"timeout" in body
        text = mesh.lw.waypoint.render().decode()
        assert 'response_flags="UT"' in text

    aio.run(main)


def test_connection_pool_overflow_is_503_uo(aio: Loop) -> None:
    rule = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": "tight", "namespace": "shop"},
        "spec": {
            "host": "web.shop.svc.cluster.local",
            "trafficPolicy": {
                "connectionPool": {
                    "tcp": {"maxConnections": 1},
                    "http": {"http1MaxPendingRequests": 1},
                }
            },
        },
    }

    async def main() -> None:
        mesh = await start_mesh(aio, {"web": [app("web", delay=0.5)]}, resources=[rule])
        answers = await asyncio.gather(*(mesh.request("web", get("/")) for _ in range(6)))
        statuses = sorted(parse(a)[0] for a in answers)
        assert 200 in statuses and 503 in statuses, statuses
        assert 'response_flags="UO"' in mesh.lw.waypoint.render().decode()

    aio.run(main)


def test_fault_injection_aborts_and_delays(aio: Loop) -> None:
    vs = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "faulty", "namespace": "shop"},
        "spec": {
            "hosts": ["web.shop.svc.cluster.local"],
            "http": [
                {
                    "match": [{"uri": {"prefix": "/abort"}}],
                    "fault": {"abort": {"httpStatus": 418, "percentage": {"value": 100}}},
                    "route": [{"destination": {"host": "web.shop.svc.cluster.local"}}],
                },
                {"route": [{"destination": {"host": "web.shop.svc.cluster.local"}}]},
            ],
        },
    }

    async def main() -> None:
        mesh = await start_mesh(aio, {"web": [app("web")]}, resources=[vs])
        status, _, body = parse(await mesh.request("web", get("/abort")))
        assert (status, body) == (418, b"fault filter abort")
        status, _, _ = parse(await mesh.request("web", get("/fine")))
        assert status == 200

    aio.run(main)


def test_request_mirror_copies_to_the_shadow_and_ignores_its_answer(aio: Loop) -> None:
    mirror = route(
        "mirror",
        [
            {
                "backendRefs": [backend("web")],
                "filters": [
                    {"type": "RequestMirror",
                     "requestMirror": {"backendRef": {"name": "shadow", "port": 80}}},
                ],
            }
        ],
    )  # fmt: skip
    shadow_seen: list[dict[str, Any]] = []

    async def main() -> None:
        mesh = await start_mesh(
            aio,
            {"web": [app("web")], "shadow": [app("shadow", status=500, seen=shadow_seen)]},
            resources=[mirror],
        )
        for _ in range(3):
            status, headers, _ = parse(await mesh.request("web", get("/copy")))
            assert status == 200 and headers["x-served-by"] == "web"  # the shadow's 500 unseen
        for _ in range(100):
            if len(shadow_seen) == 3:
                break
            await asyncio.sleep(0.02)
        assert [s["path"] for s in shadow_seen] == ["/copy"] * 3
        # Envoy's convention: the copy's Host says it is a shadow.
        assert all(str(s["headers"]["host"]).endswith("-shadow") for s in shadow_seen)

    aio.run(main)


def test_answers_without_a_body_give_their_upstream_connection_back(aio: Loop) -> None:
    """HEAD (and 204, 304) answers have no body for anyone to read to its end: the upstream
    connection must still go back to the pool, not stay open and counted for ever."""

    async def main() -> None:
        mesh = await start_mesh(aio, {"web": [app("web")]})
        for _ in range(5):
            status, _, body = parse(await mesh.request("web", get("/", method="HEAD")))
            assert (status, body) == (200, b"")
        (cluster,) = mesh.lw.waypoint.router._clusters.values()
        assert cluster.connections == 1 and cluster.idle_count == 1

    aio.run(main)


def test_endpoints_are_listed_once_per_mesh_state_and_follow_a_change(
    aio: Loop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request does not rebuild its service's endpoint list (a cost that grows with the
    service's pods) while the mesh state and config are the ones it was built from; a new
    state (a pod turned unhealthy) is followed from the next request on."""
    built: list[str] = []
    listing = service_endpoints
    web = "shop/web.shop.svc.cluster.local"  # the service's key

    def counted(state: MeshState, svc: Service, port: int) -> tuple[Endpoint, ...]:
        built.append(svc.key)
        return listing(state, svc, port)

    monkeypatch.setattr(router_module, "service_endpoints", counted)

    async def main() -> None:
        mesh = await start_mesh(aio, {"web": [app("web-a"), app("web-b")]})
        wp = mesh.lw.waypoint

        async def served_by(n: int) -> set[str]:
            seen = set()
            for _ in range(n):
                status, headers, _ = parse(await mesh.request("web", get("/")))
                assert status == 200
                seen.add(headers["x-served-by"])
            return seen

        # Least request among two drawn at random: both pods within 20 requests.
        assert await served_by(20) == {"web-a", "web-b"}
        assert built == [web]  # listed once, for the first request
        state = wp.state
        unhealthy = [
            dataclasses.replace(w, status=HealthStatus.UNHEALTHY) if w.name == "web-1" else w
            for w in state.workloads
        ]
        wp._on_state(MeshState.build(unhealthy, state.services, state.policies))
        assert await served_by(10) == {"web-a"}
        assert built == [web, web]  # again once, for the new state

    aio.run(main)


def test_destinations_holding_nothing_are_dropped_beyond_the_bound(
    aio: Loop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pod dialled directly through the waypoint at port after port must not leave a
    destination's state behind for each: beyond the bound, the ones without a request or
    a connection are dropped; one holding an upstream connection stays."""
    monkeypatch.setattr(router_module, "MAX_CLUSTERS", 8)

    async def main() -> None:
        mesh = await start_mesh(aio, {"web": [app("web-a")]})
        wp = mesh.lw.waypoint
        router, state, cfg = wp.router, wp.state, wp.l7
        (pod,) = [w for w in state.workloads if w.name == "web-0"]
        status, _, _ = parse(await mesh.request("web", get("/")))
        assert status == 200
        (busy,) = router._clusters.values()  # the service's, holding its idle connection
        assert busy.connections == 1
        client = SocketAddr.of((mesh.lw.client_ip, 40000))
        for port in range(1000, 1040):
            dest = Destination(str(pod.ips[0]), port, None, pod, L7Protocol.HTTP)
            inbound = Inbound(CLIENT_ID, client, dest, [])
            router._cluster(state, cfg, inbound, Backend(None, port), port)
            assert len(router._clusters) <= 8
        assert busy in router._clusters.values()  # it holds a connection: kept
        assert ("pod/" + str(pod.ips[0]), 1039, None) in router._clusters  # the newest
        status, _, _ = parse(await mesh.request("web", get("/")))
        assert status == 200 and busy.connections == 1  # its connection served again

    aio.run(main)
