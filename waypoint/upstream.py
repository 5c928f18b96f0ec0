"""The waypoint's upstream leg: HBONE to the chosen endpoint's `podIP:15008` with the
waypoint's own certificate, `:authority` = `podIP:targetPort` (waypoint.md), pooled.

Each CONNECT stream carries one upstream TCP connection's bytes; HTTP/1.1 keep-alive
connections inside those streams are reused by `waypoint.proxy`.

Certificate rotation, as on the tunnel's outbound side: each pooled connection carries the
earlier of the waypoint's and the endpoint's notAfter (`H2Transport.expires_at`), so the
pool gives it no new stream shortly before either runs out; its open streams run on.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from typing import NamedTuple

from meshcore import tls
from meshcore.defaults import HBONE_PORT
from meshcore.hbone.dial import CONNECT_TIMEOUT, hbone_connect
from meshcore.hbone.pool import ConnectionPool, PoolKey
from meshcore.hbone.server import Guard
from meshcore.hbone.stream import HboneStream
from meshcore.hbone.transport import H2Transport
from meshcore.identity.spiffe import SpiffeId
from meshcore.state import Workload


class SourceBoundFactory:
    """Sockets bound to the waypoint's pod IP: the destination tunnel sees the waypoint's
    address as the client (which is how it knows the waypoint's traffic is not to be sent
    back to the waypoint)."""

    def __init__(self, ip: str) -> None:
        self.ip = ip

    @property
    def transparent(self) -> bool:
        return False

    def new(self, family: int = socket.AF_INET) -> socket.socket:
        s = socket.socket(family, socket.SOCK_STREAM)
        try:
            s.setblocking(False)
            s.bind((self.ip, 0))
        except BaseException:
            s.close()
            raise
        return s


class ClientTls(NamedTuple):
    """The waypoint's current client context and its certificate's notAfter (Unix time),
    read together so a handshake's expiry is that of the certificate it presents."""

    context: ssl.SSLContext
    not_after: float


class Upstream:
    def __init__(
        self,
        identity: SpiffeId,
        client_tls: Callable[[], ClientTls | None],
        source_ip: str,
        guard: Guard,
    ) -> None:
        self.identity = identity
        self._client_tls = client_tls
        self._factory = SourceBoundFactory(source_ip)
        self._source_ip = source_ip
        self._guard = guard
        self.pool = ConnectionPool(self._connect)

    async def _connect(self, key: PoolKey) -> H2Transport:
        own_expiry = [0.0]

        def context(_identity: SpiffeId) -> ssl.SSLContext:
            current = self._client_tls()
            if current is None:
                # Never dial without a certificate: ssl=None would mean plaintext.
                raise ConnectionError("the waypoint has no certificate yet")
            own_expiry[0] = current.not_after  # of the certificate this handshake uses
            return current.context

        def verify(h2: H2Transport, expected: frozenset[SpiffeId]) -> None:
            assert h2.transport is not None
            ssl_object = h2.transport.get_extra_info("ssl_object")
            tls.verify_server(tls.hbone_peer(ssl_object), expected)
            # The pool stops using it shortly before either side's certificate expires.
            peer_expiry = tls.peer_not_after(ssl_object)
            h2.expires_at = min(own_expiry[0], peer_expiry or own_expiry[0])

        return await hbone_connect(
            key, self._factory, context, verify, self.pool.forget, self._guard
        )

    async def open(
        self, endpoint: Workload, ip: str, target_port: int, headers: list[tuple[str, str]]
    ) -> HboneStream:
        """One CONNECT stream to `ip:target_port` through the endpoint's tunnel. Raises
        OSError / ConnectionError (connect failure, refused stream) for the caller's retry."""
        key = PoolKey(
            self.identity, frozenset({endpoint.identity}), (ip, HBONE_PORT), self._source_ip
        )
        h2 = await self.pool.checkout(key)
        request = [(":method", "CONNECT"), (":authority", f"{ip}:{target_port}"), *headers]
        try:
            return await HboneStream.open(h2, request, CONNECT_TIMEOUT, reserved=True)
        except BaseException:
            raise

    def close(self) -> None:
        for _key, h2 in self.pool.connections():
            h2.close("waypoint stopping")
        self.pool.close()
