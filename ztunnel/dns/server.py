"""One pod's DNS proxy: UDP and TCP on 127.0.0.1:15053 inside the pod's netns.

The capture (`redirect.rules`, DNS capture on) REDIRECTs the app's queries to port 53
here; a REDIRECTed locally generated packet goes to 127.0.0.1, and conntrack turns our
answer back into one from the resolver the app asked. Each query is parsed
(`message.parse_query`), then either answered from the mesh state (`resolve.decide`) or
forwarded to the upstream resolvers from a socket in the pod's netns marked 0x539 (the
capture never takes the tunnel's own packets: no loop) and the answer relayed.

Bounds, so a pod cannot make the tunnel hold more than a fixed amount for it:
- queries being forwarded per pod (UDP and TCP together): `max_in_flight`; beyond that a
  UDP query is dropped (the client retries) and a TCP one answered SERVFAIL;
- each forward: `attempt_timeout` per upstream, `forward_timeout` in all, then SERVFAIL;
- TCP: `max_tcp_connections` per pod (the excess is closed at once), one query read at a
  time, each within `tcp_idle_timeout` of the previous answer;
- a malformed query is answered FORMERR when it has a header (else dropped); an answer
  sent to us is dropped; an opcode other than QUERY is NOTIMP;
- queries a second per pod: `max_queries_per_second` (a token bucket of
  `max_query_burst`); past it a UDP query is dropped unparsed, a TCP one answered REFUSED
  (a bare header: never larger than the query);
- amplification: no answer over UDP is larger than the query's limit (512 bytes, or its
  EDNS size): ours are built within it, a forwarded one that is larger is cut to its
  question with TC set; ANY is answered NOTIMP, never forwarded (RFC 8482: its answers
  are the large ones amplification attacks ask for).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import struct
import time
from collections.abc import Callable

import structlog

import nsutil
from meshcore.defaults import TUNNEL_MARK
from meshcore.localtrust import RateLog, TokenBucket
from meshcore.runtime.tasks import TaskSet
from meshcore.sockets import NetnsSocketFactory, SocketFactory
from meshcore.state import MeshState, Workload
from ztunnel.dns import message as m
from ztunnel.dns.limits import DnsLimits as DnsLimits
from ztunnel.dns.metrics import (
    REQUESTS,
    UPSTREAM_FAILURES,
    UPSTREAM_REQUESTS,
    DnsMetrics,
)
from ztunnel.dns.resolve import Answer, decide

log = structlog.get_logger(__name__)

DNS_PORT = 15053
UPSTREAM_PORT = 53
IP_TRANSPARENT = 19
IP_RECVORIGDSTADDR = IP_ORIGDSTADDR = 20
_ANC_SPACE = socket.CMSG_SPACE(16)  # one sockaddr_in
UDP_BATCH = 64
DNS_TCP_BACKLOG = 128  # TCP queries are rare (truncated answers): a small accept queue
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _udp_socket(factory: SocketFactory, family: int) -> socket.socket:
    """A UDP socket where `factory` makes its TCP ones (the pod's netns, marked 0x539)."""
    if isinstance(factory, NetnsSocketFactory):
        s = nsutil.socket_in(factory.netns_fd, family, socket.SOCK_DGRAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, TUNNEL_MARK)
        except OSError:
            s.close()
            raise
    else:
        s = socket.socket(family, socket.SOCK_DGRAM)
    s.setblocking(False)
    return s


def _family(ip: IPAddress) -> int:
    return socket.AF_INET6 if ip.version == 6 else socket.AF_INET


class ForwardError(OSError):
    """No upstream gave a usable answer; the message says why. An OSError: to a caller
    that connects by name, a failed lookup is a failed connect."""


class _Collector(asyncio.DatagramProtocol):
    """The upstream answer to one forwarded query: the first datagram with its ID and
    question (anything else, e.g. a late answer to an earlier try, is ignored)."""

    def __init__(self, ident: int, question: m.Question) -> None:
        self.ident = ident
        self.question = question
        self.answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: object) -> None:
        if self.answer.done():
            return
        try:
            head = m.parse_response_head(data)
        except m.DnsFormatError:
            return
        q = head.question
        same = q is not None and (
            tuple(x.lower() for x in q.labels) == tuple(x.lower() for x in self.question.labels)
            and (q.qtype, q.qclass) == (self.question.qtype, self.question.qclass)
        )
        if head.id == self.ident and (same or head.rcode != m.Rcode.NOERROR):
            self.answer.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.answer.done():
            self.answer.set_exception(ForwardError(f"upstream: {exc}"))


