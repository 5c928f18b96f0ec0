"""Accepting HBONE clients: TCP first, then a TLS handshake we run and bound ourselves.

A TLS handshake is the cheapest state a stranger can make us hold: it needs no
certificate, only a TCP connection to a pod's 15008. So the listener accepts plain TCP,
counts each connection whose handshake is in progress (per tunnel and per source
address), refuses a new one at once past the limits, times the handshake out, and only
then hands the TLS transport to the HTTP/2 protocol. A failed or refused handshake is
counted and logged (at a bounded rate), and leaves nothing behind: every accepted
connection is known until it is closed, whatever happens to its handshake.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import socket
import ssl
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, cast

import structlog

from meshcore.hbone.limits import DEFAULT_LIMITS, HboneLimits
from meshcore.identity.spiffe import SpiffeId
from meshcore.localtrust import RateLog
from meshcore.sockets import SocketAddr
from meshcore.tls import PeerVerificationError, hbone_peer, verify_client

log = structlog.get_logger(__name__)

# Connections taken off a listener's queue per turn of the loop (the rest wait for the next
# turn, so one busy listener cannot starve the others), and the pause after an accept
# failed for want of descriptors or memory.
ACCEPT_BATCH = 128
ACCEPT_RETRY_SECONDS = 0.1


class RefusalLog:
    """At most `per_second` refusal lines a second, each with how many were left out
    before it, so a flood cannot fill the log or burn CPU on it."""

    def __init__(self, per_second: int = 10) -> None:
        self._rate = RateLog(interval=1.0, burst=per_second)

    def warning(self, event: str, **fields: Any) -> None:
        suppressed = self._rate.due(time.monotonic())
        if suppressed is None:
            return
        if suppressed:
            fields["suppressed_before"] = suppressed
        log.warning(event, **fields)


def _own_group(source: str) -> str | None:
    return source


class _Slot:
    """One handshake in progress: whose, whether a stranger's, and how to end it early."""

    __slots__ = ("cancel", "group", "source")

    def __init__(self, source: str, group: str | None) -> None:
        self.source = source
        self.group = group  # None: a stranger's
        self.cancel: Callable[[], object] | None = None


