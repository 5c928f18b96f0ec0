"""Outbound (15001): what an enrolled pod's captured connection becomes.

`decide` is pure: from the mesh state, the source workload and the original destination it
returns a frozen `OutboundDecision` (HBONE to a pod's 15008 or to a waypoint, plain
passthrough, or refuse). `OutboundProxy` carries the decision out.

Waypoints, as upstream ztunnel's `build_request` (see `ztunnel.proxy.waypoint`):
1. a service VIP whose service has a waypoint: HBONE to a waypoint endpoint's
   `IP:hbone_port`, `:authority` the original `VIP:port`, the waypoint's identity expected;
2. a pod IP whose workload has a waypoint, unless the connection comes from that
   waypoint: HBONE to the waypoint, `:authority` the original `podIP:port`;
3. otherwise to the destination itself.
A bound waypoint that is missing or not ready refuses the connection (fail closed) unless
its address says `failOpen`.
"""

from __future__ import annotations

import asyncio
import enum
import os
import random
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace

import structlog

from meshcore.defaults import HBONE_PORT, TUNNEL_PORTS
from meshcore.hbone.h2frames import ErrorCode
from meshcore.hbone.pool import ConnectionPool, PoolKey
from meshcore.hbone.server import Guard
from meshcore.identity.spiffe import SpiffeId
from meshcore.observability.accesslog import Direction
from meshcore.observability.connections import STOPPED, ConnectionTable, Tracked
from meshcore.observability.metrics import ResponseFlags, TcpLabels, tcp_labels
from meshcore.relay import AppSide, HboneSplice, TcpPipe
from meshcore.serviceentry import Resolution
from meshcore.sockets import SocketAddr, SocketFactory, original_dst, shared_addr
from meshcore.state import HealthStatus, IPAddress, MeshState, Service, TunnelProtocol, Workload
from meshcore.tls import PeerVerificationError
from ztunnel.proxy.common import CONNECT_TIMEOUT, ListenerProxy, connect_tcp, within
from ztunnel.proxy.inbound import LOCAL_HOP, InboundProxy
from ztunnel.proxy.waypoint import (
    WAYPOINT_UNAVAILABLE,
    Binding,
    WaypointHop,
    choose_waypoint,
    is_from_waypoint,
    waypoint_sans,
)

log = structlog.get_logger(__name__)

# Attempts for a CONNECT whose stream the server refused unprocessed (REFUSED_STREAM).
CONNECT_ATTEMPTS = 3


class Route(enum.Enum):
    HBONE = "hbone"  # mTLS HTTP/2 CONNECT to the destination pod's tunnel
    PASSTHROUGH = "passthrough"  # plain TCP: the destination is not in the mesh
    REFUSE = "refuse"  # nothing may be sent


@dataclass(frozen=True, slots=True)
class OutboundDecision:
    route: Route
    # Where the app's bytes are finally delivered (the pod IP and target port).
    target: SocketAddr | None
    # The TCP address the tunnel connects to: the pod's 15008 for HBONE, else the target.
    next_hop: SocketAddr | None = None
    # Identities the HBONE server may prove (the workload's, plus the service's SANs).
    expected_identities: frozenset[SpiffeId] = frozenset()
    # The workload at the other end of the HBONE connection: the destination pod, or the
    # waypoint when the connection goes through one.
    destination: Workload | None = None
    service: Service | None = None
    reason: str = ""
    # The waypoint the destination is bound to: the hop through it (then `target` is the
    # original destination, sent as `:authority`, and `next_hop` the waypoint), or why it
    # was not used (refused, or failed open).
    waypoint: WaypointHop | None = None
    # PASSTHROUGH to a DNS name (a ServiceEntry with resolution DNS): (host, port), resolved
    # when the connection is made, through the pod's upstream resolvers; then `next_hop` is
    # None until it is resolved.
    resolve: tuple[str, int] | None = None

    @property
    def authority(self) -> str:
        return str(self.target)

    @property
    def via_waypoint(self) -> bool:
        return self.waypoint is not None and self.waypoint.endpoint is not None


def _target_port(service: Service, endpoint: Workload, port: int) -> int | None:
    # The endpoint's own mapping wins (a pod may use another port than the service's
    # default target port), as upstream.
    mapped = endpoint.target_port(service.key, port)
    return mapped if mapped is not None else service.target_port(port)


