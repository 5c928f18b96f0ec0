"""The dashboard's graph from fixed scrapes: edges, rates, mTLS, denials, waypoints, states;
and the Prometheus text parser it reads scrapes with."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from ambientctl.dashboard import graph, prom
from ambientctl.dashboard.graph import PodInfo, Scrape, ServiceInfo, WaypointInfo
from meshcore.observability import metrics as tcp
from waypoint.telemetry import metrics as l7

MTLS = "mutual_tls"
PODS = (
    PodInfo("shop", "client", "client", "n1", "10.244.1.10", "enrolled"),
    PodInfo("shop", "web-0", "web", "n2", "10.244.2.10", "enrolled", ports=(9000,)),
    PodInfo("shop", "web-1", "web", "n2", "10.244.2.11", "pending", "no ack yet", (9000,)),
    PodInfo("plain", "outsider", "outsider", "n1", "10.244.1.11", "not-enrolled"),
)
SERVICES = (ServiceInfo("shop", "web", "10.96.0.10", (80,)),)


def tcp_sample(name: str, value: float, **labels: str) -> prom.Sample:
    full = dict.fromkeys(tcp.LABEL_NAMES, "unknown")
    full.update(response_flags="-", request_protocol="tcp")
    full.update(labels)
    return prom.Sample(name, full, value)


def req_sample(value: float, **labels: str) -> prom.Sample:
    full = dict.fromkeys(l7.LABEL_NAMES, "unknown")
    full.update(reporter="waypoint", response_flags="-", response_code="200")
    full.update(labels)
    return prom.Sample(graph.REQUESTS, full, value)


CLIENT = {"source_workload": "client", "source_workload_namespace": "shop"}
WEB = {"destination_workload": "web", "destination_workload_namespace": "shop"}
VIA_WEB = {"destination_service_name": "web", "destination_service_namespace": "shop",
           "destination_service": "web.shop.svc.cluster.local"}  # fmt: skip


def client_to_web(opened: float, denied: float = 0) -> list[tuple[str, prom.Sample]]:
    """What both tunnels report for `opened` client -> web connections, `denied` of them
    refused by the server's policy (the server's tunnel does not know the service)."""
    out = [
        ("tunnel/n1", tcp_sample(graph.TCP_OPENED, opened, reporter="source",
                                 connection_security_policy=MTLS, **CLIENT, **WEB, **VIA_WEB)),
        ("tunnel/n2", tcp_sample(graph.TCP_OPENED, opened, reporter="destination",
                                 connection_security_policy=MTLS, **CLIENT, **WEB)),
    ]  # fmt: skip
    if denied:
        closed = tcp_sample(graph.TCP_CLOSED, denied, reporter="destination",
                            response_flags="DENY", connection_security_policy=MTLS,
                            **CLIENT, **WEB)  # fmt: skip
        out.append(("tunnel/n2", closed))
    return out


def edges(doc: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["id"]: e for e in doc["edges"]}


def test_a_connection_to_a_service_is_two_hops_counted_once_with_its_rate() -> None:
    prev = Scrape(100.0, tuple(client_to_web(10)))
    cur = Scrape(104.0, tuple(client_to_web(30)))
    doc = graph.build(prev, cur, PODS, SERVICES, ())
    e = edges(doc)
    assert set(e) == {"workload:shop/client->service:shop/web",
                      "service:shop/web->workload:shop/web"}  # fmt: skip
    hop = e["workload:shop/client->service:shop/web"]
    # Both tunnels counted the same 30 connections: 30, not 60; (30 - 10) / 4 s.
    assert hop["connections"] == 30
    assert hop["conn_rate"] == 5.0
    assert hop["security"] == "mtls"
    assert hop["denied"] == 0
    assert hop["explain"] == {"source": "shop/client", "destination": "10.96.0.10:80"}
    assert e["service:shop/web->workload:shop/web"]["explain"] is None
    assert doc["interval"] == 4.0


def test_the_first_scrape_has_totals_but_no_rates() -> None:
    doc = graph.build(None, Scrape(1.0, tuple(client_to_web(7))), PODS, SERVICES, ())
    hop = edges(doc)["workload:shop/client->service:shop/web"]
    assert (hop["connections"], hop["conn_rate"]) == (7, 0.0)


def test_a_denial_shows_on_the_edges_of_the_denied_traffic() -> None:
    prev = Scrape(0.0, tuple(client_to_web(5)))
    cur = Scrape(2.0, tuple(client_to_web(9, denied=4)))
    e = edges(graph.build(prev, cur, PODS, SERVICES, ()))
    for hop in ("workload:shop/client->service:shop/web", "service:shop/web->workload:shop/web"):
        assert e[hop]["denied"] == 4
        assert e[hop]["deny_rate"] == 2.0


def test_a_client_outside_the_mesh_is_a_plaintext_edge_to_the_pod() -> None:
    sample = tcp_sample(graph.TCP_OPENED, 3, reporter="destination", source_workload="outsider",
                        source_workload_namespace="plain", **WEB)  # fmt: skip
    e = edges(graph.build(None, Scrape(0.0, (("tunnel/n2", sample),)), PODS, SERVICES, ()))
    hop = e["workload:plain/outsider->workload:shop/web"]
    assert hop["security"] == "plaintext"
    assert hop["explain"] == {"source": "plain/outsider", "destination": "10.244.2.10:9000"}


def test_an_unnamed_client_is_the_external_node() -> None:
    sample = tcp_sample(graph.TCP_OPENED, 1, reporter="destination", **WEB)
    doc = graph.build(None, Scrape(0.0, (("tunnel/n2", sample),)), PODS, SERVICES, ())
    assert "external->workload:shop/web" in edges(doc)
    external = [n for n in doc["nodes"] if n["id"] == "external"]
    assert external and external[0]["kind"] == "external"
    assert edges(doc)["external->workload:shop/web"]["explain"] is None


def test_a_waypoint_sits_between_the_client_and_the_service() -> None:
    wp = WaypointInfo("shop", "waypoint", "waypoint", True)
    to_wp = {"destination_workload": "waypoint", "destination_workload_namespace": "shop"}
    from_wp = {"source_workload": "waypoint", "source_workload_namespace": "shop"}

    def scrape(t: float, ok: float, failed: float, rbac: float) -> Scrape:
        return Scrape(t, (
            ("tunnel/n1", tcp_sample(graph.TCP_OPENED, ok + failed + rbac, reporter="source",
                                     connection_security_policy=MTLS, **CLIENT, **to_wp,
                                     **VIA_WEB)),
            ("tunnel/n2", tcp_sample(graph.TCP_OPENED, ok + failed, reporter="destination",
                                     connection_security_policy=MTLS, **from_wp, **WEB)),
            ("waypoint/shop/waypoint", req_sample(ok, connection_security_policy=MTLS,
                                                  **CLIENT, **WEB, **VIA_WEB)),
            ("waypoint/shop/waypoint", req_sample(failed, response_code="503",
                                                  response_flags="UF", **CLIENT, **WEB,
                                                  **VIA_WEB)),
            ("waypoint/shop/waypoint", req_sample(rbac, response_code="403",
                                                  response_flags="RBAC", **CLIENT, **VIA_WEB)),
        ))  # fmt: skip

    doc = graph.build(scrape(0, 0, 0, 0), scrape(2, 6, 2, 2), PODS, SERVICES, (wp,))
    e = edges(doc)
    assert set(e) == {
        "workload:shop/client->waypoint:shop/waypoint",
        "waypoint:shop/waypoint->service:shop/web",
        "service:shop/web->workload:shop/web",
    }
    first = e["workload:shop/client->waypoint:shop/waypoint"]
    assert (first["requests"], first["req_rate"]) == (10, 5.0)
    assert first["error_rate"] == 0.2  # 2 of the 10 requests failed (503)
    assert first["denied"] == 2  # RBAC at the waypoint
    assert first["explain"] == {"source": "shop/client", "destination": "10.96.0.10:80"}
    # The denied requests never reached a workload.
    assert e["service:shop/web->workload:shop/web"]["denied"] == 0
    node = next(n for n in doc["nodes"] if n["id"] == "waypoint:shop/waypoint")
    assert (node["kind"], node["state"]) == ("waypoint", "ready")
    assert not any(n["id"] == "workload:shop/waypoint" for n in doc["nodes"])


def test_a_counter_that_went_down_was_reset_and_counts_from_zero() -> None:
    prev = Scrape(0.0, tuple(client_to_web(50)))
    cur = Scrape(2.0, tuple(client_to_web(4)))
    hop = edges(graph.build(prev, cur, PODS, SERVICES, ()))[
        "workload:shop/client->service:shop/web"
    ]
    assert hop["conn_rate"] == 2.0


def test_mixed_security_when_some_connections_are_plaintext() -> None:
    samples = (
        ("tunnel/n2", tcp_sample(graph.TCP_OPENED, 1, reporter="destination",
                                 connection_security_policy=MTLS, **CLIENT, **WEB)),
        ("tunnel/n2", tcp_sample(graph.TCP_OPENED, 1, reporter="destination", **CLIENT, **WEB)),
    )  # fmt: skip
    doc = graph.build(None, Scrape(0.0, samples), PODS, SERVICES, ())
    assert edges(doc)["workload:shop/client->workload:shop/web"]["security"] == "mixed"


def test_a_workload_shows_the_worst_state_of_its_pods() -> None:
    doc = graph.build(None, Scrape(0.0, ()), PODS, SERVICES, ())
    states = {n["id"]: n.get("state") for n in doc["nodes"]}
    assert states["workload:shop/web"] == "pending"
    assert states["workload:shop/client"] == "enrolled"
    assert states["workload:plain/outsider"] == "not-enrolled"
    web = next(n for n in doc["nodes"] if n["id"] == "workload:shop/web")
    assert [p["name"] for p in web["pods"]] == ["web-0", "web-1"]
    assert doc["edges"] == []


@pytest.mark.parametrize(
    ("in_mesh", "entry", "want"),
    [
        (True, {"state": "enrolled", "reason": ""}, ("enrolled", "")),
        (True, {"state": "failed", "reason": "no capture"}, ("failed", "no capture")),
        (True, None, ("pending", "the node agent has not reported it yet")),
        (False, None, ("not-enrolled", "")),
    ],
)
def test_pod_state(in_mesh: bool, entry: dict[str, str] | None, want: tuple[str, str]) -> None:
    assert graph.pod_state(in_mesh, entry) == want


def test_the_parser_reads_labels_with_escapes_and_skips_what_is_not_a_sample() -> None:
    text = (
        "# HELP istio_tcp_connections_opened_total The total\n"
        "# TYPE istio_tcp_connections_opened_total counter\n"
        'istio_tcp_connections_opened_total{a="x\\"y",b="c\\\\d",c="l1\\nl2"} 3\n'
        "garbage line\n"
        "istio_tcp_sockets_open 1.5\n"
        "other_metric 7\n"
        'istio_tcp_sockets_open{a="b"} not-a-number\n'
    )
    samples = prom.parse(text, graph.FAMILIES)
    assert samples == [
        prom.Sample(graph.TCP_OPENED, {"a": 'x"y', "b": "c\\d", "c": "l1\nl2"}, 3.0),
        prom.Sample(graph.TCP_OPEN, {}, 1.5),
    ]
    assert len(prom.parse(text)) == 3
