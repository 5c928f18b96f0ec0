"""The dashboard's HTTP server: the static page, the graph as JSON, and `explain` for an edge.

Loopback only (127.0.0.1), a bounded number of requests at once, and a poller thread that
scrapes the cluster every POLL_INTERVAL whether or not a page is open, so the rates the page
shows come from successive scrapes taken at a steady pace, not from when browsers ask.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import deque
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ambientctl.dashboard import graph
from ambientctl.dashboard.collect import Poll

HOST = "127.0.0.1"
POLL_INTERVAL = 2.0
# Rates are over the oldest of the last RATE_SCRAPES scrapes (~4 s): one slow scrape does
# not make a rate jump, and a burst stays visible for a few polls.
RATE_SCRAPES = 3
MAX_ACTIVE = 16  # requests served at once; more are refused with 503
REQUEST_TIMEOUT = 10.0  # a client that stalls mid-request is dropped
STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}

Poller = Callable[[], Poll]
Explainer = Callable[[str, str], str]


def _static(name: str) -> bytes:
    return resources.files("ambientctl.dashboard").joinpath("static", name).read_bytes()


class GraphState:
    """The latest graph, rebuilt after each poll from the scrapes kept for rates."""

    def __init__(self, poller: Poller) -> None:
        self._poller = poller
        self._scrapes: deque[graph.Scrape] = deque(maxlen=RATE_SCRAPES)
        self._lock = threading.Lock()
        self._doc: dict[str, Any] = {"nodes": [], "edges": [], "errors": ["not polled yet"]}
        self.polls = 0

    def poll_once(self) -> None:
        try:
            p = self._poller()
        except Exception as e:  # the cluster went away, a file is half written: show it
            with self._lock:
                self._doc = {**self._doc, "errors": [f"poll failed: {type(e).__name__}: {e}"]}
            return
        prev = self._scrapes[0] if self._scrapes else None
        self._scrapes.append(p.scrape)
        doc = graph.build(prev, p.scrape, p.pods, p.services, p.waypoints, p.errors)
        with self._lock:
            self._doc = doc
            self.polls += 1

    def doc(self) -> dict[str, Any]:
        with self._lock:
            return self._doc

    def explain_target(self, edge_id: str) -> dict[str, str] | None:
        for e in self.doc()["edges"]:
            if e["id"] == edge_id:
                target: dict[str, str] | None = e.get("explain")
                return target
        return None


class DashboardServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 32

    def __init__(self, port: int, state: GraphState, explainer: Explainer) -> None:
        self.state = state
        self.explainer = explainer
        self._slots = threading.BoundedSemaphore(MAX_ACTIVE)
        super().__init__((HOST, port), _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            with contextlib.suppress(OSError):
                request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _Handler(BaseHTTPRequestHandler):
    server: DashboardServer
    timeout = REQUEST_TIMEOUT
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the terminal shows the URL, not every poll

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, doc: Any) -> None:
        self._send(status, json.dumps(doc).encode(), "application/json")

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path in STATIC:
            name, content_type = STATIC[url.path]
            self._send(200, _static(name), content_type)
        elif url.path == "/api/graph":
            self._json(200, self.server.state.doc())
        elif url.path == "/api/explain":
            self._explain(parse_qs(url.query).get("edge", [""])[0])
        else:
            self._json(404, {"error": f"no page {url.path}"})

    def _explain(self, edge_id: str) -> None:
        # Only an edge of the graph: the page cannot make the server ask arbitrary things.
        target = self.server.state.explain_target(edge_id)
        if target is None:
            self._json(404, {"error": f"no explainable edge {edge_id!r}"})
            return
        try:
            text = self.server.explainer(target["source"], target["destination"])
        except Exception as e:  # a tunnel down, a view error: the panel says so
            self._json(502, {"error": f"{type(e).__name__}: {e}", **target})
            return
        command = f"ambientctl explain {target['source']} {target['destination']}"
        self._json(200, {"command": command, "text": text, **target})


def serve(port: int, poller: Poller, explainer: Explainer, ready: Callable[[str], None]) -> None:
    """Serve until interrupted; `ready` gets the URL once the port is bound."""
    state = GraphState(poller)
    server = DashboardServer(port, state, explainer)
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            started = time.monotonic()
            state.poll_once()
            stop.wait(max(0.0, POLL_INTERVAL - (time.monotonic() - started)))

    poller_thread = threading.Thread(target=loop, name="dashboard-poller", daemon=True)
    poller_thread.start()
    try:
        ready(f"http://{HOST}:{server.server_address[1]}/")
        server.serve_forever(poll_interval=0.5)
    finally:
        stop.set()
        server.server_close()
        poller_thread.join(timeout=POLL_INTERVAL + 5)
