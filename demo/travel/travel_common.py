"""What the three travel services share: identity, service discovery, JSON over HTTP/1.1.

The apps know nothing of the mesh. They behave like ordinary Kubernetes workloads:
- other services are found only through `<NAME>_SERVICE_HOST` / `<NAME>_SERVICE_PORT`;
- a pod learns who it is from POD_NAME / POD_NAMESPACE / POD_IP / NODE_NAME;
- every answer is JSON; `GET /healthz` answers 200 "ok";
- a failed downstream call becomes 502 with a JSON body naming that downstream;
- SIGTERM (or SIGINT) stops the server cleanly and the process exits 0.

Handlers are plain functions of a `Request` (and an injected `Fetch`) returning a `Response`,
so the decisions can be tested without sockets. Only `serve` and `http_fetch` do I/O.

This file sits next to the scripts, which run as `python travel/<app>.py`; Python puts the
script's directory first on sys.path, so `import travel_common` works without path tricks.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import struct
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

DEFAULT_TIMEOUT_S = 5.0
ENV_POD_NAME = "POD_NAME"
ENV_POD_NAMESPACE = "POD_NAMESPACE"
ENV_POD_IP = "POD_IP"
ENV_NODE_NAME = "NODE_NAME"
SERVED_BY_HEADER = "X-Served-By"


class ConfigError(ValueError):
    """The environment lacks something the app needs (e.g. a service's address)."""


class BadRequest(ValueError):
    """The caller sent a request this service cannot answer (answered with 400)."""


class DownstreamError(Exception):
    """A call to another service failed; answered with 502 naming `service`.

    `cause` carries the downstream's own JSON error body, if it sent one, so a chain of
    failures (frontend -> flights -> pricing) still names the service that really failed.
    """

    def __init__(
        self,
        service: str,
        reason: str,
        cause: Mapping[str, Any] | None = None,
        status: int | None = None,
    ):
        super().__init__(f"{service}: {reason}")
        self.service = service
        self.reason = reason
        self.cause = cause
        self.status = status  # the downstream's HTTP status, when it answered at all

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.reason, "downstream": self.service}
        if self.cause is not None:
            out["cause"] = dict(self.cause)
        return out


@dataclass(frozen=True, slots=True)
class PodIdentity:
    """Who this process is, as the cluster told it through the environment."""

    name: str
    namespace: str
    ip: str
    node: str

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> PodIdentity:
        # Outside a cluster (a developer running a script by hand) fall back to the host
        # name rather than refusing to start: identity is reported, never relied on.
        return cls(
            name=env.get(ENV_POD_NAME) or socket.gethostname(),
            namespace=env.get(ENV_POD_NAMESPACE) or "default",
            ip=env.get(ENV_POD_IP, ""),
            node=env.get(ENV_NODE_NAME) or "unknown",
        )


@dataclass(frozen=True, slots=True)
class ServiceAddress:
    """Where a named service listens, from Kubernetes-style environment variables."""

    name: str
    host: str
    port: int

    @classmethod
    def from_env(cls, name: str, env: Mapping[str, str]) -> ServiceAddress:
        prefix = name.upper().replace("-", "_")
        host_var, port_var = f"{prefix}_SERVICE_HOST", f"{prefix}_SERVICE_PORT"
        host = env.get(host_var, "")
        port_text = env.get(port_var, "")
        if not host or not port_text:
            raise ConfigError(
                f"service {name!r} has no address: set {host_var} and {port_var} "
                "(a cluster sets them for every service in the pod's namespace)"
            )
        try:
            port = int(port_text)
        except ValueError:
            raise ConfigError(f"{port_var}={port_text!r} is not a port number") from None
        if not 0 < port < 65536:
            raise ConfigError(f"{port_var}={port} is outside 1..65535")
        return cls(name, host, port)


@dataclass(frozen=True, slots=True)
class Request:
    """One incoming request, reduced to what handlers decide on."""

    path: str
    query: Mapping[str, str]
    client_ip: str

    def param(self, key: str) -> str:
        value = self.query.get(key, "")
        if not value:
            raise BadRequest(f"missing query parameter {key!r}")
        return value


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: Any = field(default=None)


# A GET to another service: (service, path, query) -> decoded JSON object.
Fetch = Callable[[ServiceAddress, str, Mapping[str, str]], dict[str, Any]]
Handler = Callable[[Request], Response]


def hop(service: str, me: PodIdentity, req: Request) -> dict[str, str]:
    """One link of the chain: which pod served `service` and which client address it saw."""
    return {
        "service": service,
        "served_by": me.name,
        "namespace": me.namespace,
        "node": me.node,
        "pod_ip": me.ip,
        "seen_client": req.client_ip,
    }