class HandshakeGate:
    """The handshakes in progress of one process's HBONE listeners, and the limits on them.
    `report(reason, source, detail)` is told of every connection refused before its
    handshake or whose handshake failed. `group_of(source)`: the group a source address
    belongs to (the tunnel and the waypoint plug in the node of the workload at that
    address), or None for an address the mesh does not know (no workload's): strangers
    share `max_pending_handshakes_from_strangers`. Until the owner plugs in its state,
    everyone is known and each source is a group of its own.

    Each slot is held under a key of the caller's (the accepted socket). When every slot is
    taken, a known source is still let in if some group holds at least two more than its
    own, or, within its own group, some source at least two more than it: the oldest
    handshake of the heaviest source of that group is ended for it (`evictable` says how).
    So however many sources hold the bound, a group with fewer in progress than the
    heaviest always gets a turn, and within a group a source with fewer than its heaviest
    (max-min fairness at both levels): compromised pods on one node cannot keep another
    node's pods out however many addresses they have; that takes as many nodes as there
    are slots."""

    def __init__(
        self,
        limits: HboneLimits = DEFAULT_LIMITS,
        report: Callable[[str, str, str], None] | None = None,
    ) -> None:
        self.limits = limits
        self.group_of: Callable[[str], str | None] = _own_group
        # Every slot by its key, and each source's keys oldest first (its count, and the
        # order of eviction); each known group's sources with their slots in it; the slots
        # held by strangers, counted for their share.
        self._slots: dict[object, _Slot] = {}
        self._order: dict[str, dict[object, None]] = {}
        self._groups: dict[str, Counter[str]] = {}
        self.strangers = 0
        self.evicted = 0  # handshakes ended early to let a lighter source in
        self._report = report
        self.log = RefusalLog()
        # Running totals of the connections the listeners accepted, and of those whose
        # handshake is over (handed on, failed, or refused before TLS): activity, for
        # whoever watches for quiet. An attack may make nothing else.
        self.accepted = 0
        self.finished = 0

    def known(self, source: str) -> bool:
        return self.group_of(source) is not None

    @property
    def pending(self) -> int:
        return len(self._slots)

    @property
    def by_source(self) -> dict[str, int]:
        """Handshakes in progress per source."""
        return {source: len(keys) for source, keys in self._order.items()}

    @property
    def by_group(self) -> dict[str, int]:
        """Handshakes in progress per known group."""
        return {group: sources.total() for group, sources in self._groups.items()}

    @property
    def stranger_slots(self) -> dict[str, int]:
        """Handshakes in progress per stranger source."""
        return dict(Counter(slot.source for slot in self._slots.values() if slot.group is None))

    def admit(self, source: str, key: object) -> str | None:
        """Take a slot for a new handshake from `source`, held under `key`; or why not."""
        n = len(self._order.get(source, ()))
        if n >= self.limits.max_pending_handshakes_per_source:
            return "max_pending_handshakes_per_source"
        group = self.group_of(source)
        if group is None and self.strangers >= self.limits.max_pending_handshakes_from_strangers:
            return "max_pending_handshakes_from_strangers"
        if self.pending >= self.limits.max_pending_handshakes and (
            group is None or not self._evict_for(group, n)
        ):
            return "max_pending_handshakes"
        slot = _Slot(source, group)
        self._slots[key] = slot
        self._order.setdefault(source, {})[key] = None
        if group is None:
            self.strangers += 1
        else:
            self._groups.setdefault(group, Counter())[source] += 1
        return None

    def evictable(self, key: object, cancel: Callable[[], object]) -> None:
        """How to end the handshake held under `key` early (its task's `cancel`)."""
        slot = self._slots.get(key)
        if slot is not None:
            slot.cancel = cancel

    def release(self, key: object) -> None:
        """The handshake held under `key` is over (a slot ended early was given back then)."""
        slot = self._slots.pop(key, None)
        self.finished += 1
        if slot is not None:
            self._give_back(key, slot)

    def _give_back(self, key: object, slot: _Slot) -> None:
        # The slot's own group and side, as admitted: the state may have changed since.
        order = self._order[slot.source]
        del order[key]
        if not order:
            del self._order[slot.source]
        if slot.group is None:
            self.strangers -= 1
            return
        sources = self._groups[slot.group]
        sources[slot.source] -= 1
        if not sources[slot.source]:
            del sources[slot.source]
            if not sources:
                del self._groups[slot.group]

    def _evict_for(self, group: str, holding: int) -> bool:
        """Make room for a source of `group` holding `holding`: end the oldest endable
        handshake of the heaviest source of the heaviest group if that group holds at least
        two more than `group`, else of the heaviest source of `group` if it holds at least
        two more than `holding`; whether a slot was freed."""
        held = {g: sources.total() for g, sources in self._groups.items()}
        own = held.get(group, 0)
        heaviest = max(held, key=held.__getitem__, default=None)
        if heaviest is not None and held[heaviest] >= own + 2:
            victim_group = heaviest
        elif own and self._groups[group].most_common(1)[0][1] >= holding + 2:
            victim_group = group
        else:
            return False
        victim = self._groups[victim_group].most_common(1)[0][0]
        for key in self._order[victim]:
            slot = self._slots[key]
            if slot.group == victim_group and slot.cancel is not None:
                break
        else:
            return False  # none of its handshakes can be ended yet
        del self._slots[key]
        self._give_back(key, slot)
        self.evicted += 1
        assert slot.cancel is not None
        slot.cancel()
        self.refused(victim, "evicted_for_a_lighter_source")
        return True

    def refused(self, source: str, reason: str, detail: str = "") -> None:
        if self._report is not None:
            self._report(reason, source, detail)
        else:
            self.log.warning("hbone handshake refused", src=source, reason=reason, detail=detail)


