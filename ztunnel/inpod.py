"""In-pod mode: one set of listeners per enrolled pod, inside that pod's network namespace.

Which pods are enrolled reaches the tunnel in one of two ways. The local cluster's file
source is a small YAML file (`pods: [{uid, netns}]`) re-read when it changes, naming each
pod's netns by path. The node agent's ZDS socket (`ztunnel.zds_client`) hands over each
pod's netns as an open fd instead; the tunnel owns that fd (`NetnsFd`) from then on.
`PodProxy` owns everything of one pod: its netns fd, sockets factory, the three
listeners, its HBONE client pool, and its open connections.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import os
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog
import yaml

import nsutil
from meshcore import handoff, tls
from meshcore.defaults import HBONE_PORT, INBOUND_PLAIN_PORT, OUTBOUND_PORT, TUNNEL_MARK
from meshcore.hbone.dial import hbone_connect
from meshcore.hbone.pool import ConnectionPool, PoolKey
from meshcore.hbone.server import Guard, TlsListener
from meshcore.hbone.transport import H2Transport
from meshcore.identity.certs import CertificateSource, WorkloadCertificate
from meshcore.identity.spiffe import SpiffeId
from meshcore.observability.connections import ConnectionTable
from meshcore.relay import AppSide
from meshcore.runtime.tasks import TaskSet
from meshcore.sockets import (
    LISTEN_BACKLOG,
    NetnsSocketFactory,
    SocketAddr,
    SocketFactory,
    listener,
    original_dst,
)
from meshcore.state import IPAddress, MeshState, Workload
from zds.messages import WorkloadInfo
from ztunnel.dns.limits import DnsLimits
from ztunnel.dns.metrics import DnsMetrics
from ztunnel.dns.server import DNS_PORT, DnsProxy
from ztunnel.proxy.common import Authorizer, allow_all, reset
from ztunnel.proxy.inbound import InboundProxy
from ztunnel.proxy.inbound_passthrough import InboundPassthroughProxy
from ztunnel.proxy.outbound import OutboundProxy

log = structlog.get_logger(__name__)

# How often a pod's leftover TIME-WAIT sockets of the tunnel are looked for (a dump the
# kernel filters by the tunnel's mark), while the process serves few pods.
TIME_WAIT_SWEEP_INTERVAL = 5.0
# Each sweep's sock_diag dump walks the kernel's whole connection table (about 1.3 ms of CPU
# on this kind of machine however few sockets match, the event loop waiting): with many
# pods the sweeps are spaced at least this far apart on average, so a tunnel process does
# at most ten a second (200 pods: each swept every 20 s, instead of 52 ms of every second).
TIME_WAIT_SWEEP_SPACING = 0.1


def sweep_interval(pods: int) -> float:
    """How often each pod's TIME-WAIT sockets are swept when the process serves `pods`."""
    return max(TIME_WAIT_SWEEP_INTERVAL, pods * TIME_WAIT_SWEEP_SPACING)


class EnrolmentError(ValueError):
    """The enrolment file is malformed."""


class PodState(enum.Enum):
    """Where one enrolled pod's proxy is in its life; the values are what views show."""

    STARTING = "starting"  # its certificate and listeners are on their way
    READY = "ready"  # serving
    DRAINING = "draining"  # listeners closed; open connections run to their end
    STOPPING = "stopping"  # ending its connections, releasing its netns
    STOPPED = "stopped"


# The lifecycle, as a table: any other step is a bug, and is refused loudly.
_NEXT: dict[PodState, frozenset[PodState]] = {
    PodState.STARTING: frozenset({PodState.READY, PodState.DRAINING, PodState.STOPPING}),
    PodState.READY: frozenset({PodState.DRAINING, PodState.STOPPING}),
    # A draining tunnel may be asked to release the pod too: still draining.
    PodState.DRAINING: frozenset({PodState.DRAINING, PodState.STOPPING}),
    PodState.STOPPING: frozenset({PodState.STOPPED}),
    PodState.STOPPED: frozenset(),
}


def lifecycle_step(current: PodState, to: PodState, pod: str) -> PodState:
    """`to`, if the lifecycle allows going there from `current`; else a RuntimeError."""
    if to not in _NEXT[current]:
        raise RuntimeError(
            f"pod {pod}: {current.value} -> {to.value} is not a step of the pod lifecycle"
        )
    return to


