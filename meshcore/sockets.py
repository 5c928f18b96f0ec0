"""Socket capabilities handed to the proxies (architecture: inject and narrow).

A proxy never knows which network namespace it serves: it asks its `SocketFactory` for
sockets. In-pod mode creates them inside the pod's netns with the tunnel mark; tests on
loopback use a plain factory in the current namespace.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import nsutil
from meshcore.defaults import INBOUND_PLAIN_PORT, OUTBOUND_PORT, TUNNEL_MARK
from meshcore.timewait import NETLINK_SOCK_DIAG, TimeWaitReaper

SO_ORIGINAL_DST = 80
IP_TRANSPARENT = 19
IP_FREEBIND = 15
TCP_KEEPALIVE_IDLE = 180  # protocols.md: keepalive 180 s
# A listener's accept queue. Whoever serves a listener through the loop must pass it again
# (`create_server(sock=..., backlog=LISTEN_BACKLOG)`): without `backlog` the loop calls
# listen(100) on the socket it is given, and a burst of new connections past 100 not yet
# accepted has its SYNs dropped, each retried 1, 3, 7 s later (measured in the soak: 4 514
# overflows at the client pod's 15001 in 90 s at 1 000 new connections/s).
LISTEN_BACKLOG = 1024


@dataclass(frozen=True, slots=True)
class SocketAddr:
    """An IP and port. Original destination, peer and listen addresses all use it, but
    are never mixed: each field that holds one says which it is."""

    ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int

    def __str__(self) -> str:
        text = ip_text(self.ip)
        if ":" in text:  # IPv6
            return f"[{text}]:{self.port}"
        return f"{text}:{self.port}"

    @property
    def pair(self) -> tuple[str, int]:
        return (ip_text(self.ip), self.port)

    @classmethod
    def of(cls, sockaddr: tuple[str, int] | tuple[str, int, int, int]) -> SocketAddr:
        return cls(_ip(sockaddr[0]), int(sockaddr[1]))


# `str(ip)`, remembered: ipaddress formats an address digit group by digit group in Python,
# and a connection's addresses are written several times (connect, access log, table).
ip_text: Callable[[ipaddress.IPv4Address | ipaddress.IPv6Address], str] = functools.lru_cache(
    maxsize=4096
)(str)


@functools.lru_cache(maxsize=4096)
def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    # A node sees the same few client addresses on thousands of connections: parse each
    # once and share the object (memory per open connection, and time per accept).
    return ipaddress.ip_address(text)


def parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """`ipaddress.ip_address(text)` (ValueError alike), the same object for the same text
    while it is among the 4096 most recent: HBONE authorities name the same few pod
    addresses over and over."""
    return _ip(text)


@functools.lru_cache(maxsize=4096)
def _ipv4_packed(packed: bytes) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(packed)


@functools.lru_cache(maxsize=4096)
def shared_addr(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> SocketAddr:
    """`SocketAddr(ip, port)`, the same object for the same pair while it is among the 4096
    most recent. For addresses that repeat across connections (original destinations,
    HBONE next hops, CONNECT authorities: a few pod addresses over and over), not client
    addresses (a new port each time): a tunnel keeps these for each open connection, and
    one object with its port costs 80 bytes."""
    return SocketAddr(ip, port)


class SocketFactory(Protocol):
    def new(self, family: int = socket.AF_INET) -> socket.socket:
        """A TCP socket in the right namespace, marked, non-blocking."""

    @property
    def transparent(self) -> bool:
        """Whether upstream sockets may spoof the client's source address."""


# Sockets a pod's factory makes ahead, per family: entering the pod's netns and leaving
# it again (two setns calls) cost more than the socket itself, and the destination tunnel
# makes one socket per new connection (its connect to the app).
SPARE_SOCKETS = 8