def _endpoint_ip(endpoint: Workload, dst: SocketAddr) -> IPAddress:
    # A dual-stack endpoint is reached in the family the app used (as upstream's
    # pick_workload_destination); a single-stack one at the address it has.
    for ip in endpoint.ips:
        if ip.version == dst.ip.version:
            return ip
    return endpoint.ips[0]


def decide(
    state: MeshState,
    source: Workload,
    dst: SocketAddr,
    choose: Callable[[Sequence[Workload]], Workload] = random.choice,
    client: IPAddress | None = None,
    bypass_waypoint: bool = False,
) -> OutboundDecision:
    """`client`: the address the connection came from (the source pod's own IPs if not
    given); with the source's identity it tells a waypoint's own upstream leg.
    `bypass_waypoint`: the decision once a fail-open waypoint could not be reached."""
    if dst.port in TUNNEL_PORTS:
        return OutboundDecision(Route.REFUSE, dst, reason=f"port {dst.port} is the tunnel's own")
    service = state.service_by_vip(source.network, dst.ip)
    if service is not None:
        hop: WaypointHop | None = None
        gw = None if bypass_waypoint else service.waypoint
        if gw is not None and not is_from_waypoint(state, gw, source, client):
            hop = choose_waypoint(state, gw, Binding.SERVICE, f"service {service.key}", dst, choose)
            if not hop.failed_open:
                return _through_waypoint(state, hop, dst, service)
        return _with_hop(_to_service(state, service, dst, choose), hop)
    workload = state.workload_by_ip(source.network, dst.ip)
    if workload is None:
        return OutboundDecision(
            Route.PASSTHROUGH, dst, next_hop=dst, reason="destination is not a known workload"
        )
    gw = None if bypass_waypoint else workload.waypoint
    if gw is not None and not is_from_waypoint(state, gw, source, client):
        bound = f"workload {workload.namespace}/{workload.name}"
        hop = choose_waypoint(state, gw, Binding.WORKLOAD, bound, dst, choose, behind=workload)
        if not hop.failed_open:
            return _through_waypoint(state, hop, dst, None)
        return _with_hop(_to_workload(workload, dst, None), hop)
    return _to_workload(workload, dst, None)


def _with_hop(decision: OutboundDecision, hop: WaypointHop | None) -> OutboundDecision:
    """A direct decision that failed open past an unavailable waypoint says so."""
    if hop is None:
        return decision
    return replace(decision, waypoint=hop, reason=f"{hop.describe()}: {decision.reason}")


def _through_waypoint(
    state: MeshState, hop: WaypointHop, dst: SocketAddr, service: Service | None
) -> OutboundDecision:
    """HBONE to the waypoint with the original destination as the authority; or, with no
    ready endpoint (and no failOpen), a refusal that names the waypoint."""
    endpoint = hop.endpoint
    if endpoint is None:
        return OutboundDecision(
            Route.REFUSE, dst, service=service, reason=hop.describe(), waypoint=hop
        )
    sans = waypoint_sans(state, hop.address)
    return OutboundDecision(
        Route.HBONE,
        dst,  # the original VIP:port or podIP:port, never translated
        next_hop=SocketAddr(endpoint.ip, endpoint.hbone_port),
        expected_identities=frozenset({endpoint.workload.identity, *sans}),
        destination=endpoint.workload,
        service=service,
        reason=hop.describe(),
        waypoint=hop,
    )


def _to_service(
    state: MeshState,
    service: Service,
    dst: SocketAddr,
    choose: Callable[[Sequence[Workload]], Workload],
) -> OutboundDecision:
    candidates = _ready_endpoints(state, service, dst.port)
    if service.target_port(dst.port) is None and not candidates:
        return OutboundDecision(
            Route.REFUSE,
            dst,
            service=service,
            reason=f"{service.hostname} has no port {dst.port}",
        )
    if not candidates:
        by_entry = _by_entry(state, service, dst)
        if by_entry is not None:
            return by_entry
        return OutboundDecision(
            Route.REFUSE,
            dst,
            service=service,
            reason=f"{service.hostname} has no healthy endpoints",
        )
    endpoint = choose(candidates)
    tport = _target_port(service, endpoint, dst.port)
    assert tport is not None
    return _to_workload(endpoint, SocketAddr(_endpoint_ip(endpoint, dst), tport), service)


