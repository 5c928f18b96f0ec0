"""The tunnel's admin (15000, node-local) and Prometheus metrics (15020) HTTP servers.

Admin endpoints, as ztunnel's (and Envoy's) admin interface:
- `GET /config_dump`: the tunnel's view of the mesh, JSON;
- `GET /connections`: open proxied connections, JSON list;
- `GET /debug/explain?source=<ns/pod>&destination=<host-or-ip>:<port>`: how a connection
  would be routed and authorized, JSON (400 when the question itself is wrong);
- `GET /memory`: where this process's memory is (resident, Python's blocks and arenas,
  glibc's heap in use and free), JSON, as Envoy's `/memory`;
- `GET /logging` (or `POST /logging` with no level): the current log level;
  `POST /logging?level=<level>`: change it at runtime;
- `POST /quitquitquit`: answer, then ask the tunnel to shut down;
- `/`: the list of endpoints; any other path: 404 with the same list (as Envoy).

The servers know nothing about the tunnel itself: the admin server asks an `AdminSource`,
the metrics server renders a `TcpMetrics`. The admin port must be bound to a loopback
address by the caller: it can stop the tunnel and has no authentication (as upstream).
Beyond upstream, a request that changes state (any method but GET/HEAD) from a peer that is
not a loopback address gets 403 whatever the bind address, so a misconfigured bind (or a
port forwarded into the netns) still cannot stop the proxy or change its log level;
read-only requests are answered as before.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import structlog

from meshcore.defaults import ADMIN_PORT, METRICS_PORT
from meshcore.http1.server import NodeHttpServer, Request, Response, Routes
from meshcore.localtrust import RateLog
from meshcore.observability.metrics import TcpMetrics
from meshcore.observability.promtext import ProcessMetrics
from meshcore.runtime import malloc

log = structlog.get_logger(__name__)


# Brings a source's views up to date before they are read (other processes' parts).
Refresh = Callable[[], Awaitable[None]]


class AdminSource(Protocol):
    """What the admin server shows and does; the tunnel's node implements it."""

    def config_dump(self) -> dict[str, Any]: ...

    def connections(self) -> list[dict[str, Any]]: ...

    def explain(self, source: str, destination: str) -> dict[str, Any]:
        """Raises ValueError when the source or destination cannot be understood."""
        ...

    def request_quit(self) -> None:
        """Start shutting down; must return at once (called on the event loop)."""
        ...


# -- log level ----------------------------------------------------------------------------

# The names ztunnel and Envoy accept, mapped to what structlog filters on. structlog has no
# level below debug, so trace means debug.
LOG_LEVELS: dict[str, int] = {
    "trace": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
_LEVEL_NAMES = {
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warning",
    logging.ERROR: "error",
    logging.CRITICAL: "critical",
}


def current_log_level() -> str:
    """The level the tunnel's structlog loggers filter at, by name."""
    level = structlog.get_logger().get_effective_level()
    return _LEVEL_NAMES.get(level, str(level))


def set_log_level(name: str) -> str:
    """Change the tunnel's log level at runtime; returns the level now in effect.

    The loggers are module-level lazy proxies and `meshcore.observability.logging` does not
    cache bound loggers, so replacing the filtering wrapper class takes effect on the next log
    call of every logger. Only the wrapper changes; the processors and output stay as configured.
    The stdlib root logger follows, for the libraries that log through it.

    Raises ValueError for a name not in `LOG_LEVELS`.
    """
    level = LOG_LEVELS.get(name.strip().lower())
    if level is None:
        raise ValueError(f"invalid log level {name!r}; use one of {', '.join(LOG_LEVELS)}")
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(level))
    logging.getLogger().setLevel(level)
    return current_log_level()


# -- admin server -------------------------------------------------------------------------

_ENDPOINTS: tuple[tuple[str, str], ...] = (
    ("/", "this list"),
    ("/config_dump", "dump the current tunnel configuration (workloads, services, policies...)"),
    ("/connections", "list the open proxied connections"),
    (
        "/debug/explain",
        "explain a connection: ?source=<namespace/pod>&destination=<host-or-ip>:<port>",
    ),
    ("/logging", "query (GET) or change (POST ?level=<level>) the log level"),
    ("/memory", "this process's memory: resident, Python's blocks and arenas, the C heap"),
    ("/quitquitquit", "shut the tunnel down (POST)"),
)


def _index_text(prefix: str) -> str:
    width = max(len(path) for path, _ in _ENDPOINTS)
    rows = "".join(f"  {path.ljust(width)}  {what}\n" for path, what in _ENDPOINTS)
    return f"{prefix}admin commands are:\n{rows}"


def _json(body: Any, status: int = 200) -> Response:
    return Response.json(body, status, indent=2)


def _error(status: int, message: str) -> Response:
    return _json({"error": message}, status)


_READ_ONLY = frozenset({"GET", "HEAD"})


def state_change_refusal(method: str, remote: str | None) -> str | None:
    """Why this request may not change the proxy's state, or None when it may (read-only
    methods always may; others only from a loopback peer)."""
    if method in _READ_ONLY:
        return None
    try:
        loopback = remote is not None and ipaddress.ip_address(remote).is_loopback
    except ValueError:
        loopback = False
    if loopback:
        return None
    return f"{method} is only answered from the node's loopback, not from {remote or 'unknown'}"


