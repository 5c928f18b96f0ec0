"""DNS capture in both modes: a pod's queries to any resolver reach the tunnel's DNS proxy.

The two-namespace topology of test_ebpf.py: the "client" netns plays the cluster's resolver
(UDP and TCP on 10.253.0.1:53, it knows `outside.example.org` only); the pod netns has the
capture with DNS on and a real `DnsProxy` on 127.0.0.1:15053, created through the pod's
netns fd as the tunnel does. The app's sockets are plain (unmarked) sockets in the pod.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
import struct
import threading
from collections.abc import Iterator

import pytest

import nsutil
from meshcore.sockets import NetnsSocketFactory
from meshcore.state import MeshState, NetworkAddress
from redirect import capture
from redirect.capture import RedirectMode
from redirect.iptables import CaptureError
from redirect.rules import InpodConfig
from tests.redirect.test_ebpf import CLIENT_IP, Topology, topology  # noqa: F401  (fixture)
from tests.support.aio import run
from tests.support.mesh import service, workload
from ztunnel.dns import message as m
from ztunnel.dns.server import DnsProxy

pytestmark = pytest.mark.netns

CFG = InpodConfig(capture_dns=True)
VIP = "10.96.0.77"
CLIENT = workload(name="app", namespace="ns1")
STATE = MeshState.build(
    [CLIENT],
    [service(name="web", namespace="ns1", vips=(NetworkAddress("", ipaddress.ip_address(VIP)),))],
    [],
)


class Resolver:
    """The upstream: answers in a thread from the client netns; records what it was asked."""

    def __init__(self, netns: str) -> None:
        self.asked: list[str] = []
        self.udp = nsutil.socket_at(netns, socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind((CLIENT_IP, 53))
        self.tcp = nsutil.socket_at(netns)
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.tcp.bind((CLIENT_IP, 53))
        self.tcp.listen(8)
        for target in (self._serve_udp, self._serve_tcp):
            threading.Thread(target=target, daemon=True).start()

    def _answer(self, data: bytes) -> bytes:
        q = m.parse_query(data)
        self.asked.append(q.question.name)
        if q.question.name == "outside.example.org":
            rec = m.a(q.question.labels, ipaddress.IPv4Address("192.0.2.99"), 5)
            return m.build_response(q, 0, (rec,), authoritative=False)
        return m.build_response(q, m.Rcode.NXDOMAIN, authoritative=False)

    def _serve_udp(self) -> None:
        with contextlib.suppress(OSError, m.DnsFormatError):
            while True:
                data, peer = self.udp.recvfrom(4096)
                if not data:
                    return  # shut down
                self.udp.sendto(self._answer(data), peer)

    def _serve_tcp(self) -> None:
        with contextlib.suppress(OSError, m.DnsFormatError, struct.error):
            while True:
                conn, _ = self.tcp.accept()
                with conn:
                    f = conn.makefile("rb")
                    out = self._answer(f.read(struct.unpack("!H", f.read(2))[0]))
                    conn.sendall(struct.pack("!H", len(out)) + out)

    def close(self) -> None:
        for s in (self.udp, self.tcp):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


@pytest.fixture(params=list(RedirectMode), ids=lambda m: m.value)
def dns_pod(topology: Topology, request: pytest.FixtureRequest) -> Iterator[Topology]:  # noqa: F811
    mode: RedirectMode = request.param
    capture.install(topology.pod, mode, CFG)
    try:
        yield topology
    finally:
        with contextlib.suppress(CaptureError):
            capture.remove(topology.pod, mode, CFG)


def a_records(answer: bytes) -> list[str]:
    return [str(ip) for ip in m.answer_addresses(answer, m.RType.A)]


async def udp_query(pod_fd: int, name: str) -> tuple[bytes, tuple[str, int]]:
    loop = asyncio.get_running_loop()
    s = nsutil.socket_in(pod_fd, socket.AF_INET, socket.SOCK_DGRAM)  # the app's: unmarked
    s.setblocking(False)
    try:
        s.connect((CLIENT_IP, 53))  # as a stub resolver does: only its resolver's answers
        await loop.sock_sendall(s, m.build_query(0x1111, m.name_labels(name), m.RType.A))
        async with asyncio.timeout(5):
            data = await loop.sock_recv(s, 4096)
        return data, s.getpeername()
    finally:
        s.close()


async def tcp_query(pod_fd: int, name: str) -> bytes:
    loop = asyncio.get_running_loop()
    s = nsutil.socket_in(pod_fd)
    s.setblocking(False)
    try:
        async with asyncio.timeout(5):
            await loop.sock_connect(s, (CLIENT_IP, 53))
            q = m.build_query(0x2222, m.name_labels(name), m.RType.A)
            await loop.sock_sendall(s, struct.pack("!H", len(q)) + q)
            buf = b""
            while len(buf) < 2 or len(buf) < 2 + int.from_bytes(buf[:2], "big"):
                chunk = await loop.sock_recv(s, 4096)
                assert chunk, "closed early"
                buf += chunk
        return buf[2:]
    finally:
        s.close()


def test_queries_reach_the_proxy_and_unknown_names_the_resolver(dns_pod: Topology) -> None:
    resolver = Resolver(dns_pod.client)
    factory = NetnsSocketFactory(os.dup(dns_pod.pod_fd))

    async def main() -> None:
        proxy = DnsProxy(lambda: CLIENT, lambda: STATE, factory, (ipaddress.ip_address(CLIENT_IP),))
        await proxy.start()
        try:
            # A service name: the proxy answers, from the resolver's address.
            answer, peer = await udp_query(dns_pod.pod_fd, "web")
            assert a_records(answer) == [VIP] and peer == (CLIENT_IP, 53)
            assert await tcp_query(dns_pod.pod_fd, "web.ns1.svc.cluster.local") != b""
            assert a_records(await tcp_query(dns_pod.pod_fd, "web.ns1")) == [VIP]
            assert resolver.asked == []
            # Anything else is forwarded by the proxy (its marked socket is not captured:
            # no loop) and the resolver's answer relayed.
            answer, _ = await udp_query(dns_pod.pod_fd, "outside.example.org")
            assert a_records(answer) == ["192.0.2.99"]
            answer = await tcp_query(dns_pod.pod_fd, "nowhere.example.org")
            assert m.HEADER.unpack_from(answer)[1] & m.RCODE_MASK == m.Rcode.NXDOMAIN
            assert resolver.asked == ["outside.example.org", "nowhere.example.org"]
        finally:
            await proxy.close()

    try:
        run(main, limit=30)
    finally:
        factory.close()
        resolver.close()


def test_without_the_proxy_queries_are_not_let_past(dns_pod: Topology) -> None:
    """Captured but nobody on 15053: the query fails, it never reaches the resolver."""
    resolver = Resolver(dns_pod.client)

    async def main() -> None:
        with pytest.raises((TimeoutError, ConnectionRefusedError)):
            await udp_query(dns_pod.pod_fd, "outside.example.org")

    try:
        run(main, limit=30)
        assert resolver.asked == []
    finally:
        resolver.close()
