"""Inbound HBONE (15008): mTLS HTTP/2 CONNECT streams into one pod.

`decide` is pure: it checks the request (CONNECT, a parsable authority naming this pod,
not a tunnel port) and the authorization seam, and returns the status to answer with.
The server replies 200 only after the connection to the app succeeded; 400 for a bad
request or a target that is not this pod, 401 when authorization denies, 503 when the app
cannot be reached.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from meshcore.defaults import HBONE_PORT, TUNNEL_PORTS
from meshcore.hbone.conn import Headers
from meshcore.hbone.h2frames import ErrorCode
from meshcore.hbone.server import Guard, verified_client
from meshcore.hbone.transport import H2Transport
from meshcore.identity.spiffe import SpiffeId
from meshcore.observability.accesslog import Direction
from meshcore.observability.connections import STOPPED, ConnectionTable, Tracked
from meshcore.observability.metrics import ResponseFlags, TcpLabels
from meshcore.policy.verdict import Verdict
from meshcore.relay import AppSide, HboneSplice, TcpPipe
from meshcore.sockets import SocketAddr, SocketFactory, parse_ip, shared_addr
from meshcore.state import MeshState, Workload
from ztunnel.proxy.common import Authorizer, allow_all, connect_tcp, inbound_labels
from ztunnel.proxy.waypoint import gated

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class InboundDecision:
    status: int  # 200 means: connect to `target` and relay
    target: SocketAddr | None
    reason: str
    # The authorization verdict, once the request got as far as being authorized.
    verdict: Verdict | None = None


def parse_authority(authority: str) -> SocketAddr:
    """`ip:port` or `[v6]:port`; host names are not accepted (HBONE targets an address)."""
    bracketed = authority.startswith("[")
    if bracketed:
        host, sep, port = authority[1:].partition("]:")
    else:
        host, sep, port = authority.rpartition(":")
    # IPv6 only in brackets and IPv4 only without (RFC 3986), ASCII digits only: what
    # upstream's socket-address parse accepts. "fd00::1:80" is otherwise ambiguous.
    if not sep or not (port.isascii() and port.isdigit()) or (":" in host) != bracketed:
        raise ValueError(f"authority {authority!r} is not ip:port")
    p = int(port)
    if not 0 < p < 65536:
        raise ValueError(f"authority {authority!r} has an invalid port")
    return shared_addr(parse_ip(host), p)


def decide(
    workload: Workload,
    headers: Headers,
    peer: SpiffeId | None,
    client: SocketAddr,
    authorize: Authorizer = allow_all,
) -> InboundDecision:
    pseudo = {k: v for k, v in headers if k.startswith(":")}
    if pseudo.get(":method") != "CONNECT":
        return InboundDecision(400, None, f"method {pseudo.get(':method')!r} is not CONNECT")
    try:
        target = parse_authority(pseudo.get(":authority", ""))
    except ValueError as e:
        return InboundDecision(400, None, str(e))
    if target.ip not in workload.ips:
        return InboundDecision(400, target, f"target {target.ip} is not this pod ({workload.name})")
    if target.port in TUNNEL_PORTS:
        return InboundDecision(503, target, f"port {target.port} is the tunnel's own")
    verdict = authorize(workload, peer, client, target)
    if not verdict.allowed:
        return InboundDecision(401, target, verdict.reason, verdict)
    return InboundDecision(200, target, "allowed", verdict)


def _refuse(h2: H2Transport, splice: HboneSplice, status: int, reason: str) -> None:
    """Answer with an error status, then end the stream: RST_STREAM(NO_ERROR) after a
    complete response tells the client to stop sending without failing the response.
    Finishing the splice returns the credit of anything the client sent early."""
    h2.conn.respond(splice.sid, status, None, end=True)
    h2.conn.reset(splice.sid, 0)
    splice.finish_unstarted(f"{status}: {reason}")
    h2.flush()


class _Connecting:
    """A stream's handler while its app connect runs: the splice gets its bytes, and a reset
    also cancels the connect. Answering the stream hands it to the splice itself."""

    __slots__ = ("connecting", "splice", "task")

    def __init__(
        self,
        splice: HboneSplice,
        task: asyncio.Task[None],
        connecting: dict[int, asyncio.Task[None]],
    ) -> None:
        self.splice = splice
        self.task = task
        self.connecting = connecting  # the connection's connects in flight

    def on_response(self, status: int, headers: Headers) -> None:
        pass  # a server stream gets no response

    def on_data(self, data: memoryview) -> None:
        self.splice.on_data(data)

    def on_end(self) -> None:
        self.splice.on_end()

    def on_reset(self, code: int) -> None:
        self.splice.on_reset(code)
        # No longer in flight from now on, not only once the cancelled task has run: the
        # streams the peer opens and resets in one read must each count as a premature
        # reset (rapid reset), not be refused as connects in flight and escape the count.
        self.connecting.pop(self.splice.sid, None)
        self.task.cancel()

    def on_send_ready(self) -> None:
        self.splice.on_send_ready()


def _connected(connecting: dict[int, asyncio.Task[None]], sid: int, _task: object) -> None:
    connecting.pop(sid, None)


class _InboundH2(H2Transport):
    """Server side HTTP/2 that first checks the client's identity after the handshake."""

    def __init__(self, server: InboundProxy) -> None:
        guard = server.guard
        super().__init__(
            client=False,
            on_request=server.on_request,
            # Keepalive PINGs and the idle drain: a client that finished its handshake and
            # then went quiet is not held for ever.
            keepalive=True,
            limits=guard.limits,
            on_refused=server.h2_refused,
        )
        self.server = server
        self.peer: SpiffeId | None = None
        self.client: SocketAddr | None = None
        self.hbone_addr: str | None = None
        # App connects in flight, by stream: bounded, and cancelled if the stream is reset.
        self.connecting: dict[int, asyncio.Task[None]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        proven = verified_client(transport, self.server.trust_domain, self.server.guard)
        if proven is None:
            return
        self.client, self.peer = proven
        # The HBONE address the access log shows for each stream: one string per
        # connection, shared by its streams (not a syscall and a string per stream).
        sockname = transport.get_extra_info("sockname")
        self.hbone_addr = f"{sockname[0]}:{HBONE_PORT}" if sockname else None
        super().connection_made(transport)
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.server.connections.discard(self)


class InboundProxy:
    """The 15008 listener of one pod."""

    def __init__(
        self,
        workload: Callable[[], Workload],
        factory: SocketFactory,
        trust_domain: str,
        tasks: Callable[[asyncio.Future[None]], None],
        authorize: Authorizer = allow_all,
        connection_table: ConnectionTable | None = None,
        state: Callable[[], MeshState] = MeshState.empty,
        guard: Guard | None = None,
    ) -> None:
        self.guard = guard if guard is not None else Guard()
        self._workload = workload
        self._factory = factory
        self.trust_domain = trust_domain
        self._track = tasks
        # A pod bound to a waypoint accepts only the waypoint (ztunnel.proxy.waypoint).
        self.authorize = gated(authorize, state)
        self.connection_table = (
            connection_table if connection_table is not None else ConnectionTable()
        )
        self._state = state
        self.connections: set[_InboundH2] = set()
        self.recheck = self._recheck  # one bound method, shared by every table entry
        # Open connections (HBONE streams and same-node pipes), to end them on close.
        self.relays: dict[HboneSplice | TcpPipe, None] = {}  # an ordered set
        self.stopping = False

    def _record(
        self, workload: Workload, peer: SpiffeId | None, client: SocketAddr, hbone: str | None
    ) -> Tracked:
        """The access-log line (and, once it runs, table entry) of one inbound connection
        (HBONE or in process). The client's workload is whatever owns its address, if the
        mesh knows it."""
        return Tracked(
            Direction.INBOUND,
            src=client,
            src_workload=self._state().workload_by_ip(workload.network, client.ip),
            src_identity=peer,
            hbone=hbone,
            dst_workload=workload,
            dst_identity=workload.identity,
        )

    def _refused(self, record: Tracked, status: int, reason: str, flags: str) -> None:
        """End a connection that never reached the app: its line, and (with a flag) its count."""
        record.finish(error=f"{status}: {reason}")
        if flags != ResponseFlags.NONE:
            self.connection_table.refused(self.labels(record, flags))

    def labels(self, record: Tracked, flags: str) -> TcpLabels:
        """Destination-reported labels of a logged connection."""
        workload = record.dst_workload
        assert workload is not None
        peer = record.src_identity
        return inbound_labels(
            record.src_workload, workload, peer if isinstance(peer, SpiffeId) else None, flags
        )

    def h2_refused(self, h2: H2Transport, reason: str) -> None:
        """An HBONE client broke the protocol or hit a limit: its connection is ending."""
        client = h2.client if isinstance(h2, _InboundH2) else None
        self.guard.refused("inbound", reason, str(client), h2.conn.close_reason)

    async def _connect_app(
        self, record: Tracked, target: SocketAddr, splice: HboneSplice | None = None
    ) -> tuple[AppSide | None, str]:
        """Connect to the app as the client. On failure the connection is already logged and
        counted: (None, why)."""
        assert isinstance(record.src, SocketAddr)
        try:
            _, app = await connect_tcp(self._factory, target, as_client=str(record.src.ip))
        except asyncio.CancelledError:
            if splice is not None and splice.finished:
                # Its stream was reset while we were connecting (the connect is abandoned,
                # not left to run: rapid reset must not cost us an app connection each).
                record.finish(error="client reset the stream before the app answered")
                return None, "stream reset"
            record.finish(error=STOPPED)
            raise
        except (TimeoutError, OSError) as e:
            reason = f"connecting to the app at {target} failed: {e}"
            self._refused(record, 503, reason, ResponseFlags.CONNECT)
            return None, reason
        return app, ""

    def protocol(self) -> H2Transport:
        return _InboundH2(self)

    def _recheck(self, entry: Tracked) -> Verdict:
        """An open connection under the current policy."""
        peer, src, dst = entry.src_identity, entry.src, entry.dst
        assert isinstance(src, SocketAddr) and isinstance(dst, SocketAddr)
        return self.authorize(
            self._workload(), peer if isinstance(peer, SpiffeId) else None, src, dst
        )

    def on_request(self, h2: H2Transport, sid: int, headers: Headers) -> None:
        assert isinstance(h2, _InboundH2)
        workload = self._workload()
        client = h2.client
        assert client is not None
        decision = decide(workload, headers, h2.peer, client, self.authorize)
        splice = HboneSplice(h2)
        splice.sid = sid
        if (
            decision.status == 200
            and len(h2.connecting) >= self.guard.limits.max_connects_in_flight
        ):
            # Nothing was done for this stream: the client may retry it.
            h2.conn.reset(sid, ErrorCode.REFUSED_STREAM)
            h2.flush()
            self.guard.refused("inbound", "max_connects_in_flight", str(client))
            return
        task = asyncio.get_running_loop().create_task(
            self._serve(h2, splice, workload, decision, client)
        )
        # Hold whatever the client sends before our answer (the stream window bounds it);
        # while the app connect runs, a reset of the stream cancels it.
        h2.conn.streams[sid].handler = (
            _Connecting(splice, task, h2.connecting) if decision.status == 200 else splice
        )
        if decision.status == 200:
            h2.connecting[sid] = task
            task.add_done_callback(functools.partial(_connected, h2.connecting, sid))
        self._track(task)

    async def _serve(
        self,
        h2: _InboundH2,
        splice: HboneSplice,
        workload: Workload,
        decision: InboundDecision,
        client: SocketAddr,
    ) -> None:
        record = self._record(workload, h2.peer, client, h2.hbone_addr)
        record.dst = decision.target
        record.verdict = decision.verdict
        if decision.status != 200 or decision.target is None:
            _refuse(h2, splice, decision.status, decision.reason)
            flags = ResponseFlags.DENY if decision.status == 401 else ResponseFlags.NONE
            self._refused(record, decision.status, decision.reason, flags)
            return
        target = decision.target
        app, why = await self._connect_app(record, target, splice)
        if app is None:
            if not splice.finished:
                _refuse(h2, splice, 503, why)
            return
        if splice.finished:  # the client gave up while we were connecting
            assert app.transport is not None
            app.transport.abort()
            record.finish(error="client went away before the app answered")
            return
        labels = self.labels(record, ResponseFlags.NONE)
        h2.conn.respond(splice.sid, 200, splice, end=False)
        splice.start(app)
        self.connection_table.follow(
            record, self, splice, labels, recheck=self.recheck, request_is_received=True
        )

    async def connect_local(
        self, peer: SpiffeId, client: SocketAddr, target: SocketAddr
    ) -> tuple[InboundDecision, LocalDelivery | None]:
        """The destination's half of a same-node connection, delivered in process.

        The source pod is enrolled in this same tunnel, so its identity is known without a
        handshake and its bytes never leave this process: the CONNECT a remote tunnel would
        send is checked exactly as `on_request` checks it (same `decide`, same authorizer,
        same access log, metrics and connection table), but no TLS or HTTP/2 framing is
        spent on a hop that does not exist. Returns the decision, and when it is 200 the
        connected app to join."""
        workload = self._workload()
        headers = [(":method", "CONNECT"), (":authority", str(target))]
        decision = decide(workload, headers, peer, client, self.authorize)
        record = self._record(workload, peer, client, LOCAL_HOP)
        record.dst = target
        record.verdict = decision.verdict
        if decision.status != 200:
            flags = ResponseFlags.DENY if decision.status == 401 else ResponseFlags.NONE
            self._refused(record, decision.status, decision.reason, flags)
            return decision, None
        app, why = await self._connect_app(record, target)
        if app is None:
            return InboundDecision(503, target, why), None
        return decision, LocalDelivery(self, record, app)

    def drain(self) -> None:
        """Graceful stop: GOAWAY on every HBONE connection, so clients open new streams
        elsewhere (the new tunnel's listener) while the open ones run to their end.
        Same-node connections run to their end too."""
        for h2 in list(self.connections):
            h2.drain("tunnel draining")

    def close(self) -> None:
        self.stopping = True
        for relay in list(self.relays):
            relay.abort(STOPPED)
        for h2 in list(self.connections):
            h2.close(reason="pod removed")


# The HBONE address shown for a same-node connection delivered in process.
LOCAL_HOP = "in-process"


class LocalDelivery:
    """The destination's book of one same-node connection: its connection-table entry,
    metrics and access-log line, kept exactly as for an HBONE stream. Inbound, the request
    direction is the pipe's `sent` (client -> app)."""

    __slots__ = ("app", "labels", "proxy", "record")

    def __init__(self, proxy: InboundProxy, record: Tracked, app: AppSide) -> None:
        self.proxy = proxy
        self.record = record
        self.app = app
        self.labels = proxy.labels(record, ResponseFlags.NONE)

    def attach(self, pipe: TcpPipe) -> None:
        """The source joined our app to its client: book the connection open until the
        pipe ends (however it ends)."""
        proxy = self.proxy
        proxy.connection_table.follow(self.record, proxy, pipe, self.labels, recheck=proxy.recheck)
