"""What the waypoint does with one accepted CONNECT stream: pass TCP through, or speak the
port's HTTP and route each request.

The L7 decisions (routes, policy, retries, faults, load balancing) are pure modules; this
is the shell that runs them and does the I/O.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import structlog

from meshcore.hbone.stream import HboneStream
from meshcore.state import MeshState
from waypoint.destination import Destination, L7Protocol
from waypoint.endpoints import Endpoint, direct_endpoint, service_endpoints
from waypoint.http.h1 import DEFAULT_LIMITS, Http1Limits
from waypoint.http.h1server import serve_http1
from waypoint.http.h2base import DEFAULT_H2_LIMITS, Http2Limits
from waypoint.http.h2server import serve_http2
from waypoint.http.message import Request, Response
from waypoint.http.sniff import PrefixedStream, sniff
from waypoint.http.splice import splice
from waypoint.http.stream import ByteStream
from waypoint.router import Accounted, Router
from waypoint.server import Inbound
from waypoint.upstream import Upstream

log = structlog.get_logger("waypoint")


class NoEndpoint(LookupError):
    """The destination has no healthy HBONE endpoint."""


class WaypointProxy:
    def __init__(
        self,
        state: Callable[[], MeshState],
        upstream: Upstream,
        router: Router | None = None,
        draining: Callable[[], bool] = lambda: False,
        sniff_timeout: float = 0.2,
        http1_limits: Http1Limits = DEFAULT_LIMITS,
        http2_limits: Http2Limits = DEFAULT_H2_LIMITS,
    ) -> None:
        self.sniff_timeout = sniff_timeout
        self.http1_limits = http1_limits
        self.http2_limits = http2_limits
        self._state = state
        self.upstream = upstream
        self.router = router
        self.draining = draining
        self._rr = itertools.count()

    def endpoints(self, destination: Destination) -> tuple[Endpoint, ...]:
        if destination.service is not None:
            return service_endpoints(self._state(), destination.service, destination.port)
        assert destination.workload is not None
        ep = direct_endpoint(destination.workload, destination.ip, destination.port)
        return (ep,) if ep is not None else ()

    def pick(self, destination: Destination) -> Endpoint:
        endpoints = self.endpoints(destination)
        if not endpoints:
            raise NoEndpoint(f"no healthy endpoint for {destination.authority}")
        return endpoints[next(self._rr) % len(endpoints)]

    async def serve(self, stream: HboneStream, inbound: Inbound) -> None:
        protocol = inbound.destination.protocol
        if protocol is L7Protocol.TCP or self.router is None:
            await self.tcp(stream, inbound)
        elif protocol is L7Protocol.HTTP:
            await self.http(stream, inbound, h2=False)
        elif protocol in (L7Protocol.HTTP2, L7Protocol.GRPC):
            await self.http(stream, inbound, h2=True)
        else:
            # Undeclared: the client's first bytes say which, and silence says the server
            # speaks first (MySQL, SMTP): that is TCP, connected at once, never stalled.
            kind, prefix = await sniff(stream, self.sniff_timeout)
            if kind == "tcp":
                await self.tcp(stream, inbound, prefix)
            else:
                await self.http(PrefixedStream(stream, prefix), inbound, h2=kind == "h2")

    async def http(self, stream: ByteStream, inbound: Inbound, h2: bool) -> None:
        router = self.router
        assert router is not None
        books: dict[Accounted, None] = {}

        async def handler(request: Request) -> Response:
            return await router.handle(request, inbound, books)

        try:
            if h2:
                await serve_http2(stream, handler, self.http2_limits, draining=self.draining)
            else:
                await serve_http1(stream, handler, self.http1_limits, draining=self.draining)
        finally:
            router.abandon(books)

    def upstream_headers(self, inbound: Inbound) -> list[tuple[str, str]]:
        """What the upstream CONNECT carries on from the client's: who the client was."""
        out = []
        for name in ("forwarded", "baggage", "traceparent"):
            value = inbound.header(name)
            if value:
                out.append((name, value))
        return out

    async def tcp(self, stream: ByteStream, inbound: Inbound, prefix: bytes = b"") -> None:
        """TCP passthrough: one upstream stream per client stream, bytes both ways."""
        try:
            endpoint = self.pick(inbound.destination)
            up = await self.upstream.open(
                endpoint.workload, endpoint.ip, endpoint.port, self.upstream_headers(inbound)
            )
        except (NoEndpoint, OSError, ConnectionError) as e:
            log.warning(
                "upstream connect failed",
                destination=inbound.destination.authority,
                error=str(e),
            )
            stream.abort("upstream connect failed")
            return
        sent, received = await splice(stream, up, from_a=prefix)
        log.debug(
            "tcp done", destination=inbound.destination.authority, sent=sent, received=received
        )