def http_fetch(timeout_s: float) -> Fetch:
    """A `Fetch` over plain HTTP/1.1 (one connection per call) with a per-call timeout."""

    def fetch(svc: ServiceAddress, path: str, query: Mapping[str, str]) -> dict[str, Any]:
        target = f"{path}?{urlencode(dict(query))}" if query else path
        conn = http.client.HTTPConnection(svc.host, svc.port, timeout=timeout_s)
        try:
            conn.request("GET", target, headers={"Accept": "application/json"})
            resp = conn.getresponse()
            raw = resp.read()
            status = resp.status
        except TimeoutError:
            raise DownstreamError(
                svc.name, f"no answer from {svc.host}:{svc.port} within {timeout_s:g} s"
            ) from None
        except (OSError, http.client.HTTPException) as exc:
            raise DownstreamError(
                svc.name, f"call to {svc.host}:{svc.port} failed: {exc or type(exc).__name__}"
            ) from None
        finally:
            conn.close()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if status != 200:
            cause = body if isinstance(body, dict) else None
            raise DownstreamError(svc.name, f"answered {status}", cause, status)
        if not isinstance(body, dict):
            raise DownstreamError(svc.name, "answered 200 without a JSON object")
        return body

    return fetch


def dispatch(routes: Mapping[str, Handler], req: Request) -> Response:
    """Pure routing and error mapping: every failure becomes a JSON error response."""
    if req.path == "/healthz":
        return Response(200, "ok")
    handler = routes.get(req.path)
    if handler is None:
        return Response(404, {"error": f"no route {req.path!r}", "routes": sorted(routes)})
    try:
        return handler(req)
    except BadRequest as exc:
        return Response(400, {"error": str(exc)})
    except DownstreamError as exc:
        return Response(502, exc.body())


class FailEvery:
    """Which requests a deliberately flaky replica drops: every `n`th one (0: none).

    Thread-safe: the server answers each connection on its own thread, and the count must
    not skip or repeat under concurrency, or the demo's failure rate would drift.
    """

    def __init__(self, n: int) -> None:
        if n < 0:
            raise ValueError(f"fail every {n}: must be 0 (never) or a positive count")
        self.n = n
        self._count = 0
        self._lock = threading.Lock()

    def next_fails(self) -> bool:
        if self.n == 0:
            return False
        with self._lock:
            self._count += 1
            return self._count % self.n == 0


def _reset(sock: socket.socket) -> None:
    """Close with a TCP RST instead of a FIN: the caller sees a reset, not an answer."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _make_handler_class(
    app: str, routes: Mapping[str, Handler], served_by: str, fail: FailEvery
) -> type[BaseHTTPRequestHandler]:
    class _Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive with Content-Length on every answer
        server_version = f"travel-{app}/1"
        timeout = 30  # an idle keep-alive connection must not hold a thread forever

        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            # Health checks never fail: a flaky replica is still a running one.
            if parts.path != "/healthz" and fail.next_fails():
                sys.stderr.write(f"{app}: dropping {self.path} (--fail-every {fail.n})\n")
                _reset(self.connection)
                self.close_connection = True
                return
            req = Request(
                path=parts.path,
                query=dict(parse_qsl(parts.query)),
                client_ip=self.client_address[0],
            )
            try:
                resp = dispatch(routes, req)
            except Exception as exc:  # a bug must still answer, not drop the connection
                resp = Response(500, {"error": f"{type(exc).__name__}: {exc}"})
            if isinstance(resp.body, str):
                payload, ctype = resp.body.encode(), "text/plain; charset=utf-8"
            else:
                payload, ctype = json.dumps(resp.body).encode(), "application/json"
            self.send_response(resp.status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(payload)))
            # Which pod answered, on every answer (also /healthz): the demo counts replicas
            # and versions from it without parsing bodies.
            self.send_header(SERVED_BY_HEADER, served_by)
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            sys.stderr.write(f"{app} {self.client_address[0]} {format % args}\n")

    return _Handler


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative (0 means never)")
    return value


def parse_args(
    app: str, argv: Sequence[str] | None, fail_every: bool = False
) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=app, description=f"travel demo: the {app} service")
    parser.add_argument("--port", type=int, default=8080, help="TCP port (default 8080)")
    parser.add_argument("--host", default="0.0.0.0", help="listen address (default 0.0.0.0)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help=f"seconds to wait for a downstream service (default {DEFAULT_TIMEOUT_S:g})",
    )
    if fail_every:
        parser.add_argument(
            "--fail-every",
            type=_count,
            default=0,
            metavar="N",
            help="reset every Nth request's connection instead of answering (default 0: never)",
        )
    return parser.parse_args(argv)


def serve(
    app: str, routes: Mapping[str, Handler], host: str, port: int, fail_every: int = 0
) -> int:
    """Serve until SIGTERM/SIGINT, then stop accepting, close the socket and return 0.
    With `fail_every` N > 0, every Nth request (not /healthz) is answered with a TCP reset."""
    served_by = PodIdentity.from_env(os.environ).name
    handler = _make_handler_class(app, routes, served_by, FailEvery(fail_every))
    server = ThreadingHTTPServer((host, port), handler)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # serve_forever runs in a worker thread so the main thread stays free to receive the
    # signal; shutdown() from inside a handler on the serving thread would deadlock.
    # A short poll interval: shutdown() waits for the loop to notice, and pods stop often.
    loop = threading.Thread(
        target=server.serve_forever, args=(0.1,), name=f"{app}-serve", daemon=True
    )
    loop.start()
    sys.stderr.write(f"{app} listening on {host}:{port} (pid {os.getpid()})\n")
    sys.stderr.flush()
    stop.wait()
    server.shutdown()
    server.server_close()
    loop.join(timeout=5)
    sys.stderr.write(f"{app} stopped\n")
    return 0
