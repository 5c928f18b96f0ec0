"""The API server as the cluster sees it: a TCP listener (the host's :6443 in the cluster netns,
made by the caller) whose every connection is spliced to the real kube-apiserver on loopback.

Bytes pass as they are: TLS runs end to end between the client and the API server, whose
certificate names the addresses and names clients use in the cluster (10.96.0.1,
`kubernetes.default.svc`, ...). Half-closes are passed on.

Bounds: at most `max_connections` spliced at once (the excess is closed at once); the API
server must accept within `connect_timeout`; a client must send its first bytes (the TLS
ClientHello) within `first_byte_timeout`; a connection on which neither side sent anything
for `idle_timeout` is closed. A watch can be quiet for as long as the API server lets it
run (--min-request-timeout, 1800 s, times a random factor up to 2), so the idle bound is
above that: the API server ends a quiet watch before we would.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from meshcore.sockets import LISTEN_BACKLOG

log = logging.getLogger("kubelet.apiforward")

CHUNK = 64 * 1024


@dataclass(frozen=True, slots=True)
class ForwardLimits:
    max_connections: int = 256
    connect_timeout: float = 5.0
    first_byte_timeout: float = 10.0
    idle_timeout: float = 3900.0


class _Activity:
    """When bytes last moved on a connection, in either direction."""

    def __init__(self) -> None:
        self.at = asyncio.get_running_loop().time()

    def touch(self) -> None:
        self.at = asyncio.get_running_loop().time()

    def quiet_for(self) -> float:
        return asyncio.get_running_loop().time() - self.at


Dial = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


class ApiForwarder:
    """`dial`: how to reach the upstream for each connection (default: TCP to host:port
    from here); the host side's webhook forward dials a pod from the cluster's netns."""

    def __init__(
        self,
        host: str,
        port: int,
        limits: ForwardLimits | None = None,
        dial: Dial | None = None,
    ) -> None:
        self.upstream = (host, port)
        self.dial: Dial = dial or (lambda: asyncio.open_connection(*self.upstream))
        self.limits = limits or ForwardLimits()
        self.accepted = 0
        self.refused = 0
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()

    @property
    def active(self) -> int:
        return len(self._conns)

    async def start(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._server = await asyncio.start_server(
            self._connection,
            sock=sock,
            backlog=LISTEN_BACKLOG,  # else listen(100) again
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._conns):
            t.cancel()
        for t in list(self._conns):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._conns) >= self.limits.max_connections:
            self.refused += 1
            writer.transport.abort()
            return
        self._conns.add(task)
        self.accepted += 1
        up_writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(self.limits.first_byte_timeout):
                first = await reader.read(CHUNK)
            if not first:
                return
            async with asyncio.timeout(self.limits.connect_timeout):
                up_reader, up_writer = await self.dial()
            up_writer.write(first)
            await self._splice(reader, writer, up_reader, up_writer)
        except (OSError, TimeoutError, LookupError) as e:
            log.debug("api forward: connection ended: %s", e)
        finally:
            self._conns.discard(task)
            writer.transport.abort()
            if up_writer is not None:
                up_writer.transport.abort()

    async def _splice(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        up_reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
    ) -> None:
        activity = _Activity()
        try:
            # A task group: one direction failing (or idling out) stops the other.
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._pump(reader, up_writer, activity))
                tg.create_task(self._pump(up_reader, writer, activity))
        except* (OSError, TimeoutError) as eg:
            log.debug("api forward: connection ended: %s", eg.exceptions[0])

    async def _pump(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, activity: _Activity
    ) -> None:
        idle = self.limits.idle_timeout
        while True:
            try:
                async with asyncio.timeout(max(idle - activity.quiet_for(), 0.0)):
                    data = await src.read(CHUNK)
            except TimeoutError:
                if activity.quiet_for() < idle:
                    continue  # the other direction moved meanwhile
                raise
            if not data:
                if dst.can_write_eof():
                    with contextlib.suppress(OSError):
                        dst.write_eof()
                return
            activity.touch()
            dst.write(data)
            async with asyncio.timeout(idle):  # a peer that reads nothing is idle too
                await dst.drain()
            activity.touch()