class NetnsSocketFactory:
    """Sockets inside one pod's network namespace, each marked 0x539. They are made
    `SPARE_SOCKETS` at a time, in one visit to the namespace, and handed out one by one;
    `close` closes the ones not handed out."""

    def __init__(self, netns_fd: int) -> None:
        self.netns_fd = netns_fd
        self._spare: dict[int, list[socket.socket]] = {}
        # For the capture listeners' mirrored connections (eBPF mode): see meshcore.timewait.
        self.time_waits = TimeWaitReaper(self.diag_socket)

    def diag_socket(self) -> socket.socket:
        """A NETLINK_SOCK_DIAG socket in the pod's namespace (the caller closes it)."""
        (nl,) = nsutil.sockets_in(
            self.netns_fd, 1, socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG
        )
        return nl

    @property
    def transparent(self) -> bool:
        return True

    def new(self, family: int = socket.AF_INET) -> socket.socket:
        spare = self._spare.get(family)
        if not spare:
            spare = self._spare[family] = self._make(family)
        return spare.pop()

    def _make(self, family: int) -> list[socket.socket]:
        made = nsutil.sockets_in(self.netns_fd, SPARE_SOCKETS, family, socket.SOCK_STREAM)
        try:
            for s in made:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, TUNNEL_MARK)
                s.setblocking(False)
        except OSError:
            for s in made:
                s.close()
            raise
        return made

    def close(self) -> None:
        spare, self._spare = self._spare, {}
        for socks in spare.values():
            for s in socks:
                s.close()
        self.time_waits.close()
        os.close(self.netns_fd)


class PlainSocketFactory:
    """Sockets in the current namespace (tests on loopback; no spoofing)."""

    @property
    def transparent(self) -> bool:
        return False

    def new(self, family: int = socket.AF_INET) -> socket.socket:
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setblocking(False)
        return s


def tune_stream(sock: socket.socket) -> None:
    """TCP_NODELAY (HBONE is latency-sensitive, the app already chose its writes) and
    keepalive as upstream."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, TCP_KEEPALIVE_IDLE)


# Capture listeners that receive connections still addressed to their original
# destination (eBPF mode steers packets to them unchanged, as TPROXY would).
TRANSPARENT_LISTENER_PORTS = frozenset({OUTBOUND_PORT, INBOUND_PLAIN_PORT})


def listener(
    factory: SocketFactory, port: int, backlog: int = LISTEN_BACKLOG, host: str = "0.0.0.0"
) -> socket.socket:
    """A listening socket on host:port (0.0.0.0 in a pod's own netns; a pod's loopback
    address when tests run pods side by side in one netns) with SO_REUSEPORT (an old and a
    new tunnel can overlap during an upgrade).

    In a pod (a transparent factory) the 15001 and 15006 listeners are IP_TRANSPARENT: with
    the eBPF capture an outbound connection keeps its remote destination as the accepted
    socket's local address, and the kernel only answers from a non-local address on behalf
    of a transparent socket (without it the SYN-ACK is never routed). 15006 mostly sees pod
    addresses, but gets the flag too so any steered destination is answered alike. Under the
    iptables capture REDIRECT makes every destination local, so the flag changes nothing.
    """
    s = factory.new(socket.AF_INET)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if factory.transparent and port in TRANSPARENT_LISTENER_PORTS:
            s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        s.bind((host, port))
        s.listen(backlog)
    except OSError:
        s.close()
        raise
    return s


def original_dst(sock: socket.socket) -> SocketAddr:
    """The destination the app asked for (IPv4), under either capture mode.

    iptables mode: REDIRECT rewrote the destination and conntrack remembers the original,
    which SO_ORIGINAL_DST reads. eBPF mode: the packets were steered to the listener
    unchanged (sk_assign), so the accepted socket's own local address is the original
    destination; there is no conntrack entry (ENOENT), or no conntrack at all
    (ENOPROTOOPT), and the local address is the answer. The fallback cannot widen what the
    iptables mode accepts: a connection there without an entry was not redirected, so its
    local address is the tunnel's own port and the proxies refuse it as a self-call.
    """
    try:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    except OSError as e:
        if e.errno not in (errno.ENOENT, errno.ENOPROTOOPT):
            raise
        host, port = sock.getsockname()[:2]
        return shared_addr(_ip(host), port)
    port, packed = struct.unpack_from("!2xH4s", raw)
    return shared_addr(_ipv4_packed(packed), port)


def make_transparent(sock: socket.socket, source_ip: str) -> None:
    """Let `sock` use the client's own address as its source (IP_TRANSPARENT plus
    IP_FREEBIND: the address is not local to the pod)."""
    sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
    sock.bind((source_ip, 0))