class AdminServer(NodeHttpServer):
    """The admin endpoints for one tunnel, on a host/port the caller chooses (loopback)."""

    def __init__(
        self,
        source: AdminSource,
        port: int = ADMIN_PORT,
        host: str = "127.0.0.1",
        refresh: Refresh | None = None,
        on_log_level: Callable[[str], None] | None = None,
    ) -> None:
        """`refresh`: awaited before the views that count connections (a tunnel with
        worker processes gathers their tables and counters then). `on_log_level`: called
        with each level set through `/logging` (for the tunnel's other processes)."""
        super().__init__(port, host)
        self._source = source
        self._refresh = refresh
        self._on_log_level = on_log_level
        self._refusal_log = RateLog()
        self.refused_remote = 0  # state-changing requests refused from off the node

    async def admit(self, request: Request) -> Response | None:
        why = state_change_refusal(request.method, request.remote)
        if why is None:
            return None
        self.refused_remote += 1
        suppressed = self._refusal_log.due(time.monotonic())
        if suppressed is not None:
            log.warning("admin request refused", reason=why, not_logged=suppressed)
        return _error(403, why)

    async def not_found(self, request: Request) -> Response:
        # As Envoy: an unknown path gets the list of the known ones.
        return Response.text(_index_text("invalid path. "), 404)

    async def failed(self, request: Request, error: Exception) -> Response:
        # A failing source gets a 500 that says why, in the admin port's JSON.
        log.exception("admin request failed", path=request.path)
        return _error(500, f"{type(error).__name__}: {error}")

    async def _index(self, _request: Request) -> Response:
        return Response.text(_index_text(""))

    async def _config_dump(self, _request: Request) -> Response:
        if self._refresh is not None:
            await self._refresh()
        return _json(self._source.config_dump())

    async def _connections(self, _request: Request) -> Response:
        if self._refresh is not None:
            await self._refresh()
        return _json(self._source.connections())

    async def _explain(self, request: Request) -> Response:
        source = request.query.get("source", "").strip()
        destination = request.query.get("destination", "").strip()
        missing = [n for n, v in (("source", source), ("destination", destination)) if not v]
        if missing:
            return _error(
                400,
                f"missing query parameter {' and '.join(missing)}: "
                "use ?source=<namespace/pod>&destination=<host-or-ip>:<port>",
            )
        try:
            return _json(self._source.explain(source, destination))
        except ValueError as e:
            return _error(400, str(e))

    async def _logging(self, request: Request) -> Response:
        level = request.query.get("level")
        if request.method == "POST" and level is not None:
            try:
                now = set_log_level(level)
            except ValueError as e:
                return _error(400, str(e))
            log.info("log level changed", level=now)
            if self._on_log_level is not None:
                self._on_log_level(now)
            return _json({"level": now})
        return _json({"level": current_log_level()})

    async def _memory(self, _request: Request) -> Response:
        # This process only: with tunnel workers, each keeps its own heap.
        return _json(malloc.figures())

    async def _quit(self, request: Request) -> Response:
        def quit_after_answer() -> None:
            log.info("shutdown requested via admin", peer=request.remote)
            self._source.request_quit()

        # Ask to quit only once the whole answer is written: a shutdown that closes this
        # server must not cut off the reply to the request that asked for it.
        return Response(body=b"OK\n", after=quit_after_answer)

    def routes(self) -> Routes:
        return {
            "/": {"GET": self._index},
            "/config_dump": {"GET": self._config_dump},
            "/connections": {"GET": self._connections},
            "/debug/explain": {"GET": self._explain},
            "/logging": {"GET": self._logging, "POST": self._logging},
            "/memory": {"GET": self._memory},
            # POST only: a GET (a browser, a crawler of the index) must never stop the tunnel.
            "/quitquitquit": {"POST": self._quit},
        }


# -- metrics server -----------------------------------------------------------------------


class MetricsText(Protocol):
    """What a metrics endpoint serves: the tunnel's TCP counters, the waypoint's request
    metrics, or any other source of Prometheus text."""

    def render(self) -> bytes: ...


class MetricsServer(NodeHttpServer):
    """`/metrics` and `/stats/prometheus` (same body), as ztunnel serves them on 15020."""

    def __init__(
        self,
        metrics: MetricsText,
        extra: Callable[[], bytes] | None = None,
        port: int = METRICS_PORT,
        host: str = "0.0.0.0",
        refresh: Refresh | None = None,
    ) -> None:
        """`refresh`: awaited before each scrape (see `AdminServer`)."""
        super().__init__(port, host)
        self._metrics = metrics
        self._extra = extra
        self._refresh = refresh

    async def _scrape(self, _request: Request) -> Response:
        if self._refresh is not None:
            await self._refresh()
        body = self._metrics.render()
        if self._extra is not None:
            body += self._extra()
        return Response(body=body, content_type=TcpMetrics.CONTENT_TYPE)

    def routes(self) -> Routes:
        return {
            "/metrics": {"GET": self._scrape},
            "/stats/prometheus": {"GET": self._scrape},
        }


def process_metrics() -> Callable[[], bytes]:
    """`extra` for `MetricsServer`: this process's CPU, memory and file descriptors
    (`process_*`), read from /proc/self at each scrape."""
    return ProcessMetrics().render
