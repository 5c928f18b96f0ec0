"""Inbound plaintext (15006): connections from clients outside the mesh into one pod.

The capture rules REDIRECT every other inbound TCP connection here; the original
destination names the app's port. The tunnel connects to the app as the client (so the app
sees the real source address) and relays plain bytes. These connections carry no identity.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

from meshcore.defaults import TUNNEL_PORTS
from meshcore.hbone.server import Guard
from meshcore.observability.accesslog import Direction
from meshcore.observability.connections import STOPPED, ConnectionTable, Tracked
from meshcore.observability.metrics import ResponseFlags, TcpLabels
from meshcore.policy.verdict import Verdict
from meshcore.relay import AppSide, TcpPipe
from meshcore.sockets import SocketAddr, SocketFactory, original_dst
from meshcore.state import MeshState, Workload
from ztunnel.proxy.common import (
    Authorizer,
    ListenerProxy,
    allow_all,
    connect_tcp,
    inbound_labels,
)
from ztunnel.proxy.waypoint import gated


class InboundPassthroughProxy(ListenerProxy):
    """The 15006 listener of one pod."""

    def __init__(
        self,
        workload: Callable[[], Workload],
        factory: SocketFactory,
        tasks: Callable[[asyncio.Future[None]], None],
        authorize: Authorizer = allow_all,
        orig_dst: Callable[[socket.socket], SocketAddr] = original_dst,
        connection_table: ConnectionTable | None = None,
        state: Callable[[], MeshState] = MeshState.empty,
        guard: Guard | None = None,
    ) -> None:
        super().__init__(tasks, guard, "inbound")
        self._workload = workload
        self._factory = factory
        # A pod bound to a waypoint accepts only the waypoint (ztunnel.proxy.waypoint).
        self.authorize = gated(authorize, state)
        self._orig_dst = orig_dst
        self.connection_table = (
            connection_table if connection_table is not None else ConnectionTable()
        )
        self._state = state
        self.recheck = self._recheck  # one bound method, shared by every table entry

    async def _handle(self, app: AppSide) -> None:
        t = app.transport
        assert t is not None
        workload = self._workload()
        client = SocketAddr.of(t.get_extra_info("peername"))
        record = Tracked(Direction.INBOUND_PLAINTEXT, src=client, dst_workload=workload)
        try:
            target = self._orig_dst(t.get_extra_info("socket"))
        except OSError as e:
            t.abort()
            record.finish(error=f"no original destination: {e}")
            return
        record.dst = target
        if target.port in TUNNEL_PORTS or target.ip not in workload.ips:
            t.abort()
            record.finish(error=f"refused: {target} is not an app port of this pod")
            return
        verdict = self.authorize(workload, None, client, target)
        record.verdict = verdict
        if not verdict.allowed:
            t.abort()
            record.finish(error=verdict.reason)
            self.connection_table.refused(self._labels(workload, client, ResponseFlags.DENY))
            return
        try:
            _, upstream = await connect_tcp(self._factory, target, as_client=str(client.ip))
        except asyncio.CancelledError:
            record.finish(error=STOPPED)
            raise
        except (TimeoutError, OSError) as e:
            t.abort()
            record.finish(error=f"connecting to the app at {target} failed: {e}")
            self.connection_table.refused(self._labels(workload, client, ResponseFlags.CONNECT))
            return
        pipe = TcpPipe(app, upstream)
        labels = self._labels(workload, client, ResponseFlags.NONE)
        pipe.start()
        self.connection_table.follow(record, self, pipe, labels, recheck=self.recheck)

    def _labels(self, workload: Workload, client: SocketAddr, flags: str) -> TcpLabels:
        # A plaintext client proves no identity; its workload is whatever owns its address.
        source = self._state().workload_by_ip(workload.network, client.ip)
        return inbound_labels(source, workload, None, flags)

    def _recheck(self, entry: Tracked) -> Verdict:
        assert isinstance(entry.src, SocketAddr) and isinstance(entry.dst, SocketAddr)
        return self.authorize(self._workload(), None, entry.src, entry.dst)
