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
from waypoint.destination import Destination
from waypoint.endpoints import Endpoint, direct_endpoint, service_endpoints
from waypoint.server import Inbound
from waypoint.splice import splice
from waypoint.upstream import Upstream

log = structlog.get_logger("waypoint")


class NoEndpoint(LookupError):
    """The destination has no healthy HBONE endpoint."""


class WaypointProxy:
    def __init__(self, state: Callable[[], MeshState], upstream: Upstream) -> None:
        self._state = state
        self.upstream = upstream
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
        await self.tcp(stream, inbound)

    def upstream_headers(self, inbound: Inbound) -> list[tuple[str, str]]:
        """What the upstream CONNECT carries on from the client's: who the client was."""
        out = []
        for name in ("forwarded", "baggage", "traceparent"):
            value = inbound.header(name)
            if value:
                out.append((name, value))
        return out

    async def tcp(self, stream: HboneStream, inbound: Inbound, prefix: bytes = b"") -> None:
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
        sent, received = await splice(stream, up, prefix)
        log.debug(
            "tcp done", destination=inbound.destination.authority, sent=sent, received=received
        )
