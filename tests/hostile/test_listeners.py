"""Every listener but HBONE's under a hostile peer, each alone in a process on loopback
(tests/hostile/host.py): its resident memory stays within a bound during the attack and
comes back near where it started, its CPU time stays bounded, and a well-behaved client
beside the attacker keeps being answered. The limits themselves are unit-tested beside
their code; these show what they add up to. No assertion on time: every wait has a
generous limit and only ends a loop."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ztunnel.dns import message as m

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PEAK_MB = 64  # growth while attacked (a Python process of ~50 MB to start with)
LEFT_MB = 24  # growth left once the attack ended and the process settled
CPU_SECONDS = 60.0  # CPU time the attack may cost the process (a flood costs some)
ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


class Host:
    """The listener's process, seen from outside (/proc)."""

    def __init__(self, kind: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.hostile.host", kind],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=ROOT,
            env=env,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"the {kind} host did not start"
        self.ports: dict[str, int] = json.loads(line)
        # Its log lines follow on stdout: read (and drop) them, or a full pipe would stop it.
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()

    def _status(self, field: str) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
        raise AssertionError(f"no {field} for {self.proc.pid}")

    def rss_mb(self) -> float:
        return self._status("VmRSS")

    def peak_mb(self) -> float:
        return self._status("VmHWM")

    def cpu_seconds(self) -> float:
        stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def settled_rss(self, bound_mb: float, limit: float = 20.0) -> float:
        deadline = time.monotonic() + limit
        rss = self.rss_mb()
        while rss > bound_mb and time.monotonic() < deadline:
            time.sleep(0.2)
            rss = self.rss_mb()
        return rss

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def host(kind: str) -> Iterator[Host]:
    h = Host(kind)
    try:
        yield h
    finally:
        h.close()


class Beside:
    """A well-behaved client asking again and again in a thread while the attack runs:
    how many it asked and which failed."""

    def __init__(self, ask: Callable[[], bool]) -> None:
        self._ask = ask
        self._stop = threading.Event()
        self.asked = 0
        self.failed = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.asked += 1
            if not self._ask():
                self.failed += 1
            self._stop.wait(0.2)

    def __enter__(self) -> Beside:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(30)


def attack(h: Host, run: Callable[[], None], ask: Callable[[], bool]) -> None:
    """`run` the attack with the well-behaved client beside it; then the figures."""
    before_rss = h.rss_mb()
    before_cpu = h.cpu_seconds()
    with Beside(ask) as good:
        run()
    peak = h.peak_mb()
    left = h.settled_rss(before_rss + LEFT_MB)
    cpu = h.cpu_seconds() - before_cpu
    figures = f"rss {before_rss:.0f} -> peak {peak:.0f} -> {left:.0f} MB, cpu {cpu:.1f} s"
    assert good.asked > 0 and good.failed == 0, f"{good.failed}/{good.asked} failed; {figures}"
    assert peak - before_rss < PEAK_MB, figures
    assert left - before_rss < LEFT_MB, figures
    assert cpu < CPU_SECONDS, figures


def tcp(port: int, timeout: float = 10.0) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return s


def http_get(port: int, path: str) -> bool:
    """One GET, answered 200 (a retry after a reset: the limits may cut a connection
    that was still sending its request, never a request that was sent at once)."""
    for _ in range(3):
        try:
            with tcp(port) as s:
                s.sendall(f"GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".encode())
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
            if data.startswith(b"HTTP/1.1 200"):
                return True
        except OSError:
            pass
    return False


# ---- the node HTTP servers (admin, metrics, readiness) -----------------------------------


def test_node_http_server_under_slow_loris_huge_heads_and_connection_floods() -> None:
    with host("node-http") as h:
        port = h.ports["http"]

        def run() -> None:
            held = []
            try:
                for _ in range(300):  # slow-loris: a head that never ends
                    s = tcp(port)
                    s.sendall(b"GET /metrics HTTP/1.1\r\nx-slow: ")
                    held.append(s)
                for _ in range(100):  # huge heads: 431 at 16 KiB, the rest dropped
                    with contextlib.suppress(OSError), tcp(port) as s:
                        s.sendall(b"GET /metrics HTTP/1.1\r\nx: " + b"a" * 200_000)
                for _ in range(1000):  # connect and go
                    with contextlib.suppress(OSError):
                        tcp(port).close()
            finally:
                for s in held:
                    s.close()

        attack(h, run, lambda: http_get(port, "/metrics"))


# ---- the DNS proxy ----------------------------------------------------------------------


def dns_ask(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(m.build_query(7, (b"web",), m.RType.A), ("127.0.0.1", port))
        for _ in range(3):
            try:
                data = s.recv(4096)
            except TimeoutError:
                s.sendto(m.build_query(7, (b"web",), m.RType.A), ("127.0.0.1", port))
                continue
            return bool(m.HEADER.unpack_from(data)[1] & m.RCODE_MASK == m.Rcode.NOERROR)
    return False


def test_dns_proxy_under_floods_of_malformed_oversized_and_any_queries() -> None:
    with host("dns") as h:
        udp, tcp_port = h.ports["attacked_udp"], h.ports["attacked_tcp"]

        def run() -> None:
            good = m.build_query(1, (b"web",), m.RType.A)
            kinds = [
                good,
                m.build_query(2, m.name_labels("example.com"), m.RType.ANY),
                b"\x00\x01" + os.urandom(40),  # malformed
                good + b"\x00" * 3000,  # oversized: trailing garbage
                m.build_query(3, m.name_labels("far.example.com"), m.RType.A),  # forwarded
            ]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.setblocking(False)
                for i in range(40_000):
                    with contextlib.suppress(BlockingIOError):
                        s.sendto(kinds[i % len(kinds)], ("127.0.0.1", udp))
            held = []
            try:
                for _ in range(200):  # TCP: connections past the cap, oversized lengths
                    with contextlib.suppress(OSError):
                        c = tcp(tcp_port)
                        c.sendall(struct.pack("!H", 65535) + b"\0" * 1000)
                        held.append(c)
            finally:
                for c in held:
                    c.close()

        attack(h, run, lambda: dns_ask(h.ports["good_udp"]))


# ---- the control plane's gRPC server ---------------------------------------------------


def xds_push(port: int) -> bool:
    """A well-behaved xDS client: its first push (retried while the connection cap is
    held by silent connections, each of which the handshake timeout ends)."""
    import asyncio

    import grpc

    from tests.xds.test_hostile_clients import first_push, subscribe

    async def ask() -> bool:
        for _ in range(10):
            try:
                return bool(await first_push(port, subscribe()))
            except (grpc.aio.AioRpcError, TimeoutError):
                await asyncio.sleep(0.5)
        return False

    return asyncio.run(ask())


def test_grpc_server_under_silent_connections_and_oversized_messages() -> None:
    with host("grpc") as h:
        port = h.ports["grpc"]

        def run() -> None:
            held = []
            try:
                for _ in range(300):  # never a byte: capped, then timed out
                    with contextlib.suppress(OSError):
                        held.append(tcp(port))
                for _ in range(20):  # a 5 MB gRPC message: refused at 4 MiB
                    with contextlib.suppress(OSError), tcp(port) as s:
                        s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\0\0\0\x04\0\0\0\0\0")
                        s.sendall(b"\0" * 5_000_000)
            finally:
                for s in held:
                    s.close()

        attack(h, run, lambda: xds_push(port))


# ---- the waypoint's HTTP servers ---------------------------------------------------------


def test_waypoint_http_under_pipelining_slow_loris_and_huge_bodies() -> None:
    with host("waypoint") as h:
        h1 = h.ports["h1"]

        def run() -> None:
            held = []
            try:
                for _ in range(200):  # slow-loris
                    s = tcp(h1)
                    s.sendall(b"GET / HTTP/1.1\r\nx-slow: ")
                    held.append(s)
                flood = tcp(h1)  # pipelined requests whose answers are never read
                flood.setblocking(False)
                held.append(flood)
                request = b"GET / HTTP/1.1\r\nhost: a\r\n\r\n" * 10_000
                for _ in range(100):
                    with contextlib.suppress(BlockingIOError):
                        flood.send(request)
                # A 50 MB body, streamed and dropped. 30 s per send, not 10: with the flood
                # above and parallel test workers on 2 cores, one 1 MB send once took longer.
                with tcp(h1, timeout=30.0) as s:
                    s.sendall(b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 50000000\r\n\r\n")
                    chunk = b"x" * 1_000_000
                    for _ in range(50):
                        s.sendall(chunk)
                    s.recv(100)
            finally:
                for s in held:
                    s.close()

        attack(h, run, lambda: http_get(h1, "/"))
