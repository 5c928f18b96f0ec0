"""What the three capture listeners of a pod share: the listener skeleton, the authorizer
seam, the TCP connect from inside the pod, and the destination's metric labels."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

from meshcore.identity.spiffe import SpiffeId
from meshcore.observability.connections import STOPPED, Relay
from meshcore.observability.metrics import TcpLabels, tcp_labels
from meshcore.policy.verdict import ALLOW_ALL, Verdict
from meshcore.relay import AppSide
from meshcore.sockets import SocketAddr, SocketFactory, make_transparent, tune_stream
from meshcore.state import Workload

CONNECT_TIMEOUT = 10.0

# The authorization seam: (destination workload, peer identity or None for plaintext,
# client address, target) -> the verdict. The node plugs in the policy index's `authorize`.
Authorizer = Callable[[Workload, SpiffeId | None, SocketAddr, SocketAddr], Verdict]


def allow_all(_w: Workload, _p: SpiffeId | None, _c: SocketAddr, _t: SocketAddr) -> Verdict:
    return ALLOW_ALL


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
        await asyncio.wait_for(loop.sock_connect(sock, target.pair), CONNECT_TIMEOUT)
        return await loop.create_connection(AppSide, sock=sock)
    except BaseException:
        sock.close()
        raise


class ListenerProxy:
    """The skeleton of a proxy behind a listener of a pod (15001, 15006): one task per
    accepted connection, its relay booked in `relays` until it ends, and `close` to end
    them all when the pod leaves (each is then logged as stopped)."""

    def __init__(self, tasks: Callable[[asyncio.Future[None]], None]) -> None:
        self._track = tasks
        self.relays: dict[Relay, None] = {}  # an ordered set
        self.stopping = False
        self._on_accept = self._accepted  # one bound method for every accepted connection

    def protocol(self) -> AppSide:
        return AppSide(on_made=self._on_accept)

    def _accepted(self, app: AppSide) -> None:
        self._track(asyncio.get_running_loop().create_task(self._handle(app)))

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
