"""Dialling an HBONE peer: one mutual-TLS HTTP/2 connection for a client pool (the tunnel's
outbound side and the waypoint's upstream leg dial the same way)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections.abc import Callable

from meshcore.hbone.pool import PoolKey
from meshcore.hbone.server import Guard
from meshcore.hbone.transport import H2Transport
from meshcore.identity.spiffe import SpiffeId
from meshcore.sockets import SocketFactory, tune_stream
from meshcore.staggered import StaggeredTimeout, connect_staggered, source_port

# TCP connect plus TLS handshake, each (protocols.md: 10 s). The TCP connect does not
# wait on the kernel's SYN backoff (meshcore.staggered).
CONNECT_TIMEOUT = 10.0
# How long a refused HBONE port is tried again before the dial fails: a waypoint's process
# restarted in its pod (same address) refuses for about a second, and a connection made
# then would otherwise fail although the waypoint is back a moment later.
REFUSED_GRACE = 3.0
# A peer that refused through a whole grace is not given another for this long after its
# last refusal: a waypoint that stays down (a fail-open one is bypassed on the refusal)
# costs the first connection the grace, not every connection.
REFUSED_MEMORY = 30.0
REFUSED_MEMORY_SIZE = 1024  # peers remembered at most (the oldest forgotten first)


class RefusalMemory:
    """Which peers kept refusing lately, so their dials get no grace (pure: the caller
    gives the time)."""

    def __init__(self, size: int = REFUSED_MEMORY_SIZE) -> None:
        self._last: dict[tuple[str, int], float] = {}  # insertion order: oldest first
        self._size = size

    def grace(self, peer: tuple[str, int], now: float) -> float:
        last = self._last.get(peer)
        return 0.0 if last is not None and now - last < REFUSED_MEMORY else REFUSED_GRACE

    def refused(self, peer: tuple[str, int], now: float) -> None:
        self._last.pop(peer, None)
        self._last[peer] = now
        while len(self._last) > self._size:
            del self._last[next(iter(self._last))]

    def answered(self, peer: tuple[str, int]) -> None:
        self._last.pop(peer, None)


_refusals = RefusalMemory()  # process-wide: one per dialling process


async def hbone_connect(
    key: PoolKey,
    factory: SocketFactory,
    ssl_context: Callable[[SpiffeId], ssl.SSLContext],
    verify: Callable[[H2Transport, frozenset[SpiffeId]], None],
    on_closed: Callable[[H2Transport], None],
    guard: Guard | None = None,
    connect_timeout: float = CONNECT_TIMEOUT,
) -> H2Transport:
    """Open one mTLS HTTP/2 connection for the pool: TCP from the source pod, TLS with the
    source's certificate, then check the server proves one of the expected identities.
    The connection holds the server to the same limits a client of ours is held to."""
    guard = guard if guard is not None else Guard()
    server = f"{key.dst[0]}:{key.dst[1]}"

    def refused(_h2: H2Transport, reason: str) -> None:
        guard.refused("outbound", reason, server)

    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ipaddress.ip_address(key.dst[0]).version == 6 else socket.AF_INET

    def new_socket() -> socket.socket:
        sock = factory.new(family)
        try:
            tune_stream(sock)
        except BaseException:
            sock.close()
            raise
        return sock

    grace = min(_refusals.grace(key.dst, loop.time()), connect_timeout)
    try:
        sock = await connect_staggered(new_socket, key.dst, connect_timeout, refused_grace=grace)
    except ConnectionRefusedError as e:
        _refusals.refused(key.dst, loop.time())
        tried = f"tried for {grace:g} s" if grace else "refused again lately: not retried"
        raise ConnectionRefusedError(
            e.errno,
            f"{server} refused the connection ({tried}): is the destination's tunnel or "
            "waypoint running?",
        ) from None
    except StaggeredTimeout as e:
        # The ports find the flows in a capture; a lost SYN and a peer that never
        # finishes its handshake have different causes.
        ports = ", ".join(str(p) for p in e.ports)
        raise TimeoutError(
            f"TCP connect to {server} timed out after {connect_timeout:g} s "
            f"(SYNs from ports {ports} unanswered): is port 15008 blocked by a network "
            "policy, or is the destination's tunnel down?"
        ) from None
    _refusals.answered(key.dst)
    local = source_port(sock)
    try:
        ctx = ssl_context(key.src_identity)
        _, h2 = await asyncio.wait_for(
            loop.create_connection(
                lambda: H2Transport(
                    client=True, on_closed=on_closed, limits=guard.limits, on_refused=refused
                ),
                sock=sock,
                ssl=ctx,
                server_hostname="",
                ssl_shutdown_timeout=guard.limits.shutdown_timeout,
            ),
            connect_timeout,
        )
    except TimeoutError:
        sock.close()
        raise TimeoutError(
            f"TLS handshake with {server} from port {local} timed out after "
            f"{connect_timeout:g} s: is the destination's tunnel overloaded?"
        ) from None
    except BaseException:
        sock.close()
        raise
    assert isinstance(h2, H2Transport)
    try:
        verify(h2, key.dst_identities)
    except Exception:
        h2.close(reason="server identity rejected")
        raise
    return h2
