"""What the hostile-peer tests share: an attacker's HBONE connection read frame by frame,
the well-behaved client that runs beside each attack, and the attacked tunnel's figures
(resident memory, CPU time, refusal counters and log lines).

Nothing here asserts on time. Every loop is bounded in count and in time.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hpack
from prometheus_client.parser import text_string_to_metric_families

import nsutil
from localcluster import mesh
from meshcore.defaults import METRICS_PORT
from meshcore.hbone.h2frames import FrameType, frame_header
from tests.support.h2 import Frames, Goaway, connect_request

REFUSED = "hbone_connections_refused_total"
REFUSED_EVENT = "hbone peer refused"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def settings_entries(key: int, value: int, n: int) -> bytes:
    """One SETTINGS frame of `n` entries, all the same (a dict cannot repeat a key)."""
    return frame_header(6 * n, FrameType.SETTINGS, 0, 0) + struct.pack(">HL", key, value) * n


class Peer:
    """One attacker connection (TLS over a socket of some pod), with what came back."""

    def __init__(self, sock: ssl.SSLSocket | socket.socket, timeout: float = 10.0) -> None:
        self.sock = sock
        self.timeout = timeout
        self.frames = Frames()
        self.eof = False
        self.sent = 0
        self.encoder = hpack.Encoder()

    def connect_block(self, authority: str) -> bytes:
        """A CONNECT request's header block, in this connection's HPACK state."""
        block: bytes = self.encoder.encode(connect_request(authority))
        return block

    def send(self, data: bytes) -> bool:
        """Whether all of `data` went out (False once the server stopped taking it)."""
        try:
            self.sock.sendall(data)
        except (OSError, ssl.SSLError):
            return False
        self.sent += len(data)
        return True

    def flood(self, data: bytes, chunk: int = 16384, limit: float = 30.0) -> int:
        """Send `data` in chunks, reading whatever the server said in between; stop at its
        GOAWAY, its close, or after `limit` seconds. Returns the bytes sent."""
        deadline = time.monotonic() + limit
        sent = 0
        while sent < len(data) and time.monotonic() < deadline:
            if not self.send(data[sent : sent + chunk]):
                break
            sent += min(chunk, len(data) - sent)
            self.poll()
            if self.frames.goaway is not None or self.eof:
                break
        return sent

    def poll(self) -> None:
        """Read what has arrived, without waiting."""
        self.sock.settimeout(0.0)
        try:
            while not self.eof:
                data = self.sock.recv(65536)
                if not data:
                    self.eof = True
                else:
                    self.frames.feed(data)
        except (ssl.SSLWantReadError, BlockingIOError):
            pass
        except (OSError, ssl.SSLError):
            self.eof = True
        finally:
            self.sock.settimeout(self.timeout)

    def read_until(self, done: Callable[[], bool], limit: float = 10.0) -> bool:
        """Read until `done()`, the end of the connection, or `limit` seconds."""
        deadline = time.monotonic() + limit
        while not done() and not self.eof:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                return done()
            except (OSError, ssl.SSLError):
                self.eof = True
                break
            if not data:
                self.eof = True
            else:
                self.frames.feed(data)
        return done()

    def await_answers(self, n: int, limit: float = 10.0) -> bool:
        """Read until `n` streams have their response."""
        return self.read_until(lambda: len(self.frames.status) >= n, limit)

    def finish(self, limit: float = 15.0) -> Goaway | None:
        """Read to the end of the connection; the GOAWAY it ended with, if any."""
        self.read_until(lambda: False, limit)
        return self.frames.goaway


class PodSockets:
    """Sockets inside one pod's netns, all closed by `close()` (a fixture's finalizer)."""

    def __init__(self, cluster: mesh.Cluster, namespace: str, pod: str) -> None:
        self.fd = nsutil.open_netns(cluster.pod_netns(namespace, pod))
        self.socks: list[socket.socket] = []

    def tcp(
        self, ip: str, port: int, rcvbuf: int | None = None, timeout: float = 10.0
    ) -> socket.socket:
        s = nsutil.socket_in(self.fd)
        self.socks.append(s)
        if rcvbuf is not None:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.settimeout(timeout)
        s.connect((ip, port))
        return s

    def tls(
        self, ctx: ssl.SSLContext, ip: str, port: int = 15008, rcvbuf: int | None = None
    ) -> Peer:
        raw = self.tcp(ip, port, rcvbuf)
        sock = ctx.wrap_socket(raw, server_hostname=None)
        self.socks.append(sock)
        return Peer(sock)

    def close(self) -> None:
        for s in self.socks:
            s.close()
        self.socks.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# ---- the well-behaved client ------------------------------------------------------------


@dataclass(frozen=True)
class Attempt:
    at: float
    seconds: float | None  # connect to the app's greeting, through both tunnels
    error: str | None


class SteadyClient:
    """An enrolled pod's app making a new connection every 50 ms to an echo app through
    the attacked tunnel: each one connects, reads the greeting, sends 4 bytes and reads
    the echo. Bounded: 2 400 attempts or 120 s, whichever comes first."""

    INTERVAL = 0.05
    MAX_ATTEMPTS = 2400
    MAX_SECONDS = 120.0

    def __init__(self, cluster: mesh.Cluster, namespace: str, pod: str, target: tuple[str, int]):
        self.fd = nsutil.open_netns(cluster.pod_netns(namespace, pod))
        self.target = target
        self.attempts: list[Attempt] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="steady-client", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        if self.fd >= 0 and not self._thread.is_alive():
            os.close(self.fd)
            self.fd = -1

    def _run(self) -> None:
        start = next_at = time.monotonic()
        while (
            not self._stop.is_set()
            and len(self.attempts) < self.MAX_ATTEMPTS
            and time.monotonic() - start < self.MAX_SECONDS
        ):
            self.attempts.append(self._once())
            next_at += self.INTERVAL
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def _once(self) -> Attempt:
        at = time.monotonic()
        try:
            with nsutil.socket_in(self.fd) as s:
                s.settimeout(10)
                s.connect(self.target)
                f = s.makefile("rb")
                if not f.readline():
                    return Attempt(at, None, "closed before the greeting")
                took = time.monotonic() - at
                s.sendall(b"ping")
                s.shutdown(socket.SHUT_WR)
                echoed = f.read()
                if echoed != b"ping":
                    return Attempt(at, None, f"echo was {echoed[:20]!r}")
                return Attempt(at, took, None)
        except OSError as e:
            return Attempt(at, None, f"{type(e).__name__}: {e}")

    def wait_for(self, n: int, limit: float = 20.0) -> None:
        """Until `n` attempts are done (the baseline before an attack)."""
        deadline = time.monotonic() + limit
        while len(self.attempts) < n and time.monotonic() < deadline:
            time.sleep(self.INTERVAL)

    def wait_since(self, since: float, n: int, limit: float = 20.0) -> None:
        """Until `n` attempts began at or after `since` (a sample of the attack's aftermath,
        however short the attack was)."""
        deadline = time.monotonic() + limit
        while len(self.between(since)) < n and time.monotonic() < deadline:
            time.sleep(self.INTERVAL)

    def between(self, since: float, until: float = float("inf")) -> list[Attempt]:
        return [a for a in list(self.attempts) if since <= a.at < until]


def summary(attempts: list[Attempt]) -> str:
    ok = sorted(a.seconds for a in attempts if a.seconds is not None)
    failed = len(attempts) - len(ok)
    if not ok:
        return f"{len(attempts)} connections, {failed} failed"
    p99 = ok[min(len(ok) - 1, int(len(ok) * 0.99))]
    return (
        f"{len(attempts)} connections, {failed} failed, "
        f"p99 {p99 * 1000:.1f} ms, max {ok[-1] * 1000:.1f} ms"
    )


def failures(attempts: list[Attempt]) -> list[str]:
    return [a.error for a in attempts if a.error is not None]


# ---- the attacked tunnel ----------------------------------------------------------------


class Tunnel:
    """One node's tunnel process, seen from outside: /proc, its metrics, its log."""

    def __init__(self, cluster: mesh.Cluster, node: str) -> None:
        rec = mesh.process_record(cluster, mesh.tunnel_name(node))
        assert rec is not None, f"{node}'s tunnel is not running"
        self.cluster = cluster
        self.node = node
        self.pid = rec.pid
        self.log_path = cluster.tunnel_log(node)

    def _status(self, field: str) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB -> MB
        raise AssertionError(f"no {field} in /proc/{self.pid}/status")

    def rss_mb(self) -> float:
        return self._status("VmRSS")

    def peak_mb(self) -> float:
        """The largest resident size since `reset_peak`."""
        return self._status("VmHWM")

    def reset_peak(self) -> None:
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")

    def cpu_seconds(self) -> float:
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime

    def settled_rss(self, bound_mb: float, limit: float = 15.0) -> float:
        """The resident size once it came back under `bound_mb` (the tunnel hands memory
        back after a quiet second), or where it stood after `limit` seconds."""
        deadline = time.monotonic() + limit
        rss = self.rss_mb()
        while rss > bound_mb and time.monotonic() < deadline:
            time.sleep(0.2)
            rss = self.rss_mb()
        return rss

    def refused(self, reason: str, direction: str = "inbound") -> float:
        return self.refusals(direction).get(reason, 0.0)

    def refusals(self, direction: str = "inbound") -> dict[str, float]:
        status, body = mesh.node_http(self.cluster.layout, self.node, METRICS_PORT, "/metrics")
        assert status == 200
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                if sample.name == REFUSED and sample.labels.get("direction") == direction:
                    out[sample.labels["reason"]] = sample.value
        return out

    def wait_refused(
        self, reason: str, at_least: float, direction: str = "inbound", limit: float = 20.0
    ) -> float:
        deadline = time.monotonic() + limit
        n = self.refused(reason, direction)
        while n < at_least and time.monotonic() < deadline:
            time.sleep(0.1)
            n = self.refused(reason, direction)
        return n

    def log_offset(self) -> int:
        return self.log_path.stat().st_size

    def log_lines(self, since: int, event: str = REFUSED_EVENT, **fields: str) -> list[Any]:
        with self.log_path.open("rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
        out = []
        for line in text.splitlines():
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if (
                isinstance(doc, dict)
                and doc.get("event") == event
                and all(doc.get(k) == v for k, v in fields.items())
            ):
                out.append(doc)
        return out

    def wait_logged(self, since: int, n: int, limit: float = 10.0, **fields: str) -> list[Any]:
        deadline = time.monotonic() + limit
        lines = self.log_lines(since, **fields)
        while len(lines) < n and time.monotonic() < deadline:
            time.sleep(0.1)
            lines = self.log_lines(since, **fields)
        return lines


@dataclass
class Figures:
    """Before and after figures of one attack, printed for `pytest -s`."""

    case: str
    rss_before: float
    cpu_before: float
    attack_start: float
    rss_peak: float = 0.0
    rss_after: float = 0.0
    cpu: float = 0.0
    attack_end: float = 0.0
    sent: str = ""

    @classmethod
    def start(cls, case: str, tunnel: Tunnel) -> Figures:
        tunnel.reset_peak()
        return cls(case, tunnel.rss_mb(), tunnel.cpu_seconds(), time.monotonic())

    def end(self, tunnel: Tunnel, sent: str) -> None:
        self.attack_end = time.monotonic()
        self.cpu = tunnel.cpu_seconds() - self.cpu_before
        self.rss_peak = tunnel.peak_mb()
        self.sent = sent

    def report(self, steady: SteadyClient, rss_after: float) -> None:
        self.rss_after = rss_after
        before = steady.between(0.0, self.attack_start)
        during = steady.between(self.attack_start)
        print(
            f"\n[{self.case}] attack: {self.sent}"
            f"\n  tunnel RSS {self.rss_before:.1f} MB before, peak {self.rss_peak:.1f} MB, "
            f"{self.rss_after:.1f} MB after; tunnel CPU {self.cpu:.2f} s over "
            f"{self.attack_end - self.attack_start:.1f} s of attack"
            f"\n  well-behaved client before: {summary(before)}"
            f"\n  well-behaved client during and after: {summary(during)}"
        )
