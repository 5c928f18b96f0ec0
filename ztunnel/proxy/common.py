"""What the three capture listeners of a pod share: the listener skeleton, the authorizer
seam, the TCP connect from inside the pod, and the destination's metric labels."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import struct
from asyncio import Future
from collections.abc import Callable
from typing import Any, TypeVar

from meshcore.hbone.dial import CONNECT_TIMEOUT as CONNECT_TIMEOUT
from meshcore.hbone.limits import HboneLimits
from meshcore.hbone.server import Guard
from meshcore.identity.spiffe import SpiffeId
from meshcore.observability.connections import STOPPED, Relay
from meshcore.observability.metrics import TcpLabels, tcp_labels
from meshcore.policy.verdict import ALLOW_ALL, Verdict
from meshcore.relay import AppSide
from meshcore.sockets import SocketAddr, SocketFactory, make_transparent, tune_stream
from meshcore.state import Workload
from meshcore.timewait import TCP_CLOSE, TimeWaitReaper, cookie_of, tcp_state

# The authorization seam: (destination workload, peer identity or None for plaintext,
# client address, target) -> the verdict. The node plugs in the policy index's `authorize`.
Authorizer = Callable[[Workload, SpiffeId | None, SocketAddr, SocketAddr], Verdict]


def allow_all(_w: Workload, _p: SpiffeId | None, _c: SocketAddr, _t: SocketAddr) -> Verdict:
    return ALLOW_ALL


T = TypeVar("T")


def _expire(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


async def within(fut: asyncio.Future[T], seconds: float) -> T:
    """`await fut`, failed with TimeoutError after `seconds`. One timer and nothing else: a
    timeout scope or `wait_for` cost several objects and callbacks, once per connection in
    each tunnel. At the deadline the future is failed (not cancelled)."""
    handle = asyncio.get_running_loop().call_later(seconds, _expire, fut)
    try:
        return await fut
    finally:
        handle.cancel()


async def connect_tcp(
    factory: SocketFactory, target: SocketAddr, as_client: str | None = None
) -> tuple[asyncio.Transport, AppSide]:
    """A TCP connection to `target` from the factory's namespace. With `as_client` (an IP)
    and a transparent factory, the connection leaves from that address, so an app in the
    pod sees the real client."""
    loop = asyncio.get_running_loop()
    sock = factory.new(socket.AF_INET6 if target.ip.version == 6 else socket.AF_INET)
    try:
        tune_stream(sock)
        if as_client is not None and factory.transparent:
            make_transparent(sock, as_client)
        await _connect(loop, sock, target)
        transport, app = await loop.create_connection(AppSide, sock=sock)
        # The app's answer and its FIN are sent on as one (AppSide._eof_behind). The loop
        # detaches this object when it closes the connection: a peek then fails, not reads
        # another connection's descriptor.
        app.peek = sock
        return transport, app
    except BaseException:
        sock.close()
        raise


def _writable(loop: asyncio.AbstractEventLoop, sock: socket.socket, fut: Future[None]) -> None:
    # The poll ends inside its own callback, as the loop's sock_connect does: the socket's
    # descriptor is watched by nothing by the time create_connection takes it over.
    loop.remove_writer(sock)
    if not fut.done():
        fut.set_result(None)


async def _connect(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, target: SocketAddr
) -> None:
    """Connect the non-blocking `sock` to `target`, failed with TimeoutError after
    CONNECT_TIMEOUT. Not the loop's sock_connect: under uvloop it resolves the address
    first, and with no socket type given that is a real getaddrinfo on libuv's thread
    pool, once per connection, for an address that is already numeric. One timer, not a
    timeout scope, for the same reason as `within`. The errors are the loop's own: the
    connect's OSError at once, or `Connect call failed (address)` with the error the
    socket reports. (A connect polled this way once seemed to break other connections on
    loopback: faster connects had reached the listener's in-flight double count, since
    fixed.)"""
    address = target.pair if target.ip.version == 4 else (*target.pair, 0, 0)
    try:
        sock.connect(address)
        return
    except (BlockingIOError, InterruptedError):
        pass
    # An app in the pod's own netns is reached over the loopback device, and the kernel
    # completes the whole handshake inside connect() (the SYN, SYN-ACK and ACK are
    # processed before it returns): then a peer name is there already, and the poll for
    # writability (two epoll changes, a future, a timer and a loop turn) is not needed.
    with contextlib.suppress(OSError):
        sock.getpeername()
        return
    fut: Future[None] = loop.create_future()
    loop.add_writer(sock, _writable, loop, sock, fut)
    handle = loop.call_later(CONNECT_TIMEOUT, _expire, fut)
    try:
        await fut
    finally:
        handle.cancel()
        loop.remove_writer(sock)  # timed out or cancelled: before the socket is closed
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err != 0:
        raise OSError(err, f"Connect call failed {address}")


# The limits a listener's new connection is held to (HboneLimits fields), as reported.
IN_FLIGHT_LIMIT = "max_connects_in_flight_per_listener"
POD_LIMIT = "max_connections_per_pod"
TUNNEL_LIMIT = "max_connections_per_tunnel"


def connection_refusal(
    limits: HboneLimits, in_flight: int, relaying: int, tunnel_open: int
) -> str | None:
    """Which limit a newly accepted connection of a pod's listener exceeds, or None.
    `in_flight`: the listener's connections not yet joined; `relaying`: its relays;
    `tunnel_open`: every connection the tunnel holds open."""
    if in_flight >= limits.max_connects_in_flight_per_listener:
        return IN_FLIGHT_LIMIT
    if in_flight + relaying >= limits.max_connections_per_pod:
        return POD_LIMIT
    if tunnel_open + in_flight >= limits.max_connections_per_tunnel:
        return TUNNEL_LIMIT
    return None


_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends an RST


def reset(transport: asyncio.Transport) -> None:
    """Close an accepted connection with an RST: the app sees a refusal at once, not an
    empty answer, and the kernel keeps nothing of it (no TIME_WAIT)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()