class Guard:
    """What every HBONE connection of one proxy process is held to, and where a refusal
    goes: the limits, the handshake gate its listeners share, and one reporter that counts
    each refusal (`count(direction, reason)`) and logs it at a bounded rate. `direction`
    is inbound for a client of our listener, outbound for a server we dialled."""

    def __init__(
        self,
        limits: HboneLimits = DEFAULT_LIMITS,
        count: Callable[[str, str], None] | None = None,
    ) -> None:
        self.limits = limits
        self._count = count
        self._log = RefusalLog()
        # Connections the whole tunnel holds open (its node plugs in the connection table),
        # for `max_connections_per_tunnel`.
        self.tunnel_connections: Callable[[], int] = lambda: 0
        self.gate = HandshakeGate(limits, self._handshake_refused)

    def refused(self, direction: str, reason: str, peer: str, detail: str = "") -> None:
        if self._count is not None:
            self._count(direction, reason)
        self._log.warning(
            "hbone peer refused", direction=direction, reason=reason, peer=peer, detail=detail
        )

    def _handshake_refused(self, reason: str, source: str, detail: str) -> None:
        self.refused("inbound", reason, source, detail)


def handshake_failure(exc: BaseException) -> str:
    """A short, stable name for why a handshake failed (a metric label)."""
    if isinstance(exc, TimeoutError):
        return "tls_handshake_timeout"
    if isinstance(exc, ssl.SSLError):
        reason = getattr(exc, "reason", None)
        return f"tls_{reason.lower()}" if isinstance(reason, str) else "tls_handshake_failed"
    return "tls_connection_lost"


def verified_client(
    transport: asyncio.BaseTransport, trust_domain: str, guard: Guard
) -> tuple[SocketAddr, SpiffeId] | None:
    """A server-side HBONE connection's client address and proven identity (ALPN h2, one
    SPIFFE URI SAN, our trust domain); None, with the connection aborted and the refusal
    counted and logged, when it does not prove one."""
    client: SocketAddr | None = None
    try:
        client = SocketAddr.of(transport.get_extra_info("peername"))
        peer = hbone_peer(
            transport.get_extra_info("ssl_object"), transport.get_extra_info("peercert")
        )
        verify_client(peer, trust_domain)
    except (PeerVerificationError, ValueError, TypeError) as e:
        guard.refused("inbound", "peer_identity", str(client), str(e))
        cast(asyncio.Transport, transport).abort()
        return None
    return client, peer


