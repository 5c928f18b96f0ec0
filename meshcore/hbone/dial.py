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

# TCP connect plus TLS handshake, each (protocols.md: 10 s).
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
    ip = ipaddress.ip_address(key.dst[0])
    sock = factory.new(socket.AF_INET6 if ip.version == 6 else socket.AF_INET)
    phase = "TCP connect"
    local: int | str = "?"
    try:
        tune_stream(sock)
        await asyncio.wait_for(loop.sock_connect(sock, key.dst), connect_timeout)
        phase, local = "TLS handshake", _local_port(sock)
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
        if phase == "TCP connect":
            local = _local_port(sock)  # bound by the connect; the socket is still open
        sock.close()
        # Which step and which port: a lost SYN and a peer that never finishes its
        # handshake have different causes, and the port finds the flow in a capture.
        raise TimeoutError(
            f"{phase} to {server} from port {local} timed out after {connect_timeout:g} s: "
            "is port 15008 blocked by a network policy, or is the destination's tunnel down?"
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


def _local_port(sock: socket.socket) -> int | str:
    try:
        return int(sock.getsockname()[1])
    except OSError:
        return "?"