class NetnsFd:
    """An open network-namespace fd that the tunnel owns (received over ZDS).

    Two handles on the same namespace have the same `name` (its device and inode), so an
    Add repeated for a pod whose netns did not change is recognised as nothing new, while
    a recreated pod sandbox (new netns) is not.
    """

    __slots__ = ("_fd", "name")

    def __init__(self, fd: int) -> None:
        st = os.fstat(fd)
        self._fd: int | None = fd
        self.name = f"netns:[{st.st_ino}] dev {st.st_dev}"

    def dup(self) -> int:
        """A new fd on the same namespace, owned by the caller (close-on-exec)."""
        if self._fd is None:
            raise OSError(f"{self.name} is already closed")
        return os.dup(self._fd)

    @property
    def closed(self) -> bool:
        return self._fd is None

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __repr__(self) -> str:
        return f"NetnsFd({self.name}{', closed' if self._fd is None else ''})"


@dataclass(frozen=True, slots=True)
class Enrolment:
    uid: str
    # The pod's network namespace: a path (file source), or the name of `netns_fd`.
    netns: str
    # Set for ZDS enrolments; the node closes it when the enrolment is dropped.
    netns_fd: NetnsFd | None = field(default=None, compare=False, repr=False)
    # ZDS WorkloadInfo: finds the pod's workload by name when its uid is not a mesh uid.
    info: WorkloadInfo | None = None

    @classmethod
    def from_fd(cls, uid: str, fd: int, info: WorkloadInfo | None = None) -> Enrolment:
        """An enrolment that takes ownership of `fd` (closed here if it is unusable)."""
        try:
            handle = NetnsFd(fd)
        except OSError:
            os.close(fd)
            raise
        return cls(uid, handle.name, handle, info)

    def open_netns(self) -> int:
        """A new fd on the pod's netns, owned by the caller."""
        if self.netns_fd is not None:
            return self.netns_fd.dup()
        return nsutil.open_netns(self.netns)

    def release(self) -> None:
        """Close the fd this enrolment owns (the pod no longer needs it)."""
        if self.netns_fd is not None:
            self.netns_fd.close()


def parse_enrolment(text: str) -> dict[str, Enrolment]:
    try:
        doc = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise EnrolmentError(f"enrolment file is not YAML: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("pods", []), list):
        raise EnrolmentError("enrolment file must be a mapping with a `pods` list")
    out: dict[str, Enrolment] = {}
    for i, entry in enumerate(doc.get("pods") or []):
        if not isinstance(entry, dict):
            raise EnrolmentError(f"pods[{i}] must be a mapping")
        uid, netns = entry.get("uid"), entry.get("netns")
        if not isinstance(uid, str) or not uid or not isinstance(netns, str) or not netns:
            raise EnrolmentError(f"pods[{i}] needs string `uid` and `netns`")
        out[uid] = Enrolment(uid, netns)
    return out


class FileEnrolmentSource:
    """Polls the enrolment file; calls `on_change` with the full desired set."""

    def __init__(
        self, path: Path, on_change: Callable[[dict[str, Enrolment]], None], interval: float = 0.2
    ) -> None:
        self._path = path
        self._on_change = on_change
        self._interval = interval
        self._digest = b""
        self._task: asyncio.Task[None] | None = None

    def check(self) -> None:
        try:
            text = self._path.read_text()
        except FileNotFoundError:
            text = ""
        digest = hashlib.sha256(text.encode()).digest()
        if digest == self._digest:
            return
        try:
            pods = parse_enrolment(text)
        except EnrolmentError as e:
            log.error("enrolment rejected", path=str(self._path), error=str(e))
            self._digest = digest
            return
        self._digest = digest
        self._on_change(pods)

    async def start(self) -> None:
        self.check()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="enrolment")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            self.check()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


