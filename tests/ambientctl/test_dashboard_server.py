"""The dashboard's HTTP server on loopback, with a poller of fixed scrapes: the page and its
assets, the graph with rates from successive polls, explain only for an edge of the graph."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from ambientctl.cli import build_parser, main
from ambientctl.dashboard import DEFAULT_PORT, graph, server
from ambientctl.dashboard.collect import Poll

from .test_dashboard_graph import PODS, SERVICES, client_to_web

EDGE = "workload:shop/client->service:shop/web"


class FakeCluster:
    def __init__(self) -> None:
        self.opened = 0.0
        self.t = 0.0
        self.explained: list[tuple[str, str]] = []

    def poll(self) -> Poll:
        self.opened += 10
        self.t += 2
        scrape = graph.Scrape(self.t, tuple(client_to_web(self.opened)))
        return Poll(scrape, PODS, SERVICES, (), ())

    def explain(self, source: str, destination: str) -> str:
        self.explained.append((source, destination))
        return f"Source:       {source}\n"


@pytest.fixture
def served() -> Iterator[tuple[str, server.GraphState, FakeCluster]]:
    fake = FakeCluster()
    state = server.GraphState(fake.poll)
    srv = server.DashboardServer(0, state, fake.explain)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1})
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", state, fake
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=10)


def get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read()


def get_json(url: str) -> tuple[int, Any]:
    status, _, body = get(url)
    return status, json.loads(body)


def test_the_page_and_its_assets_are_served_from_the_package(
    served: tuple[str, server.GraphState, FakeCluster],
) -> None:
    base, _, _ = served
    status, ctype, body = get(base + "/")
    assert status == 200 and ctype.startswith("text/html")
    page = body.decode()
    assert '<script src="/app.js">' in page and 'href="/style.css"' in page
    # No external assets: nothing the page loads comes from another host.
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in page
    for path, kind in (("/app.js", "text/javascript"), ("/style.css", "text/css")):
        status, ctype, body = get(base + path)
        assert status == 200 and ctype.startswith(kind) and body
    assert get(base + "/nothing")[0] == 404


def test_the_graph_has_rates_from_successive_polls(
    served: tuple[str, server.GraphState, FakeCluster],
) -> None:
    base, state, _ = served
    status, doc = get_json(base + "/api/graph")
    assert status == 200 and doc["errors"] == ["not polled yet"]
    state.poll_once()
    state.poll_once()
    _, doc = get_json(base + "/api/graph")
    edge = next(e for e in doc["edges"] if e["id"] == EDGE)
    assert (edge["connections"], edge["conn_rate"]) == (20, 5.0)


def test_explain_answers_only_for_an_edge_of_the_graph(
    served: tuple[str, server.GraphState, FakeCluster],
) -> None:
    base, state, fake = served
    state.poll_once()
    status, doc = get_json(base + "/api/explain?edge=" + urllib.parse.quote(EDGE))
    assert status == 200
    assert doc["command"] == "ambientctl explain shop/client 10.96.0.10:80"
    assert doc["text"].startswith("Source:       shop/client")
    status, doc = get_json(base + "/api/explain?edge=anything")
    assert status == 404 and "no explainable edge" in doc["error"]
    assert fake.explained == [("shop/client", "10.96.0.10:80")]


def test_a_failed_poll_is_shown_not_raised() -> None:
    def broken() -> Poll:
        raise OSError("cluster gone")

    state = server.GraphState(broken)
    state.poll_once()
    assert state.doc()["errors"] == ["poll failed: OSError: cluster gone"]


def test_the_command_line() -> None:
    args = build_parser().parse_args(["dashboard", "c.yaml", "--port", "0", "--no-browser"])
    assert (args.port, args.no_browser) == (0, True)
    args = build_parser().parse_args(["dashboard"])
    assert (args.port, args.no_browser) == (DEFAULT_PORT, False) and DEFAULT_PORT == 20001
    for bad in ("65536", "-1", "http"):
        assert main(["dashboard", "c.yaml", "--port", bad]) == 2
