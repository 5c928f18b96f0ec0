"""The waypoint's HBONE side: TLS 1.3 with a required client certificate, HTTP/2 CONNECT
(100 streams per connection, keepalive), each accepted stream handed to the proxy.

The CONNECT is answered before any payload is read: 200 once the destination is one this
waypoint serves (`destination.resolve`), else the refusal's status (the client tunnel then
resets its client). Drain: GOAWAY on every connection, open streams run to their end.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import ssl
from collections.abc import Callable, Coroutine
from typing import Any

import structlog

from meshcore.hbone.conn import Headers
from meshcore.hbone.server import Guard, TlsListener, verified_client
from meshcore.hbone.stream import HboneStream
from meshcore.hbone.transport import H2Transport
from meshcore.identity.spiffe import SpiffeId
from meshcore.runtime.tasks import TaskSet
from meshcore.sockets import SocketAddr
from meshcore.state import IPAddress, MeshState
from waypoint.destination import Destination, Me, Refused, resolve
from waypoint.telemetry.tracing import TraceContext, parse_traceparent

log = structlog.get_logger("waypoint")


class Inbound:
    """What the proxy knows of one accepted CONNECT stream. The client's address and the
    tunnel's trace context are read from the CONNECT's headers once, for every request the
    stream carries."""

    __slots__ = ("client", "destination", "headers", "peer", "source_addr", "source_ip",
                 "trace_parent")  # fmt: skip

    def __init__(
        self, peer: SpiffeId, client: SocketAddr, destination: Destination, headers: Headers
    ) -> None:
        self.peer = peer  # the client's tunnel proved this identity (the client pod's)
        self.client = client  # the TCP peer of the HBONE connection (the client's tunnel)
        self.destination = destination
        self.headers = headers  # the CONNECT's own headers (forwarded, traceparent, baggage)
        # The original client's IP: the tunnel's `forwarded: for="ip:port"`, else the peer;
        # and as an address (None if it is not one).
        forwarded = _forwarded_for(self.header("forwarded"))
        self.source_ip = forwarded if forwarded is not None else str(client.ip)
        self.source_addr: IPAddress | None = None
        with contextlib.suppress(ValueError):
            self.source_addr = ipaddress.ip_address(self.source_ip)
        # The CONNECT's own trace context (the tunnel's hop), if it carries a valid one.
        self.trace_parent: TraceContext | None = parse_traceparent(self.header("traceparent"))

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None


def _forwarded_for(fwd: str | None) -> str | None:
    """The host of a `forwarded` header's `for=` (without its port), if it has one."""
    for part in (fwd or "").split(";"):
        key, _, value = part.strip().partition("=")
        if key.lower() == "for":
            host = value.strip('"')
            if host.startswith("["):
                return host[1 : host.find("]")]
            return host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return None


Serve = Callable[[HboneStream, Inbound], Coroutine[Any, Any, None]]


class _WaypointH2(H2Transport):
    def __init__(self, server: WaypointServer) -> None:
        super().__init__(
            client=False,
            on_request=server.on_request,
            keepalive=True,
            limits=server.guard.limits,
            on_refused=server.h2_refused,
        )
        self.server = server
        self.peer: SpiffeId | None = None
        self.client: SocketAddr | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        proven = verified_client(transport, self.server.trust_domain, self.server.guard)
        if proven is None:
            return
        self.client, self.peer = proven
        super().connection_made(transport)
        self.server.connections[self] = None

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.server.connections.pop(self, None)


class WaypointServer:
    def __init__(
        self,
        me: Me,
        network: str,
        trust_domain: str,
        state: Callable[[], MeshState],
        serve: Serve,
        guard: Guard,
    ) -> None:
        self.me = me
        self.network = network
        self.trust_domain = trust_domain
        self._state = state
        self._serve = serve
        self.guard = guard
        self.connections: dict[_WaypointH2, None] = {}
        self.streams: dict[HboneStream, Inbound] = {}  # the streams being served
        self.tasks = TaskSet("waypoint-streams")
        self.listener: TlsListener | None = None
        self.refused = 0  # CONNECTs answered with an error (for readiness/status views)
        self.idle = asyncio.Event()  # no stream open (a drain waits for it)
        self.idle.set()

    async def start(self, ctx: ssl.SSLContext, host: str, port: int) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # A new waypoint beside the old one during a restart, and a new certificate's
            # listener beside the old one's.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            sock.listen(1024)
            listener = TlsListener(ctx, lambda: _WaypointH2(self), self.guard.gate)
            await listener.start(sock)
        except BaseException:
            sock.close()
            raise
        old, self.listener = self.listener, listener
        if old is not None:
            old.stop_accepting()

    @property
    def address(self) -> str:
        return self.listener.address if self.listener is not None else ""

    def on_request(self, h2: H2Transport, sid: int, headers: Headers) -> None:
        assert isinstance(h2, _WaypointH2) and h2.peer is not None and h2.client is not None
        method = authority = ""
        for k, v in headers:
            if k == ":method":
                method = v
            elif k == ":authority":
                authority = v
        if method != "CONNECT":
            self._refuse(h2, sid, Refused(405, f"method {method!r} is not CONNECT"))
            return
        decided = resolve(self._state(), self.network, self.me, authority)
        if isinstance(decided, Refused):
            self._refuse(h2, sid, decided, peer=h2.peer)
            return
        stream = HboneStream.accept(h2, sid)
        inbound = Inbound(h2.peer, h2.client, decided, headers)
        self.streams[stream] = inbound
        self.idle.clear()
        task = self.tasks.spawn(self._serve(stream, inbound), f"stream-{sid}")
        task.add_done_callback(lambda _t: self._ended(stream))

    def _ended(self, stream: HboneStream) -> None:
        self.streams.pop(stream, None)
        if not self.streams:
            self.idle.set()
        if not stream.closed:
            stream.abort("served")

    def _refuse(
        self, h2: H2Transport, sid: int, refused: Refused, peer: SpiffeId | None = None
    ) -> None:
        self.refused += 1
        log.warning(
            "connect refused",
            status=refused.status,
            reason=refused.reason,
            peer=str(peer) if peer else None,
        )
        h2.conn.respond(sid, refused.status, None, end=True)
        h2.flush()

    def h2_refused(self, h2: H2Transport, reason: str) -> None:
        client = h2.client if isinstance(h2, _WaypointH2) else None
        self.guard.refused("inbound", reason, str(client))

    def stop_accepting(self) -> None:
        if self.listener is not None:
            self.listener.stop_accepting()

    def drain(self) -> None:
        """GOAWAY everywhere: clients open new streams on a new connection (the new
        waypoint's); streams in flight finish."""
        for h2 in list(self.connections):
            h2.drain("waypoint draining")

    @property
    def busy(self) -> int:
        return len(self.streams)

    async def close(self) -> None:
        if self.listener is not None:
            self.listener.close()
        for h2 in list(self.connections):
            h2.close("waypoint stopping")
        await self.tasks.cancel_all()