class _Accepted:
    """Every connection a pod's listeners accepted and not yet lost, so that stopping the
    pod closes them all, even one whose handler task had not run yet when it was cancelled
    (asyncio's `Server.close()` leaves accepted connections open). A connection leaves the
    book as it is lost (`AppSide.on_lost`), so the book holds open connections only: kept
    until a periodic prune, a closed one held its relay's objects while churn went on
    beside long-lived connections (with N held, up to N closed ones)."""

    def __init__(self) -> None:
        self._protocols: dict[AppSide, None] = {}  # an ordered set
        self._forget = self._drop  # one bound method for every connection

    def wrap(self, factory: Callable[[], AppSide]) -> Callable[[], AppSide]:
        def make() -> AppSide:
            protocol = factory()
            protocol.on_lost = self._forget
            self._protocols[protocol] = None
            return protocol

        return make

    def _drop(self, protocol: AppSide) -> None:
        self._protocols.pop(protocol, None)

    def open_count(self) -> int:
        """Connections up and not closing, and those accepted and not yet made. The loop
        makes the protocol as it accepts and calls `connection_made` one turn later: a
        drain that looked in between, counting only connections with a transport, found
        the pod idle and stopped it, and that connection, made then, was closed before
        its first byte. (The plain asyncio loop, a fallback, can lose a connection in that
        turn itself when the listener closes: it then stays here, not made, until the
        drain's deadline. The proxies run on uvloop, which makes the transport as it
        accepts.)"""
        return sum(
            1 for p in self._protocols if p.transport is None or not p.transport.is_closing()
        )

    def abort_all(self) -> None:
        """Close every connection: those up at once, those not yet made as they are made
        (with a reset, as for any connection a stopped pod cannot serve)."""
        protocols, self._protocols = self._protocols, {}
        for p in protocols:
            p.on_lost = None  # the book is gone already
            transport = p.transport
            if transport is None:
                p.on_made = _reset_when_made
            elif not transport.is_closing():
                transport.abort()


def _reset_when_made(app: AppSide) -> None:
    """For a connection accepted by a pod that stopped before it was made: never served."""
    assert app.transport is not None
    reset(app.transport)


