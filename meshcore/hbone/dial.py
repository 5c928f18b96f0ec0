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

    try:
        sock = await connect_staggered(new_socket, key.dst, connect_timeout)
    except StaggeredTimeout as e:
        # The ports find the flows in a capture; a lost SYN and a peer that never
        # finishes its handshake have different causes.
        ports = ", ".join(str(p) for p in e.ports)
        raise TimeoutError(
            f"TCP connect to {server} timed out after {connect_timeout:g} s "
            f"(SYNs from ports {ports} unanswered): is port 15008 blocked by a network "
            "policy, or is the destination's tunnel down?"
        ) from None
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