class TlsListener:
    """Serves one listening socket: accept, a bounded TLS handshake, then `factory()`'s
    protocol on the TLS transport. `close()` stops accepting and ends the handshakes still
    in progress (a pod that stops serving); established connections are the protocol's.

    The accept loop is ours rather than the event loop's server, so a connection over the
    limits is closed before any TLS state exists, and a failed handshake is seen (the
    loop's TLS server tells no one when a handshake fails).
    """

    def __init__(
        self,
        ctx: ssl.SSLContext,
        factory: Callable[[], asyncio.BaseProtocol],
        gate: HandshakeGate,
    ) -> None:
        self.ctx = ctx
        self.factory = factory
        self.gate = gate
        self.sock: socket.socket | None = None
        self.handshaking: dict[asyncio.Task[None], None] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._accepting = False
        self._address = ""

    async def start(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._address = "{}:{}".format(*sock.getsockname()[:2])
        self._loop = asyncio.get_running_loop()
        self._accepting = True
        self._loop.add_reader(sock.fileno(), self._on_readable)

    def sockname(self) -> tuple[str, int]:
        assert self.sock is not None
        name: tuple[str, int] = self.sock.getsockname()[:2]
        return name

    @property
    def address(self) -> str:
        """`ip:port` while accepting, else `closed` (for views)."""
        return self._address if self._accepting else "closed"

    def _on_readable(self) -> None:
        """Take what the kernel queued (a bounded batch per turn, for fairness) and hand
        each connection on in this same call. An accept awaited in a task
        (`loop.sock_accept`) could complete and then be cancelled by a stop before the task
        ran again: that connection was dropped, and its client saw it end as it opened."""
        sock = self.sock
        assert sock is not None
        for _ in range(ACCEPT_BATCH):
            try:
                conn, peer = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue  # that client gave up while queued
                self._pause(e)
                return
            conn.setblocking(False)
            self._admit(conn, str(peer[0]))

    def _pause(self, e: OSError) -> None:
        """Out of descriptors (or memory): stop reading the listener a moment instead of
        spinning on a socket that stays ready; anything else stops the listener."""
        assert self._loop is not None and self.sock is not None
        self._loop.remove_reader(self.sock.fileno())
        if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
            self.gate.log.warning("hbone accept failed", error=str(e))
            self._loop.call_later(ACCEPT_RETRY_SECONDS, self._resume)
        else:
            log.error("hbone accept failed; the listener stops", error=str(e))
            self._accepting = False

    def _resume(self) -> None:
        if self._accepting and self._loop is not None and self.sock is not None:
            self._loop.add_reader(self.sock.fileno(), self._on_readable)

    def _admit(self, conn: socket.socket, source: str) -> None:
        assert self._loop is not None
        self.gate.accepted += 1
        why = self.gate.admit(source, conn)
        if why is not None:
            conn.close()  # before any TLS state exists: nothing to time out
            self.gate.finished += 1
            self.gate.refused(source, why)
            return
        task = self._loop.create_task(self._handshake(conn, source))
        self.handshaking[task] = None
        self.gate.evictable(conn, task.cancel)
        task.add_done_callback(functools.partial(self._unstarted, conn))

    def _unstarted(self, conn: socket.socket, task: asyncio.Task[None]) -> None:
        """A handshake task cancelled before its first step (a close in the turn it was
        accepted in) never ran its `finally`: its connection and gate slot end here, or the
        node-wide gate would count that slot held for good."""
        if task in self.handshaking:
            del self.handshaking[task]
            conn.close()
            self.gate.release(conn)

    async def _handshake(self, conn: socket.socket, source: str) -> None:
        loop = asyncio.get_running_loop()
        timeout = self.gate.limits.handshake_timeout
        try:
            try:
                # Our own deadline, so a timeout is told apart from a failure; the loop's
                # (a little later) only backs it up. `wait_for`, not a timeout scope: with
                # the scope (the connect cancelled in this task), uvloop left the socket of
                # a timed-out handshake open in 8 of 25 runs of test_tls_listener.py's
                # test_unfinished_handshakes_are_bounded_per_source_and_timed_out.
                await asyncio.wait_for(
                    loop.connect_accepted_socket(
                        self._handover,
                        conn,
                        ssl=self.ctx,
                        ssl_handshake_timeout=timeout + 1,
                        ssl_shutdown_timeout=self.gate.limits.shutdown_timeout,
                    ),
                    timeout,
                )
            except (OSError, ssl.SSLError, TimeoutError) as e:
                conn.close()
                self.gate.refused(source, handshake_failure(e), str(e))
            except BaseException:
                conn.close()
                raise
        finally:
            self.gate.release(conn)
            task = asyncio.current_task()
            if task is not None:
                self.handshaking.pop(task, None)

    def _handover(self) -> _Handover:
        return _Handover(self.factory)

    def stop_accepting(self) -> None:
        """No new connections (queued ones move to another listener of the SO_REUSEPORT
        group); handshakes in progress may finish."""
        if self._accepting and self._loop is not None and self.sock is not None:
            self._loop.remove_reader(self.sock.fileno())
        self._accepting = False
        if self.sock is not None:
            self.sock.close()

    def close(self) -> None:
        """Stop accepting and end the handshakes still in progress."""
        self.stop_accepting()
        for task in list(self.handshaking):
            task.cancel()


class _Handover(asyncio.Protocol):
    """Stands in for the real protocol while the handshake runs, and swaps it in the moment
    the handshake is done (before any application byte can arrive): a stranger's failed
    handshake costs this object only, not an HTTP/2 connection's state."""

    __slots__ = ("factory",)

    def __init__(self, factory: Callable[[], asyncio.BaseProtocol]) -> None:
        self.factory = factory

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        protocol = self.factory()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