class PodProxy:
    """Listeners and connections of one enrolled pod."""

    def __init__(
        self,
        enrolment: Enrolment,
        workload: Workload,
        state: Callable[[], MeshState],
        certs: CertificateSource,
        trust_domain: str,
        authorize: Authorizer = allow_all,
        factory: SocketFactory | None = None,
        connection_table: ConnectionTable | None = None,
        local: Callable[[Workload], InboundProxy | None] | None = None,
        *,
        listen_ip: str = "0.0.0.0",
        orig_dst: Callable[[socket.socket], SocketAddr] = original_dst,
        guard: Guard | None = None,
        dns_upstreams: tuple[IPAddress, ...] | None = None,
        dns_port: int = DNS_PORT,
        dns_metrics: DnsMetrics | None = None,
        dns_limits: DnsLimits | None = None,
        dns_listen: bool = True,
        processes: int = 1,
        pods_served: Callable[[], int] | None = None,
    ) -> None:
        """`listen_ip` and `orig_dst` are for pods side by side on loopback (tests, the
        plain factory): where the listeners bind, and the original destination the
        capture would have recorded (SO_ORIGINAL_DST needs the kernel's REDIRECT).
        `dns_upstreams`: run the DNS proxy (127.0.0.1:15053 in the pod, or `listen_ip`)
        forwarding to these resolvers; None runs none. `dns_listen` false: the DNS proxy
        only resolves for this pod's connections (a worker process; its owner listens).
        `processes`: how many processes of this tunnel listen for the pod (a drain tells
        another tunnel's listeners from its own by that count). `pods_served`: how many
        pods this process serves now (the TIME-WAIT sweeps are spaced by it)."""
        self._pods_served = pods_served
        self._dns_listen = dns_listen
        self._dns_upstreams = dns_upstreams
        self._dns_port = dns_port
        self._dns_metrics = dns_metrics
        self._dns_limits = dns_limits
        self.dns: DnsProxy | None = None
        self.connection_table = (
            connection_table if connection_table is not None else ConnectionTable()
        )
        self._local = local
        # The node's guard: the handshake limits are per tunnel, not per pod.
        self.guard = guard if guard is not None else Guard()
        self._listen_ip = listen_ip
        self._orig_dst = orig_dst
        self.enrolment = enrolment
        self.workload = workload
        self._state = state
        self._certs = certs
        self._trust_domain = trust_domain
        self._authorize = authorize
        self._factory = factory
        self.tasks = TaskSet(f"pod:{workload.name}")
        self._sweeper: asyncio.TimerHandle | None = None
        self.servers: list[asyncio.Server] = []
        self.hbone_server: TlsListener | None = None
        self.server_ctx: ssl.SSLContext | None = None
        self.client_ctx: ssl.SSLContext | None = None
        self._client_expiry = 0.0  # client_ctx's certificate's notAfter (Unix time)
        self.pool: ConnectionPool | None = None
        self.inbound: InboundProxy | None = None
        self.outbound: OutboundProxy | None = None
        self.passthrough: InboundPassthroughProxy | None = None
        self.state = PodState.STARTING
        self._unsubscribe: Callable[[], None] | None = None
        self._accepted = _Accepted()
        self._processes = processes
        # The TCP listening sockets (for a drain's SYN filter), the close a drain delays,
        # and whether the listeners are closed.
        self._listening: list[socket.socket] = []
        self._settling: asyncio.TimerHandle | None = None
        self._left = False

    @property
    def identity(self) -> SpiffeId:
        return self.workload.identity

    def listeners(self) -> dict[str, str]:
        """Where this pod's listeners are bound (inside its netns), for the config dump."""
        out: dict[str, str] = {}
        named = [("outbound", s) for s in self.servers[:1]]
        named += [("inbound_plaintext", s) for s in self.servers[1:2]]
        for name, server in named:
            addrs = [sock.getsockname() for sock in server.sockets]
            out[name] = ", ".join(f"{a[0]}:{a[1]}" for a in addrs) or "closed"
        if self.hbone_server is not None:
            out["inbound"] = self.hbone_server.address
        if self.dns is not None and self.dns.udp_address is not None:
            host, port = self.dns.udp_address
            out["dns"] = f"{host}:{port} (udp, tcp)"
        return out

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._factory is None:
            self._factory = NetnsSocketFactory(self.enrolment.open_netns())
        factory = self._factory
        if isinstance(factory, NetnsSocketFactory):
            _hand_over_queued_connections(factory.netns_fd, self.workload.name)
        cert = await self._certs.get(self.identity)
        self.server_ctx = tls.server_context(cert)
        self.client_ctx = tls.client_context(cert)
        self._client_expiry = cert.not_after.timestamp()
        self._unsubscribe = self._certs.on_update(self._on_cert)

        def track(fut: asyncio.Future[None]) -> None:
            self.tasks.track(fut)

        pool = ConnectionPool(self._connect)
        self.pool = pool
        if self._dns_upstreams is not None:
            self.dns = DnsProxy(
                lambda: self.workload,
                self._state,
                factory,
                self._dns_upstreams,
                self._dns_limits,
                metrics=self._dns_metrics,
            )
        self.outbound = outbound = OutboundProxy(
            lambda: self.workload,
            self._state,
            factory,
            pool,
            track,
            orig_dst=self._orig_dst,
            connection_table=self.connection_table,
            local=self._local,
            guard=self.guard,
            resolver=self.dns.lookup if self.dns is not None else None,
        )
        self.inbound = InboundProxy(
            lambda: self.workload,
            factory,
            self._trust_domain,
            track,
            self._authorize,
            connection_table=self.connection_table,
            state=self._state,
            guard=self.guard,
        )
        self.passthrough = InboundPassthroughProxy(
            lambda: self.workload,
            factory,
            track,
            self._authorize,
            orig_dst=self._orig_dst,
            connection_table=self.connection_table,
            state=self._state,
            guard=self.guard,
        )
        if isinstance(factory, NetnsSocketFactory):
            outbound.end_mirrored_time_waits(factory.time_waits, OUTBOUND_PORT)
            self.passthrough.end_mirrored_time_waits(factory.time_waits, INBOUND_PLAIN_PORT)
            self._sweep_time_waits(factory)
        socks = [
            listener(factory, OUTBOUND_PORT, host=self._listen_ip),
            listener(factory, INBOUND_PLAIN_PORT, host=self._listen_ip),
        ]
        self._listening = list(socks)
        try:
            self.servers = [
                # backlog again: the loop would listen(100) on them otherwise.
                await loop.create_server(
                    self._accepted.wrap(outbound.protocol), sock=socks[0], backlog=LISTEN_BACKLOG
                ),
                await loop.create_server(
                    self._accepted.wrap(self.passthrough.protocol),
                    sock=socks[1],
                    backlog=LISTEN_BACKLOG,
                ),
            ]
        except BaseException:
            for s in socks:
                s.close()
            raise
        self.hbone_server = await self._hbone_server(self.server_ctx)
        if self.dns is not None and self._dns_listen:
            host = "127.0.0.1" if self._listen_ip == "0.0.0.0" else self._listen_ip
            await self.dns.start(host, self._dns_port)
        self._move(PodState.READY)

    def _sweep_time_waits(self, factory: NetnsSocketFactory) -> None:
        """End, now and every few seconds until the pod stops, the TIME-WAIT sockets with the
        tunnel's mark that no tunnel process ended itself: those of a tunnel that was killed
        (the kernel closed its sockets), or whose app closed after the tunnel's socket was
        gone. Under the eBPF capture each blocks a client port for a minute
        (meshcore.timewait). A timer, not a task: the pod's tasks are its connections', and a
        draining pod waits for them."""
        reaper = factory.time_waits
        families = tuple(
            {socket.AF_INET6 if ip.version == 6 else socket.AF_INET for ip in self.workload.ips}
        )
        ended = reaper.sweep(TUNNEL_MARK, HBONE_PORT, families or (socket.AF_INET,))
        if ended:
            log.info("time-wait sockets ended", pod=self.workload.name, count=ended)
        if reaper.failed is not None:
            log.warning(
                "time-wait sockets cannot be ended here; an eBPF-captured client may wait a "
                "minute for a port after a server closed first",
                pod=self.workload.name,
                error=os.strerror(reaper.failed),
            )
            return
        pods = self._pods_served() if self._pods_served is not None else 1
        self._sweeper = asyncio.get_running_loop().call_later(
            sweep_interval(pods), self._sweep_time_waits, factory
        )

    def _move(self, to: PodState) -> None:
        self.state = lifecycle_step(self.state, to, self.workload.name)

    async def _hbone_server(self, ctx: ssl.SSLContext) -> TlsListener:
        assert self._factory is not None and self.inbound is not None
        sock = listener(self._factory, HBONE_PORT, host=self._listen_ip)
        server = TlsListener(ctx, self.inbound.protocol, self.guard.gate)
        try:
            await server.start(sock)
        except BaseException:
            sock.close()
            raise
        return server

    async def _connect(self, key: PoolKey) -> H2Transport:
        assert self._factory is not None and self.pool is not None
        pool = self.pool

        own_expiry = [self._client_expiry]

        def context(_identity: SpiffeId) -> ssl.SSLContext:
            assert self.client_ctx is not None
            own_expiry[0] = self._client_expiry  # of the certificate this handshake uses
            return self.client_ctx

        def verify(h2: H2Transport, expected: frozenset[SpiffeId]) -> None:
            assert h2.transport is not None
            ssl_object = h2.transport.get_extra_info("ssl_object")
            peer = tls.hbone_peer(ssl_object)
            tls.verify_server(peer, expected)
            # The pool stops using it shortly before either side's certificate expires.
            peer_expiry = tls.peer_not_after(ssl_object)
            h2.expires_at = min(own_expiry[0], peer_expiry or own_expiry[0])

        return await hbone_connect(key, self._factory, context, verify, pool.forget, self.guard)

    def _on_cert(self, cert: WorkloadCertificate) -> None:
        if cert.identity != self.identity:
            return
        # New connections use the new certificate; open ones keep theirs (the pool gives
        # them no new stream once their certificates are about to expire).
        self.client_ctx = tls.client_context(cert)
        self._client_expiry = cert.not_after.timestamp()
        self.tasks.spawn(self._rotate_server(tls.server_context(cert)), "rotate-15008")

    async def _rotate_server(self, ctx: ssl.SSLContext) -> None:
        # A server keeps the SSL context it was created with. SO_REUSEPORT lets a new
        # listener with the new certificate open beside the old one before it closes, so
        # no connection attempt meets a closed port.
        new = await self._hbone_server(ctx)
        if self.state in (PodState.DRAINING, PodState.STOPPING, PodState.STOPPED):
            new.close()  # the pod began to leave meanwhile: no listener opens after that
            return
        old, self.hbone_server, self.server_ctx = self.hbone_server, new, ctx
        if old is not None:
            old.stop_accepting()  # its handshakes in progress may finish

    def stop_accepting(self) -> None:
        """Drain, step one: take no new connection and send GOAWAY on the HBONE
        connections. Connections already accepted keep running.

        With another tunnel listening beside this one (an upgrade with surge), the
        listeners close at once: what is queued on them moves to the other tunnel's
        (tcp_migrate_req). Alone, they first drop new SYNs (retried by the client's kernel,
        for the next tunnel) and go on accepting for `SETTLE_SECONDS`, so the connections
        already on their way in are served here instead of reset by the close
        (meshcore.handoff)."""
        self._move(PodState.DRAINING)
        if self.inbound is not None:
            self.inbound.drain()
        if self._settling is not None or self._left:
            return  # leaving already (released while the whole tunnel drains)
        if self._successor_listens():
            self._close_listeners()
            return
        socks = list(self._listening)
        if self.hbone_server is not None and self.hbone_server.sock is not None:
            socks.append(self.hbone_server.sock)  # the current one: rotation replaces it
        for sock in socks:
            try:
                handoff.refuse_new_connections(sock)
            except OSError as e:
                log.warning("cannot hold new connections off a leaving listener",
                            pod=self.workload.name, error=str(e))  # fmt: skip
        self._settling = asyncio.get_running_loop().call_later(
            handoff.SETTLE_SECONDS, self._close_listeners
        )

    def _successor_listens(self) -> bool:
        """Whether a tunnel other than this one listens on the pod's outbound port: more
        listeners there than this tunnel's processes hold. When the kernel cannot say, no
        (the slower way never loses a connection)."""
        address = (self._listen_ip, OUTBOUND_PORT)
        opener = (
            self._factory.diag_socket
            if isinstance(self._factory, NetnsSocketFactory)
            else handoff.diag_socket
        )
        try:
            return handoff.count_listeners(opener, address) > self._processes
        except OSError as e:
            log.warning("cannot count the pod's listeners", pod=self.workload.name, error=str(e))
            return False

    def _close_listeners(self) -> None:
        self._left = True
        if self._settling is not None:
            self._settling.cancel()
            self._settling = None
        for server in self.servers:
            server.close()
        if self.hbone_server is not None:
            self.hbone_server.stop_accepting()
        if self.inbound is not None and self.state is PodState.DRAINING:
            self.inbound.drain()  # those accepted while settling

    @property
    def busy(self) -> bool:
        """Whether any accepted connection (or its handler) is still open, or a listener is
        still settling."""
        return (
            self._settling is not None
            or len(self.tasks) > 0
            or self._accepted.open_count() > 0
            or (self.hbone_server is not None and len(self.hbone_server.handshaking) > 0)
            or (self.inbound is not None and len(self.inbound.relays) > 0)
        )

    async def stop(self) -> None:
        if self.state in (PodState.STOPPING, PodState.STOPPED):
            return  # stopping twice is stopping once
        self._move(PodState.STOPPING)
        if self._unsubscribe is not None:
            self._unsubscribe()
        if self._settling is not None:
            self._settling.cancel()
            self._settling = None
        for server in self.servers:
            server.close()
        if self.hbone_server is not None:
            self.hbone_server.close()
        if self.outbound is not None:
            self.outbound.close()
        if self.inbound is not None:
            self.inbound.close()
        if self.passthrough is not None:
            self.passthrough.close()
        if self.pool is not None:
            self.pool.close()
        if self.dns is not None:
            await self.dns.close()
        await self.tasks.cancel_all()
        if self._sweeper is not None:
            self._sweeper.cancel()
        self._accepted.abort_all()
        if isinstance(self._factory, NetnsSocketFactory):
            self._factory.close()
        self._move(PodState.STOPPED)


def _hand_over_queued_connections(netns_fd: int, pod: str) -> None:
    """tcp_migrate_req=1 in the pod's netns: when a listener closes, the connections in its
    accept queue (and half-open ones) move to another listener of its SO_REUSEPORT group,
    e.g. the new tunnel's during an upgrade, instead of being reset. Per netns, Linux 5.14+."""
    try:
        nsutil.write_sysctl(netns_fd, "net/ipv4/tcp_migrate_req", "1")
    except OSError as e:
        log.warning("cannot enable tcp_migrate_req; an upgrade may reset queued connections",
                    pod=pod, error=str(e))  # fmt: skip