class Forwarder:
    """Sends a query to the upstream resolvers, in order, from the pod's netns."""

    def __init__(
        self, factory: SocketFactory, upstreams: tuple[IPAddress, ...], limits: DnsLimits,
        port: int = UPSTREAM_PORT,
    ) -> None:  # fmt: skip
        self._factory = factory
        self._upstreams = upstreams
        self._limits = limits
        self._port = port

    async def forward(self, query: m.Query, data: bytes, tcp: bool) -> bytes:
        if not self._upstreams:
            raise ForwardError("no upstream resolver configured")
        async with asyncio.timeout(self._limits.forward_timeout):
            last: Exception = ForwardError("no upstream answered")
            for ip in self._upstreams:
                ident = int.from_bytes(os.urandom(2), "big")  # not the client's: no spoofing
                try:
                    async with asyncio.timeout(self._limits.attempt_timeout):
                        if tcp:
                            answer = await self._tcp(ip, m.with_id(data, ident))
                        else:
                            answer = await self._udp(ip, m.with_id(data, ident), ident, query)
                except (TimeoutError, OSError, ForwardError, m.DnsFormatError) as e:
                    last = e
                    continue
                return m.with_id(answer, query.id)
            raise ForwardError(f"upstream failed: {last!r}")

    async def _udp(self, ip: IPAddress, data: bytes, ident: int, query: m.Query) -> bytes:
        loop = asyncio.get_running_loop()
        sock = _udp_socket(self._factory, _family(ip))
        try:
            sock.connect((str(ip), self._port))
        except OSError:
            sock.close()
            raise
        transport, proto = await loop.create_datagram_endpoint(
            lambda: _Collector(ident, query.question), sock=sock
        )
        try:
            transport.sendto(data)
            return await proto.answer
        finally:
            transport.close()

    async def _tcp(self, ip: IPAddress, data: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        sock = self._factory.new(_family(ip))
        try:
            await loop.sock_connect(sock, (str(ip), self._port))
            await loop.sock_sendall(sock, struct.pack("!H", len(data)) + data)
            size = int.from_bytes(await _recv_exact(loop, sock, 2), "big")
            answer = await _recv_exact(loop, sock, size)
        finally:
            sock.close()
        m.parse_response_head(answer)
        return answer


async def _recv_exact(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await loop.sock_recv(sock, n - len(buf))
        if not chunk:
            raise ForwardError("upstream closed the TCP connection early")
        buf += chunk
    return bytes(buf)


class DnsProxy:
    """The DNS proxy of one pod."""

    def __init__(
        self,
        workload: Callable[[], Workload | None],
        state: Callable[[], MeshState],
        factory: SocketFactory,
        upstreams: tuple[IPAddress, ...],
        limits: DnsLimits | None = None,
        *,
        upstream_port: int = UPSTREAM_PORT,
        metrics: DnsMetrics | None = None,
    ) -> None:
        self._workload = workload
        self.metrics = metrics if metrics is not None else DnsMetrics()
        self._state = state
        self._factory = factory
        self.limits = limits or DnsLimits()
        self.forwarder = Forwarder(factory, upstreams, self.limits, upstream_port)
        self.tasks = TaskSet("dns")
        self.in_flight = 0
        # A pod whose upstream fails (or that asks for failing names on purpose) must not
        # make the tunnel write a line per query: one a second, with the count skipped.
        self._forward_log = RateLog(interval=1.0)
        self.dropped = 0
        self.tcp_connections = 0
        self._rate = TokenBucket(self.limits.max_queries_per_second, self.limits.max_query_burst)
        self._udp_sock: socket.socket | None = None
        self._udp_addr: tuple[str, int] | None = None
        self._tcp: asyncio.Server | None = None

    @property
    def udp_address(self) -> tuple[str, int] | None:
        return self._udp_addr

    @property
    def tcp_address(self) -> tuple[str, int] | None:
        if self._tcp is None or not self._tcp.sockets:
            return None
        addr: tuple[str, int] = self._tcp.sockets[0].getsockname()
        return addr

    async def start(self, host: str = "127.0.0.1", port: int = DNS_PORT) -> None:
        loop = asyncio.get_running_loop()
        udp = _udp_socket(self._factory, socket.AF_INET)
        tcp = self._factory.new(socket.AF_INET)
        try:
            for s in (udp, tcp):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # upgrade overlap
                s.bind((host, port))
            # Where each query was sent: our own address under the iptables capture
            # (REDIRECT rewrote it), the resolver's under the eBPF one (steered unchanged).
            udp.setsockopt(socket.SOL_IP, IP_RECVORIGDSTADDR, 1)
            if self._factory.transparent:
                # The eBPF capture hands over connections still addressed to the resolver:
                # the handshake must be answered from that non-local address.
                tcp.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            tcp.listen(DNS_TCP_BACKLOG)
            # The backlog again: the loop would listen(100) on the socket otherwise.
            self._tcp = await asyncio.start_server(
                self._serve_tcp, sock=tcp, backlog=DNS_TCP_BACKLOG
            )
        except BaseException:
            udp.close()
            tcp.close()
            raise
        self._udp_sock = udp
        self._udp_addr = udp.getsockname()
        loop.add_reader(udp.fileno(), self._on_readable)

    async def close(self) -> None:
        udp, self._udp_sock = self._udp_sock, None
        if udp is not None:
            asyncio.get_running_loop().remove_reader(udp.fileno())
            udp.close()
        if self._tcp is not None:
            self._tcp.close()
        await self.tasks.cancel_all()

    async def lookup(self, host: str) -> IPAddress:
        """`host`'s first IPv4 address, asked of the upstream resolvers (a ServiceEntry
        resolved by DNS, when a connection is made to it). Raises ForwardError."""
        try:
            labels = m.name_labels(host)
        except (m.DnsFormatError, UnicodeEncodeError) as e:
            raise ForwardError(f"{host!r} is not a DNS name: {e}") from None
        ident = int.from_bytes(os.urandom(2), "big")
        data = m.build_query(ident, labels, m.RType.A)
        query = m.parse_query(data)
        try:
            answer = await self.forwarder.forward(query, data, tcp=False)
            if m.HEADER.unpack_from(answer)[1] & m.TC:
                answer = await self.forwarder.forward(query, data, tcp=True)
            addresses = m.answer_addresses(answer, m.RType.A)
        except (TimeoutError, m.DnsFormatError) as e:
            raise ForwardError(f"cannot resolve {host}: {e!r}") from None
        if not addresses:
            rcode = m.Rcode(m.HEADER.unpack_from(answer)[1] & m.RCODE_MASK).name
            raise ForwardError(f"cannot resolve {host}: no A record ({rcode})")
        return addresses[0]

    # -- one query --------------------------------------------------------------------------

    async def answer(self, data: bytes, tcp: bool) -> bytes | None:
        """The bytes to send back for one query (None: send nothing)."""
        try:
            query = m.parse_query(data)
        except m.DnsFormatError as e:
            log.debug("dns_malformed", error=str(e))
            return m.build_error(data, m.Rcode.FORMERR)
        limit = m.MAX_MESSAGE if tcp else query.udp_limit()
        if query.opcode != 0 or query.question.qtype == m.RType.ANY:
            return m.build_response(query, m.Rcode.NOTIMP, authoritative=False, limit=limit)
        client = self._workload()
        key = self.metrics.key(query.question.qtype, tcp, client)
        self.metrics.add(REQUESTS, key)
        if client is None:
            return m.build_response(query, m.Rcode.SERVFAIL, authoritative=False, limit=limit)
        decision = decide(self._state(), client, query.question)
        if isinstance(decision, Answer):
            return m.build_response(query, m.Rcode.NOERROR, decision.records, limit=limit)
        if self.in_flight >= self.limits.max_in_flight:
            self.dropped += 1
            self.metrics.refuse("in_flight", tcp)
            if tcp:
                return m.build_response(query, m.Rcode.SERVFAIL, authoritative=False)
            return None
        self.in_flight += 1
        self.metrics.add(UPSTREAM_REQUESTS, key)
        try:
            answer = await self.forwarder.forward(query, data, tcp)
            if len(answer) > limit:
                # An upstream ignored the client's size: relayed whole, it would make us
                # an amplifier. The client retries over TCP.
                return m.build_response(query, m.Rcode.NOERROR, authoritative=False, limit=0)
            return answer
        except (ForwardError, TimeoutError) as e:
            self.metrics.add(UPSTREAM_FAILURES, key)
            skipped = self._forward_log.due(time.monotonic())
            if skipped is not None:
                log.info(
                    "dns_forward_failed",
                    name=query.question.name,
                    error=str(e),
                    suppressed_before=skipped,
                )
            return m.build_response(query, m.Rcode.SERVFAIL, authoritative=False, limit=limit)
        finally:
            self.in_flight -= 1

    def _on_readable(self) -> None:
        sock = self._udp_sock
        # A bounded batch per wakeup, so a flood cannot keep the loop here.
        for _ in range(UDP_BATCH):
            if sock is None:
                return
            try:
                data, ancdata, _flags, addr = sock.recvmsg(m.MAX_MESSAGE, _ANC_SPACE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.debug("dns_udp_error", error=str(e))  # ICMP for an earlier answer
                continue
            if not self._rate.allow(time.monotonic()):
                self.metrics.refuse("rate", tcp=False)
                continue
            self.tasks.spawn(self._udp_query(data, addr, _original_dst(ancdata)), "dns-udp")

    async def _udp_query(
        self, data: bytes, client: tuple[str, int], to: tuple[str, int] | None
    ) -> None:
        out = await self.answer(data, tcp=False)
        sock = self._udp_sock
        if out is None or sock is None:
            return
        try:
            if to is None or to == self._udp_addr:
                sock.sendto(out, client)
            else:
                self._send_as(to, out, client)
        except OSError as e:
            log.debug("dns_udp_send_failed", error=str(e))

    def _send_as(self, source: tuple[str, int], data: bytes, client: tuple[str, int]) -> None:
        """Answer from the address the query was sent to (the eBPF capture delivered it
        unchanged): a transparent socket bound there, marked, in the pod's netns."""
        s = _udp_socket(self._factory, socket.AF_INET)
        try:
            s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(source)
            s.sendto(data, client)
        finally:
            s.close()

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.tcp_connections >= self.limits.max_tcp_connections:
            self.dropped += 1
            self.metrics.refuse("tcp_connections", tcp=True)
            writer.transport.abort()
            return
        self.tcp_connections += 1
        try:
            while True:
                try:
                    async with asyncio.timeout(self.limits.tcp_idle_timeout):
                        size = int.from_bytes(await reader.readexactly(2), "big")
                        if size > self.limits.max_tcp_query_bytes:
                            self.metrics.refuse("size", tcp=True)
                            return
                        data = await reader.readexactly(size)
                except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                    return
                if self._rate.allow(time.monotonic()):
                    out = await self.answer(data, tcp=True)
                else:
                    self.metrics.refuse("rate", tcp=True)
                    out = m.build_error(data, m.Rcode.REFUSED)
                if out is None:
                    return
                writer.write(struct.pack("!H", len(out)) + out)
                await writer.drain()
        except ConnectionError:
            return
        finally:
            self.tcp_connections -= 1
            writer.transport.abort()


def _original_dst(ancdata: list[tuple[int, int, bytes]]) -> tuple[str, int] | None:
    """IP_ORIGDSTADDR's sockaddr_in: where the datagram was addressed."""
    for level, kind, data in ancdata:
        if level == socket.SOL_IP and kind == IP_ORIGDSTADDR and len(data) >= 8:
            port = int.from_bytes(data[2:4], "big")
            return socket.inet_ntoa(data[4:8]), port
    return None