def _ready_endpoints(state: MeshState, service: Service, port: int) -> tuple[Workload, ...]:
    """The service's endpoints a connection to its `port` may go to: healthy, with an
    address and a target port. Listed once per mesh state: each new connection to a
    service of a thousand pods would otherwise walk all of them (about 0.2 ms)."""

    def ready() -> tuple[Workload, ...]:
        return tuple(
            w
            for w in state.endpoints(service)
            if w.status is HealthStatus.HEALTHY and w.ips and _target_port(service, w, port)
        )

    return state.per_port("outbound.ready", service, port, ready)


def _by_entry(state: MeshState, service: Service, dst: SocketAddr) -> OutboundDecision | None:
    """A ServiceEntry host without endpoints to pick from, as Istio routes it: resolution
    NONE passes the connection through to the address the app connected to; DNS to its
    first DNS-named endpoint, or else to the host itself, at the port's target, resolved
    when the connection is made. None when the service is not such an entry."""
    entry = state.service_entry_of(service)
    if entry is None or entry.resolution is Resolution.STATIC:
        return None
    port = next((p for p in entry.ports if p.number == dst.port), None)
    if port is None:
        return None
    if entry.resolution is Resolution.NONE:
        return OutboundDecision(
            Route.PASSTHROUGH,
            dst,
            next_hop=dst,
            service=service,
            reason=f"ServiceEntry {entry.key} has resolution NONE: to the address itself",
        )
    named = [e for e in entry.endpoints if e.ip is None]
    if named:
        host, tport = named[0].address, named[0].target_port(port)
    else:
        host = service.hostname
        tport = port.target_port if port.target_port is not None else port.number
    return OutboundDecision(
        Route.PASSTHROUGH,
        dst,
        service=service,
        reason=f"ServiceEntry {entry.key} resolves {host} by DNS",
        resolve=(host, tport),
    )


def _to_workload(w: Workload, target: SocketAddr, service: Service | None) -> OutboundDecision:
    if w.protocol is TunnelProtocol.HBONE:
        sans = set()
        if service is not None:
            for san in service.subject_alt_names:
                try:
                    sans.add(SpiffeId.parse(san))
                except ValueError:
                    continue  # a SAN that is not a SPIFFE id can never match a peer
        return OutboundDecision(
            Route.HBONE,
            target,
            next_hop=shared_addr(target.ip, HBONE_PORT),
            expected_identities=frozenset({w.identity, *sans}),
            destination=w,
            service=service,
            reason="destination is in the mesh",
        )
    return OutboundDecision(
        Route.PASSTHROUGH,
        target,
        next_hop=target,
        destination=w,
        service=service,
        reason="destination workload does not speak HBONE",
    )


def baggage(source: Workload) -> str:
    """The `baggage` header of a source workload's CONNECTs (empty values left out)."""
    items = {
        "k8s.cluster.name": source.cluster_id,
        "k8s.namespace.name": source.namespace,
        f"k8s.{source.workload_type or 'pod'}.name": source.workload_name,
        "service.name": source.canonical_name,
        "service.version": source.canonical_revision,
    }
    return ",".join(f"{k}={v}" for k, v in items.items() if v)


# A workload's baggage, by the Workload object (held, so its id is not reused): it is the
# same for every connection of the pod until the mesh state replaces the object.
_BAGGAGE: dict[int, tuple[str, Workload]] = {}
_BAGGAGE_MAX = 4096


def _baggage_of(source: Workload) -> str:
    hit = _BAGGAGE.get(id(source))
    if hit is not None and hit[1] is source:
        return hit[0]
    text = baggage(source)
    if len(_BAGGAGE) >= _BAGGAGE_MAX:
        _BAGGAGE.clear()  # config changes leave stale entries behind: start over
    _BAGGAGE[id(source)] = (text, source)
    return text


