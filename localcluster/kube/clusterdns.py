"""The cluster DNS's listeners: UDP and TCP on sockets the caller made (the host's :53 in the
cluster netns), answering from the current zone (`dnszone.respond`).

Bounds, so no client can make the kubelet hold more than a fixed amount, and nothing a client
sends can stop the server:
- each source address has a token bucket (`rate` queries a second, `burst` at once); a
  query beyond it is dropped (UDP) or ends the connection (TCP); at most `max_sources`
  buckets are kept (the least recently used goes first);
- TCP: at most `max_tcp_connections` at once (the excess is closed at once), one query
  read at a time, each of at most `max_tcp_query` bytes and within `tcp_idle_timeout` of
  the connection's start or the previous answer;
- a message that is not a query we take is answered FORMERR or dropped (`dnszone.respond`);
  an error while answering one query is logged and that query dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from localcluster.kube.dnszone import Zone, respond
from meshcore.sockets import LISTEN_BACKLOG
from ztunnel.dns import message as m

log = logging.getLogger("kubelet.dns")


@dataclass(frozen=True, slots=True)
class DnsLimits:
    rate: float = 200.0
    burst: float = 400.0
    max_sources: int = 4096
    max_tcp_connections: int = 64
    max_tcp_query: int = 4096  # a question and an OPT record fit in far less
    tcp_idle_timeout: float = 10.0


class RateLimiter:
    """A token bucket per source; `allow` spends one token if there is one (pure but for
    the clock it is given)."""

    def __init__(self, rate: float, burst: float, max_sources: int) -> None:
        self.rate = rate
        self.burst = burst
        self.max_sources = max_sources
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def allow(self, source: str, now: float) -> bool:
        tokens, at = self._buckets.pop(source, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        ok = tokens >= 1.0
        self._buckets[source] = (tokens - 1.0 if ok else tokens, now)
        while len(self._buckets) > self.max_sources:
            self._buckets.popitem(last=False)
        return ok

    def __len__(self) -> int:
        return len(self._buckets)


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: ClusterDns) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's own UDP transport is not a DatagramTransport subclass in 3.11.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        out = self.server.answer(data, addr[0], udp=True)
        if out is not None and self.transport is not None:
            self.transport.sendto(out, addr)

    def error_received(self, exc: Exception) -> None:
        # An ICMP error for an earlier answer (the client went away): nothing to do.
        pass


class ClusterDns:
    def __init__(self, zone: Callable[[], Zone], limits: DnsLimits | None = None) -> None:
        self.zone = zone
        self.limits = limits or DnsLimits()
        self.limiter = RateLimiter(self.limits.rate, self.limits.burst, self.limits.max_sources)
        self.answered = 0
        self.limited = 0
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()

    def answer(self, data: bytes, source: str, udp: bool) -> bytes | None:
        """The answer to one message from `source`, or None to send nothing."""
        if not self.limiter.allow(source, time.monotonic()):
            self.limited += 1
            return None
        try:
            out = respond(self.zone(), data, udp)
        except Exception:
            # A bug must cost one query, never the server.
            log.exception("cluster DNS: answering %d bytes from %s failed", len(data), source)
            return m.build_error(data, m.Rcode.SERVFAIL)
        self.answered += 1
        return out

    async def start(self, udp_sock: socket.socket, tcp_sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        udp_sock.setblocking(False)
        tcp_sock.setblocking(False)
        transport, _ = await loop.create_datagram_endpoint(lambda: _Udp(self), sock=udp_sock)
        self._udp = transport
        self._tcp = await asyncio.start_server(
            self._connection,
            sock=tcp_sock,
            backlog=LISTEN_BACKLOG,  # else listen(100) again
        )

    async def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
        for t in list(self._conns):
            t.cancel()
        for t in list(self._conns):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._tcp is not None:
            with contextlib.suppress(Exception):
                await self._tcp.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._conns) >= self.limits.max_tcp_connections:
            writer.transport.abort()
            return
        self._conns.add(task)
        peer = writer.get_extra_info("peername")
        source = str(peer[0]) if isinstance(peer, tuple) else "?"
        try:
            await self._serve(reader, writer, source)
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            pass  # the client went away or idled: its connection ends, nothing else
        finally:
            self._conns.discard(task)
            writer.transport.abort()

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, source: str
    ) -> None:
        limits = self.limits
        while True:
            async with asyncio.timeout(limits.tcp_idle_timeout):
                (size,) = struct.unpack("!H", await reader.readexactly(2))
                if not m.HEADER_LEN <= size <= limits.max_tcp_query:
                    return  # not a query we would read: close rather than read it all
                data = await reader.readexactly(size)
            out = self.answer(data, source, udp=False)
            if out is None:
                return  # rate-limited (or nothing to answer): the connection ends
            writer.write(struct.pack("!H", len(out)) + out)
            async with asyncio.timeout(limits.tcp_idle_timeout):
                await writer.drain()