class ListenerProxy:
    """The skeleton of a proxy behind a listener of a pod (15001, 15006): one task per
    accepted connection, its relay booked in `relays` until it ends, and `close` to end
    them all when the pod leaves (each is then logged as stopped).

    Connections accepted and not yet joined to where they go (the task still runs) are
    bounded by the guard's `max_connects_in_flight_per_listener`, all of the listener's
    connections by `max_connections_per_pod`, and the tunnel's by
    `max_connections_per_tunnel`: past one, a new connection is reset at once and the
    refusal goes through the guard (`direction` as it counts it, the limit as reason), so
    an app in the pod cannot make the tunnel hold descriptors and tasks without bound."""

    def __init__(
        self,
        tasks: Callable[[asyncio.Future[None]], None],
        guard: Guard | None = None,
        direction: str = "outbound",
    ) -> None:
        self._track = tasks
        self.guard = guard if guard is not None else Guard()
        self._direction = direction
        self.relays: dict[Relay, None] = {}  # an ordered set
        self.stopping = False
        self.in_flight = 0  # accepted, their task still running
        self._on_accept = self._accepted  # one bound method for every accepted connection
        self._reaper: TimeWaitReaper | None = None
        self._port = 0

    def end_mirrored_time_waits(self, reaper: TimeWaitReaper, port: int) -> None:
        """Connections accepted on `port` that keep the app's addresses (eBPF capture) get
        their TIME-WAIT ended through `reaper` (why: meshcore.timewait)."""
        self._reaper = reaper
        self._port = port

    def protocol(self) -> AppSide:
        return AppSide(on_made=self._on_accept)

    def _accepted(self, app: AppSide) -> None:
        t = app.transport
        assert t is not None
        over = connection_refusal(
            self.guard.limits, self.in_flight, len(self.relays), self.guard.tunnel_connections()
        )
        if over is not None:
            peer = t.get_extra_info("peername")
            reset(t)
            where = f"{peer[0]}:{peer[1]}" if peer else "unknown"
            self.guard.refused(self._direction, over, where)
            return
        self.in_flight += 1
        if self._reaper is not None:
            self._watch_time_wait(app, t)
        self._track(asyncio.get_running_loop().create_task(self._run(app)))

    async def _run(self, app: AppSide) -> None:
        # The count drops in the step that booked the relay (or gave up), not in a done
        # callback a loop turn later: in between, a connection accepted would be counted
        # twice, in flight and relaying, and refused below its limit. (A task cancelled
        # before its first step skips this: only the pod's stop does that, and then the
        # listener takes nothing more.)
        try:
            await self._handle(app)
        finally:
            self.in_flight -= 1

    def _watch_time_wait(self, app: AppSide, t: asyncio.Transport) -> None:
        local = t.get_extra_info("sockname")
        if not local or local[1] == self._port:
            return  # redirected (iptables): the tunnel's own port, nothing mirrored
        sock = t.get_extra_info("socket")
        remote = t.get_extra_info("peername")
        # The cookie now: a TIME-WAIT socket keeps the cookie its socket had by then. The
        # addresses now too: a socket whose connection went to TIME-WAIT has no peer name.
        with contextlib.suppress(OSError):
            app.on_eof = functools.partial(
                self._end_time_wait, (sock.family, local[:2], remote[:2], cookie_of(sock))
            )

    def _end_time_wait(self, mirrored: tuple[int, Any, Any, int], app: AppSide) -> None:
        """The app's EOF arrived. Our socket is closed already only when we had sent the
        first FIN and the app's FIN made it a TIME-WAIT socket: end that one."""
        t, reaper = app.transport, self._reaper
        if t is None or reaper is None:
            return
        try:
            if tcp_state(t.get_extra_info("socket")) == TCP_CLOSE:
                reaper.forget(*mirrored)
        except OSError:
            pass  # a TIME-WAIT left behind is the old behaviour, never an error

    async def _handle(self, app: AppSide) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """The pod is leaving: end its open connections (logged as stopped)."""
        self.stopping = True
        for relay in list(self.relays):
            relay.abort(STOPPED)


def inbound_labels(
    source: Workload | None, workload: Workload, peer: SpiffeId | None, flags: str
) -> TcpLabels:
    """Metric labels as the destination reports them: the client's workload is whatever
    owns its address (if the mesh knows it), its principal what it proved (if anything)."""
    return tcp_labels(
        reporter="destination",
        source=source,
        source_identity=peer,
        destination=workload,
        destination_identity=workload.identity,
        service=None,
        response_flags=flags,
        mtls=peer is not None,
    )