def connect_headers(
    source: Workload, decision: OutboundDecision, client: SocketAddr
) -> list[tuple[str, str]]:
    """The CONNECT request of protocols.md: authority, baggage, forwarded, traceparent."""
    forwarded = f'for="{client}"'
    if decision.service is not None:
        forwarded += f";host={decision.service.hostname}"
    ids = os.urandom(24).hex()  # trace id (16 bytes) and span id (8): one system call
    return [
        (":method", "CONNECT"),
        (":authority", decision.authority),
        ("baggage", _baggage_of(source)),
        ("forwarded", forwarded),
        ("traceparent", f"00-{ids[:32]}-{ids[32:]}-00"),
    ]


class OutboundProxy(ListenerProxy):
    """The 15001 listener of one pod."""

    def __init__(
        self,
        workload: Callable[[], Workload],
        state: Callable[[], MeshState],
        factory: SocketFactory,
        pool: ConnectionPool,
        tasks: Callable[[asyncio.Future[None]], None],
        orig_dst: Callable[[socket.socket], SocketAddr] = original_dst,
        connection_table: ConnectionTable | None = None,
        local: Callable[[Workload], InboundProxy | None] | None = None,
        guard: Guard | None = None,
        resolver: Callable[[str], Awaitable[IPAddress]] | None = None,
    ) -> None:
        """`resolver`: a DNS name to an address through the pod's upstream resolvers (the
        DNS proxy's); without one, a destination known only by name is refused."""
        super().__init__(tasks, guard, "outbound")
        self._resolver = resolver
        self._workload = workload
        self._state = state
        self._factory = factory
        self._pool = pool
        self._orig_dst = orig_dst
        self.connection_table = (
            connection_table if connection_table is not None else ConnectionTable()
        )
        # The inbound proxy of a destination this same tunnel serves, if any.
        self._local = local

    async def _handle(self, app: AppSide) -> None:
        t = app.transport
        assert t is not None
        source = self._workload()
        client = SocketAddr.of(t.get_extra_info("peername"))
        sock = t.get_extra_info("socket")
        record = Tracked(
            Direction.OUTBOUND, src=client, src_workload=source, src_identity=source.identity
        )
        try:
            dst = self._orig_dst(sock)
        except OSError as e:
            t.abort()
            record.finish(error=f"no original destination: {e}")
            return
        decision = decide(self._state(), source, dst, client=client.ip)
        if decision.waypoint is not None and decision.waypoint.endpoint is None:
            self._waypoint_unavailable(source, client, decision)
        record.dst = decision.target
        record.dst_workload = decision.destination
        if decision.destination is not None and decision.route is Route.HBONE:
            record.dst_identity = decision.destination.identity
        record.service = decision.service
        try:
            if decision.route is Route.REFUSE:
                t.abort()
                if decision.waypoint is not None:
                    record.finish(error=f"refused [{WAYPOINT_UNAVAILABLE}]: {decision.reason}")
                    self.connection_table.refused(
                        outbound_labels(source, decision, WAYPOINT_UNAVAILABLE)
                    )
                    return
                record.finish(error=f"refused: {decision.reason}")
                return
            if decision.route is Route.PASSTHROUGH:
                await self._passthrough(app, source, client, decision, record)
                return
            assert decision.destination is not None  # decide() names an HBONE destination
            # Never in process through a waypoint: a waypoint pod is not captured, so it is
            # dialled over the network like any HBONE peer.
            local = (
                self._local(decision.destination)
                if self._local is not None and not decision.via_waypoint
                else None
            )
            if local is not None:
                await self._same_node(app, local, source, client, decision, record)
            elif (
                decision.via_waypoint
                and decision.waypoint is not None
                and (decision.waypoint.address.fail_open)
            ):
                await self._fail_open_hbone(app, source, client, dst, decision, record)
            else:
                await self._hbone(app, source, client, decision, record)
        except asyncio.CancelledError:
            # The pod is being released: still exactly one access-log line.
            record.finish(error=STOPPED)
            raise
        except (TimeoutError, OSError, ConnectionError, ValueError, PeerVerificationError) as e:
            t.abort()
            record.finish(error=_describe(e, decision))
            flags = (
                ResponseFlags.TLS_FAILURE
                if isinstance(e, ssl.SSLError | PeerVerificationError)
                else ResponseFlags.CONNECT
            )
            self.connection_table.refused(outbound_labels(source, decision, flags))

    async def _fail_open_hbone(
        self,
        app: AppSide,
        source: Workload,
        client: SocketAddr,
        dst: SocketAddr,
        decision: OutboundDecision,
        record: Tracked,
    ) -> None:
        """Through a fail-open waypoint: if it cannot be reached (its pod is down, its port
        closed, it does not answer the CONNECT), nothing of the app's has been sent yet, so
        the connection goes straight to the destination instead, as upstream does when its
        control plane drops an unready waypoint; and says so."""
        try:
            # No early data to the waypoint: one that took the bytes and then failed to
            # answer might still pass them on, and the direct path would send them again.
            await self._hbone(app, source, client, decision, record, early=False)
            return
        except (TimeoutError, OSError, ConnectionError, PeerVerificationError) as e:
            direct = decide(self._state(), source, dst, client=client.ip, bypass_waypoint=True)
            log.warning(
                "waypoint unreachable: failing open",
                waypoint=decision.waypoint.name if decision.waypoint is not None else None,
                error=str(e) or type(e).__name__,
                src=str(client),
                dst=str(dst),
            )
        if direct.route is not Route.HBONE or direct.destination is None:
            raise ConnectionError(f"waypoint unreachable and no direct path: {direct.reason}")
        record.dst = direct.target
        record.dst_workload = direct.destination
        record.dst_identity = direct.destination.identity
        local = self._local(direct.destination) if self._local is not None else None
        if local is not None:
            await self._same_node(app, local, source, client, direct, record)
        else:
            await self._hbone(app, source, client, direct, record)

    def _waypoint_unavailable(
        self, source: Workload, client: SocketAddr, decision: OutboundDecision
    ) -> None:
        hop = decision.waypoint
        assert hop is not None
        log.warning(
            "waypoint unavailable: failing open"
            if hop.failed_open
            else "waypoint unavailable: connection refused",
            waypoint=hop.name,
            bound=hop.bound,
            problem=hop.problem,
            src=str(client),
            src_workload=f"{source.namespace}/{source.name}",
            dst=str(decision.target),
        )

    async def _passthrough(
        self,
        app: AppSide,
        source: Workload,
        client: SocketAddr,
        decision: OutboundDecision,
        record: Tracked,
    ) -> None:
        if decision.resolve is not None:
            decision = await self._resolved(decision)
            record.dst = decision.target
        assert decision.next_hop is not None
        _, upstream = await connect_tcp(self._factory, decision.next_hop)
        pipe = TcpPipe(app, upstream)
        self._book(pipe.start, record, pipe, source, decision)

    async def _resolved(self, decision: OutboundDecision) -> OutboundDecision:
        """A by-name passthrough with its address: the first the resolvers give. Raises
        OSError (the connection is then reset and logged) when there is none."""
        assert decision.resolve is not None
        host, port = decision.resolve
        if self._resolver is None:
            raise OSError(
                f"{host} is resolved by DNS, and this tunnel runs no DNS proxy "
                "(ISTIO_META_DNS_CAPTURE)"
            )
        ip = await self._resolver(host)
        target = SocketAddr(ip, port)
        return replace(decision, target=target, next_hop=target)

    def _book(
        self,
        start: Callable[[], None],
        record: Tracked,
        relay: TcpPipe | HboneSplice,
        source: Workload,
        decision: OutboundDecision,
    ) -> None:
        """Start a joined connection and book it (table, metrics, access log) until it
        ends. Outbound, the request direction is the app's: `sent`."""
        labels = outbound_labels(source, decision, ResponseFlags.NONE)
        start()
        self.connection_table.follow(record, self, relay, labels)

    async def _same_node(
        self,
        app: AppSide,
        local: InboundProxy,
        source: Workload,
        client: SocketAddr,
        decision: OutboundDecision,
        record: Tracked,
    ) -> None:
        """The destination pod is served by this tunnel too: hand the connection to its
        inbound proxy in process. Policy, metrics (both reporters), access logs and the
        connection table are as for HBONE; only the TLS and HTTP/2 of a hop that would
        start and end in this process are skipped. (Upstream ztunnel has had the same
        in-memory path for same-node traffic.)"""
        assert decision.target is not None
        record.hbone = LOCAL_HOP
        t = app.transport
        assert t is not None
        verdict, delivery = await local.connect_local(source.identity, client, decision.target)
        if delivery is None:
            t.abort()
            record.finish(error=f"destination answered {verdict.status}: {verdict.reason}")
            flags = ResponseFlags.DENY if verdict.status == 401 else ResponseFlags.CONNECT
            self.connection_table.refused(outbound_labels(source, decision, flags))
            return
        pipe = TcpPipe(app, delivery.app)
        delivery.attach(pipe)  # at once: nothing may come between connecting and booking
        self._book(pipe.start, record, pipe, source, decision)

    async def _hbone(
        self,
        app: AppSide,
        source: Workload,
        client: SocketAddr,
        decision: OutboundDecision,
        record: Tracked,
        early: bool = True,
    ) -> None:
        """`early`: the app's first bytes may go with the CONNECT (when the proxy sends
        early data at all)."""
        assert decision.next_hop is not None
        record.hbone = decision.next_hop
        t = app.transport
        assert t is not None
        # The client's own address, as upstream keys its pool: not our socket's local
        # address, which is 127.0.0.1 under REDIRECT but the original destination under
        # eBPF steering (it would split the pool per destination).
        key = PoolKey(
            source.identity, decision.expected_identities, decision.next_hop.pair, str(client.ip)
        )
        headers = connect_headers(source, decision, client)
        for attempt in range(CONNECT_ATTEMPTS):
            h2 = await self._pool.checkout(key)
            # The app's first bytes go with the CONNECT (the peer holds them until its
            # answer): one TLS record and one round trip fewer per connection.
            limit = self.guard.limits.early_data_bytes if early else 0
            ahead = app.take_ahead(limit) if limit > 0 else b""
            splice = HboneSplice(h2, client=True)
            splice.sent = len(ahead)
            splice.sid = self._pool.open_stream(h2, headers, splice, ahead)
            try:
                assert splice.response is not None
                status, _ = await within(splice.response, CONNECT_TIMEOUT)
                splice.response = None  # answered: not kept for the connection's life
                break
            except ConnectionError:
                # A draining server (a tunnel being upgraded) refuses streams it never
                # processed (RFC 9113 8.7: early data included), so a new connection (to
                # the new tunnel) may carry the request instead.
                app.give_back(ahead)
                if splice.reset_code != ErrorCode.REFUSED_STREAM or attempt + 1 == CONNECT_ATTEMPTS:
                    raise
                log.debug("HBONE stream refused; retrying on a new connection", dst=str(key.dst))
            except TimeoutError:
                splice.abort("no answer to the HBONE CONNECT")
                raise TimeoutError(
                    f"no answer to the HBONE CONNECT (stream {splice.sid}) from "
                    f"{decision.next_hop} within {CONNECT_TIMEOUT:g} s"
                ) from None
            except BaseException:
                # Cancelled: free the stream slot and its receive credit.
                splice.abort("no answer to the HBONE CONNECT")
                raise
        if status != 200:
            splice.abort(f"HBONE CONNECT answered {status}")
            t.abort()
            record.finish(error=f"HBONE CONNECT answered {status}")
            flags = ResponseFlags.DENY if status == 401 else ResponseFlags.CONNECT
            self.connection_table.refused(outbound_labels(source, decision, flags))
            return
        self._book(lambda: splice.start(app), record, splice, source, decision)


def outbound_labels(source: Workload, decision: OutboundDecision, flags: str) -> TcpLabels:
    hbone = decision.route is Route.HBONE
    dest = decision.destination
    return tcp_labels(
        reporter="source",
        source=source,
        source_identity=source.identity,
        destination=dest,
        destination_identity=dest.identity if hbone and dest is not None else None,
        service=decision.service,
        response_flags=flags,
        mtls=hbone,
    )


def _describe(e: BaseException, decision: OutboundDecision) -> str:
    if isinstance(e, asyncio.TimeoutError):
        if e.args:
            return str(e)  # it names the step that timed out (dial, handshake, CONNECT)
        if decision.route is Route.HBONE:
            return (
                f"timed out connecting to {decision.next_hop}: is port 15008 blocked by a "
                "network policy, or is the destination's tunnel down?"
            )
        return f"timed out connecting to {decision.next_hop}"
    return f"{type(e).__name__}: {e}"
