"""The load generator, run as `python -m meshbench.loadgen MODE ...` inside the client
pod's netns (the harness enters it); prints one JSON object on stdout.

`http`: open loop at a fixed --rate over --conns keep-alive HTTP/1.1 connections. Request i
is due at start + i / rate and is sent at (or after) that time, round robin over the
connections (pipelined when a connection still waits for an earlier answer). One thread
does it all with epoll, and each answer is timed by the kernel's receive timestamp.
Latency is measured from the DUE time, so a stall delays every request behind it and
shows in the percentiles (no coordinated omission). Bounded by --seconds plus a grace
period; unanswered requests are counted, not hidden. Reports its own CPU time over the
step (client_cpu_cores: near one core, the generator itself was the limit).
`bulk`: one connection, benchmarks/apps/l4_client.py's throughput (same sink protocol).
`connect`: --workers threads, spread over --procs forked processes, each connect, send one
small request with `Connection: close`, read the whole answer and close, as fast as they
can for --seconds (and, with --count, at most that many attempts in all); plain socket
calls, so the generator's own cost per connection stays small. Reports the rate, each
answered connection's time (connect to the answer's last byte) and its own CPU.
`idle`: open --count connections (each answers one request first, so the path is set up
end to end), print `{"opened": n, ...}`, hold them until a line arrives on stdin, close.
`handshake`: --workers processes each, as fast as they can for --seconds (and at most
--count attempts in all): a new TCP connection to the destination side's mTLS listener
(SO_MARK --mark, so an enrolled pod's capture lets it through), a full TLS 1.3 handshake
with the client certificate (no session is ever resumed), a check of the server's SPIFFE
identity, then `--protocol hbone`: an HTTP/2 CONNECT for the app's port, answered 200 (the
server answers once it has connected to the app), or `http`: one HTTP/1.1 request to the
app; then close. Reports the rate and the workers' own CPU time, so a reader can tell
whether the client or the server was the limit.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import importlib.util
import json
import multiprocessing
import os
import resource
import select
import socket
import ssl
import struct
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import hpack
import uvloop

from meshcore.hbone.h2frames import (
    FRAME_HEADER_LEN,
    PREFACE,
    ErrorCode,
    Flag,
    FrameType,
    frame_header,
    goaway,
    parse_header,
    rst_stream,
    settings_ack,
    settings_frame,
)
from meshcore.tls import hbone_peer, peer_identity, send_chain_as_loaded

from .hist import Histogram
from .http1 import content_length

GRACE = 10.0  # seconds an answer may still arrive after the last request is due
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux
L4_CLIENT = Path(__file__).resolve().parents[1] / "apps" / "l4_client.py"


def request_bytes(size: int, close: bool = False) -> bytes:
    lines = [
        "POST /echo HTTP/1.1",
        "Host: server",
        f"Content-Length: {size}",
        "Content-Type: application/octet-stream",
    ]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + b"a" * size


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def _connect(host: str, port: int, timeout: float) -> socket.socket:
    s = socket.create_connection((host, port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def read_response(f: Any) -> int:
    """Read one HTTP/1.1 response from a buffered binary file; returns the body length."""
    status = f.readline()
    if not status:
        raise ConnectionError("server closed the connection")
    if not status.startswith(b"HTTP/1.1 200"):
        raise ConnectionError(f"unexpected status line {status[:80]!r}")
    length = 0
    while True:
        line = f.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    body = f.read(length)
    if len(body) != length:
        raise ConnectionError("server closed in the middle of a body")
    return length


# --- http: open loop ------------------------------------------------------------------


class HttpConn:
    """One keep-alive connection of the open-loop run: due times of the requests in flight
    and an incremental response parser. Answers are timed by the kernel's receive
    timestamp (SO_TIMESTAMPNS), so the moment this single-threaded client gets round to
    reading a socket does not add to the latency it reports."""

    __slots__ = ("buf", "hist", "need", "pending", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pending: deque[int] = deque()  # due times (CLOCK_REALTIME ns), oldest first
        self.buf = bytearray()
        self.need = -1  # body bytes still missing, or -1 while reading a head
        self.hist = Histogram()

    def feed(self, data: bytes, stamp_ns: int) -> int:
        """Consume received bytes; returns how many responses they completed."""
        self.buf += data
        done = 0
        while True:
            if self.need < 0:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    return done
                head = bytes(self.buf[:end])
                del self.buf[: end + 4]
                if not head.startswith(b"HTTP/1.1 200"):
                    raise ConnectionError(f"unexpected response {head[:80]!r}")
                self.need = content_length(head)
            if len(self.buf) < self.need:
                return done
            del self.buf[: self.need]
            self.need = -1
            if not self.pending:
                raise ConnectionError("an answer to no request")
            self.hist.record(max(0, stamp_ns - self.pending.popleft()))
            done += 1


def _stamp(ancdata: list[tuple[int, int, bytes]]) -> int:
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= 16:
            sec, nsec = struct.unpack("qq", data[:16])
            return int(sec * 1_000_000_000 + nsec)
    return time.time_ns()  # no timestamp (should not happen): the time we read it


def http(
    host: str, port: int, rate: float, seconds: float, conns: int, size: int
) -> dict[str, Any]:
    count = max(1, int(rate * seconds))
    interval_ns = int(1e9 / rate)
    req = request_bytes(size)
    socks = [_connect(host, port, seconds + GRACE) for _ in range(conns)]
    for s in socks:  # warm-up: connection setup is not steady-state latency
        s.sendall(req)
        with s.makefile("rb") as f:
            read_response(f)
        s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    conn = [HttpConn(s) for s in socks]
    by_fd = {s.fileno(): c for s, c in zip(socks, conn, strict=True)}
    poller = select.epoll()
    for s in socks:
        poller.register(s.fileno(), select.EPOLLIN)
    answered = 0
    errors: list[str] = []
    cmsg = socket.CMSG_SPACE(16)

    def drain(timeout: float) -> None:
        nonlocal answered
        for fd, _ in poller.poll(timeout):
            c = by_fd[fd]
            data, anc, _, _ = c.sock.recvmsg(262144, cmsg)
            if not data:
                raise ConnectionError("server closed a connection")
            answered += c.feed(data, _stamp(anc))

    start = time.time_ns() + 10_000_000
    # This process's own CPU (utime + stime) over the rate step: one thread does all the
    # sending and reading, so near one core busy means the figures are the generator's.
    cpu0 = time.process_time()
    try:
        for i in range(count):
            due = start + i * interval_ns
            # Wait for the due time, reading answers meanwhile; the last stretch is slept
            # precisely (epoll waits in whole milliseconds).
            while (wait := due - time.time_ns()) > 0:
                if wait > 1_500_000:
                    drain((wait - 1_000_000) / 1e9)
                else:
                    time.sleep(wait / 1e9)
            c = conn[i % conns]
            c.pending.append(due)
            c.sock.sendall(req)
            drain(0)
        end_by = time.monotonic() + GRACE
        while answered < count and time.monotonic() < end_by:
            drain(0.1)
    except (OSError, ValueError) as e:
        errors.append(str(e))
    wall = (time.time_ns() - start) / 1e9
    cpu = time.process_time() - cpu0
    poller.close()
    for s in socks:
        s.close()
    h = Histogram()
    for c in conn:
        h.merge(c.hist)
    return {
        "requests": count,
        "answered": answered,
        "unanswered": count - answered,
        "errors": errors[:5],
        "rate": rate,
        "achieved_rps": answered / wall if wall > 0 else 0.0,
        "client_cpu_s": cpu,
        "client_cpu_cores": cpu / wall if wall > 0 else 0.0,
        "client_cpus": sorted(os.sched_getaffinity(0)),  # where it may run (pinning)
        "latency_ms": h.summary(),
        "hist_ns": h.to_json(),
    }


# --- bulk, connect, idle ------------------------------------------------------------------


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def bulk(host: str, port: int, nbytes: int, seconds: float) -> dict[str, Any]:
    result: dict[str, Any] = _load(L4_CLIENT, "l4_client").throughput(host, port, nbytes, seconds)
    return result


@dataclass(frozen=True, slots=True)
class ConnectJob:
    """One process's share of the `connect` phase."""

    host: str
    port: int
    deadline: float  # time.monotonic() (system-wide, so the same in a forked child)
    shares: tuple[int | None, ...]  # attempts at most per thread (None: no bound)


def exchange(family: int, addr: Any, req: bytes, timeout: float) -> None:
    """One new connection: connect, the request, its whole answer, close. Plain socket
    calls, no buffered file over them: the generator's own cost per connection is part of
    what the machine's two cores have to give, so it is kept small."""
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.connect(addr)
        s.sendall(req)
        buf = b""
        while (end := buf.find(b"\r\n\r\n")) < 0:
            data = s.recv(65536)
            if not data:
                raise ConnectionError("server closed the connection")
            buf += data
        if not buf.startswith(b"HTTP/1.1 200"):
            raise ConnectionError(f"unexpected status line {buf[:40]!r}")
        length = content_length(buf[: end + 2])
        need = end + 4 + length
        while len(buf) < need:
            data = s.recv(65536)
            if not data:
                raise ConnectionError("server closed in the middle of a body")
            buf += data
    finally:
        s.close()


def _connect_process(job: ConnectJob) -> dict[str, Any]:
    """Threads, one per share, each making new connections until the deadline or its share."""
    req = request_bytes(16, close=True)
    family, _, _, _, addr = socket.getaddrinfo(
        job.host, job.port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST
    )[0]
    workers = len(job.shares)
    ok = [0] * workers
    failed = [0] * workers
    # Why attempts failed, counted by kind (a row of zeros says why it is zero).
    errors: list[Counter[str]] = [Counter() for _ in range(workers)]
    # Each answered connection's time, connect() to the answer's last byte, in ns.
    times: list[Histogram] = [Histogram() for _ in range(workers)]

    def work(k: int) -> None:
        share, hist, clock = job.shares[k], times[k], time.perf_counter_ns
        while time.monotonic() < job.deadline and (share is None or ok[k] + failed[k] < share):
            t0 = clock()
            try:
                exchange(family, addr, req, 5.0)
                ok[k] += 1
                hist.record(clock() - t0)
            except (OSError, ValueError) as e:
                failed[k] += 1
                errors[k][error_kind(e)] += 1

    cpu0 = time.process_time()
    threads = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, job.deadline - time.monotonic()) + 15.0)
    merged = Histogram()
    for h in times:
        merged.merge(h)
    return {
        "ok": sum(ok),
        "failed": sum(failed),
        "errors": sum(errors, Counter()),
        "cpu_s": time.process_time() - cpu0,
        "times": merged.to_json(),
    }


def connect(
    host: str, port: int, seconds: float, workers: int, count: int = 0, procs: int = 1
) -> dict[str, Any]:
    """New connections for `seconds` from `workers` threads spread over `procs` processes
    (more than one: forked, so that the threads of one do not queue for one interpreter
    lock); with `count`, also at most that many attempts in all (each thread makes its
    share), so two runs can be compared connection for connection."""
    procs = max(1, min(procs, workers))
    share: list[int | None] = [
        count // workers + (1 if k < count % workers else 0) if count else None
        for k in range(workers)
    ]
    deadline = time.monotonic() + seconds
    jobs = [ConnectJob(host, port, deadline, tuple(share[k::procs])) for k in range(procs)]
    start = time.monotonic()
    if procs == 1:
        got = [_connect_process(jobs[0])]
    else:
        with multiprocessing.get_context("fork").Pool(procs) as pool:
            got = pool.map(_connect_process, jobs)
    wall = time.monotonic() - start
    # The processes' CPU (every thread, user and system): a connect() that has to search far
    # for a free port (many TIME-WAIT sockets toward the same server) is the generator's
    # own cost, and above SATURATED_CORES (one interpreter's worth) its rate is not the
    # proxy's.
    cpu = sum(g["cpu_s"] for g in got)
    ok = sum(g["ok"] for g in got)
    times = Histogram()
    for g in got:
        times.merge(Histogram.from_json(g["times"]))
    return {
        "connections": ok,
        "failed": sum(g["failed"] for g in got),
        "errors": dict(sum((g["errors"] for g in got), Counter()).most_common(5)),
        "seconds": wall,
        "per_second": ok / wall if wall > 0 else 0.0,
        "workers": workers,
        "procs": procs,
        "client_cpu_s": cpu,
        "client_cpu_cores": cpu / wall if wall > 0 else 0.0,
        "client_cpu_us_per_conn": cpu * 1e6 / ok if ok else None,
        # Time to a whole answer per new connection (ms): with the workers all busy, how
        # long one connection's setup and exchange took through the path under test.
        "conn_ms": times.summary() if ok else None,
    }


def error_kind(e: BaseException) -> str:
    """A failed attempt's kind: the errno's name for an OS error, else the type."""
    if isinstance(e, OSError) and e.errno is not None:
        return errno.errorcode.get(e.errno, str(e.errno))
    return type(e).__name__


async def _idle(host: str, port: int, count: int, parallel: int) -> dict[str, Any]:
    req = request_bytes(16)
    held: list[asyncio.StreamWriter] = []
    failed = 0
    gate = asyncio.Semaphore(parallel)

    async def one() -> None:
        nonlocal failed
        async with gate:
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
                writer.write(req)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                await asyncio.wait_for(reader.readexactly(length), 10)
                held.append(writer)
            except (TimeoutError, OSError, ValueError, IndexError, EOFError):
                failed += 1

    await asyncio.gather(*(one() for _ in range(count)))
    print(json.dumps({"opened": len(held), "failed": failed}), flush=True)
    # Hold until the harness has measured (a line or EOF on stdin).
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    for w in held:
        w.close()
    return {"opened": len(held), "failed": failed}


# --- handshake: new mTLS connections -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HandshakeJob:
    host: str
    port: int
    protocol: str  # "hbone" | "http"
    app_port: int
    server_identity: str
    cert: str
    key: str
    roots: str
    mark: int
    seconds: float
    count: int  # this worker's most attempts


def handshake_context(job: HandshakeJob) -> ssl.SSLContext:
    """The client side as the tunnel's (meshcore.tls): TLS 1.3 only, the mesh roots only,
    a client certificate, ALPN h2 for HBONE; no hostname (the identity is checked after)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.options |= ssl.OP_NO_TICKET
    if job.protocol == "hbone":
        ctx.set_alpn_protocols(["h2"])
    ctx.load_verify_locations(cafile=job.roots)
    send_chain_as_loaded(ctx)  # as the tunnel's: no chain built from the trust store
    ctx.load_cert_chain(job.cert, job.key)
    return ctx


# The CONNECT is framed here, not by an HTTP/2 library: the generator shares the machine's
# two cores with the server it measures, and the `h2` library's connection object (its
# state machines, settings and flow control, event objects) cost this process 130 us per
# attempt (3.5 us framed here; about a tenth of its CPU per handshake), where the HTTP/1.1
# attempt a sidecar's handshake is measured with costs nearly nothing beyond TLS. What goes on the
# wire is what any client sends: the preface, an empty SETTINGS, one HEADERS (HPACK
# literals without indexing, RFC 7541 6.2.2), then, once answered, our SETTINGS ACK,
# RST_STREAM CANCEL and GOAWAY NO_ERROR. tests/benchmarks/test_meshbench_handshake.py
# checks it against the `h2` library as the server.
_STATIC_AUTHORITY, _STATIC_METHOD = 1, 2  # HPACK static table indexes of the two names
_STATUS_200 = b"\x88"  # `:status 200`, static table index 8, as a server sends it indexed
_CLOSING = settings_ack() + rst_stream(1, ErrorCode.CANCEL) + goaway(1, ErrorCode.NO_ERROR)


def _hpack_literal(index: int, value: str) -> bytes:
    raw = value.encode("ascii")
    if len(raw) >= 127:
        raise ValueError(f"header value too long for this encoder: {value!r}")
    return bytes((index, len(raw))) + raw


def connect_opening(authority: str) -> bytes:
    """The preface, an empty SETTINGS and the CONNECT's HEADERS on stream 1."""
    block = _hpack_literal(_STATIC_METHOD, "CONNECT") + _hpack_literal(_STATIC_AUTHORITY, authority)
    return (
        PREFACE
        + settings_frame({})
        + frame_header(len(block), FrameType.HEADERS, Flag.END_HEADERS, 1)
        + block
    )


def _response_status(payload: bytes, flags: int) -> str:
    """The `:status` of a HEADERS frame's payload (padding and priority taken off)."""
    if not flags & Flag.END_HEADERS:
        raise ConnectionError("the answer's headers continue in CONTINUATION frames")
    start, end = 0, len(payload)
    if flags & Flag.PADDED:
        start, end = 1, end - payload[0]
    if flags & Flag.PRIORITY:
        start += 5
    block = payload[start:end]
    if block == _STATUS_200:
        return "200"
    headers = dict(hpack.Decoder().decode(block, raw=True))
    return headers.get(b":status", b"none").decode("ascii", "replace")


def _hbone_connect(tls: ssl.SSLSocket, authority: str) -> None:
    """CONNECT `authority` on stream 1 and wait for its response; it must be 200."""
    tls.sendall(connect_opening(authority))
    buf = b""
    while True:
        data = tls.recv(65536)
        if not data:
            raise ConnectionError("server closed before answering the CONNECT")
        buf += data
        while len(buf) >= FRAME_HEADER_LEN:
            length, ftype, flags, sid = parse_header(buf, 0)
            if len(buf) < FRAME_HEADER_LEN + length:
                break
            payload = buf[FRAME_HEADER_LEN : FRAME_HEADER_LEN + length]
            buf = buf[FRAME_HEADER_LEN + length :]
            if ftype == FrameType.HEADERS and sid == 1:
                status = _response_status(payload, flags)
                if status != "200":
                    raise ConnectionError(f"CONNECT answered {status!r}")
                # Leave as the tunnel does with a stream it no longer needs.
                tls.sendall(_CLOSING)
                return
            if (ftype == FrameType.RST_STREAM and sid == 1) or ftype == FrameType.GOAWAY:
                raise ConnectionError(f"CONNECT failed: frame type {ftype} on stream {sid}")


def handshake_once(ctx: ssl.SSLContext, job: HandshakeJob) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if job.mark:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, job.mark)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(5.0)
        sock.connect((job.host, job.port))
        with ctx.wrap_socket(sock, server_hostname=None) as tls:  # the handshake, in full
            peer = hbone_peer(tls) if job.protocol == "hbone" else peer_identity(tls)
            if str(peer) != job.server_identity:
                raise ConnectionError(f"server is {peer}, expected {job.server_identity}")
            if job.protocol == "hbone":
                _hbone_connect(tls, f"{job.host}:{job.app_port}")
            else:
                tls.sendall(request_bytes(16, close=True))
                with tls.makefile("rb") as f:
                    read_response(f)
    finally:
        sock.close()


def handshake_worker(job: HandshakeJob) -> dict[str, Any]:
    """One worker process: attempts until its time or count is up; its own CPU time."""
    ctx = handshake_context(job)
    ok = failed = 0
    errors: list[str] = []
    cpu0 = time.process_time()
    deadline = time.monotonic() + job.seconds
    while ok + failed < job.count and time.monotonic() < deadline:
        try:
            handshake_once(ctx, job)
            ok += 1
        except (OSError, ValueError, hpack.HPACKError) as e:
            failed += 1
            if len(errors) < 3:
                errors.append(f"{type(e).__name__}: {e}")
    return {"ok": ok, "failed": failed, "errors": errors, "cpu_s": time.process_time() - cpu0}


def handshakes(job: HandshakeJob, workers: int) -> dict[str, Any]:
    per = max(1, job.count // workers)
    jobs = [replace(job, count=per) for _ in range(workers)]
    # Processes, not threads: each handshake is CPU work under the GIL otherwise.
    start = time.monotonic()
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        got = pool.map(handshake_worker, jobs)
    wall = time.monotonic() - start
    ok = sum(g["ok"] for g in got)
    cpu = sum(g["cpu_s"] for g in got)
    return {
        "handshakes": ok,
        "failed": sum(g["failed"] for g in got),
        "errors": [e for g in got for e in g["errors"]][:5],
        "seconds": wall,
        "handshakes_per_second": ok / wall if wall > 0 else 0.0,
        "workers": workers,
        "client_cpu_s": cpu,
        "client_cpu_cores": cpu / wall if wall > 0 else 0.0,
        "client_cpus": sorted(os.sched_getaffinity(0)),  # where it may run (pinning)
        "client_cpu_ms_per_handshake": cpu * 1000.0 / ok if ok else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    for mode in ("http", "bulk", "connect", "idle", "handshake"):
        p = sub.add_parser(mode)
        p.add_argument("--host", required=True)
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--seconds", type=float, default=5.0)
        if mode == "http":
            p.add_argument("--rate", type=float, default=1000.0)
            p.add_argument("--conns", type=int, default=8)
            p.add_argument("--size", type=int, default=1024)
        if mode == "bulk":
            p.add_argument("--bytes", type=int, default=1 << 30)
        if mode in ("connect", "handshake"):
            p.add_argument("--workers", type=int, default=4)
        if mode == "handshake":
            p.add_argument("--protocol", choices=("hbone", "http"), default="hbone")
            p.add_argument("--app-port", type=int, required=True)
            p.add_argument("--server-identity", required=True)
            p.add_argument("--cert", required=True)
            p.add_argument("--key", required=True)
            p.add_argument("--roots", required=True)
            p.add_argument("--mark", type=lambda s: int(s, 0), default=0)
            p.add_argument("--count", type=int, default=1_000_000)
        if mode == "connect":
            p.add_argument("--count", type=int, default=0, help="attempts at most (0: no bound)")
            p.add_argument("--procs", type=int, default=1, help="processes sharing the workers")
        if mode == "idle":
            p.add_argument("--count", type=int, default=10000)
            p.add_argument("--parallel", type=int, default=256)
    a = ap.parse_args()
    raise_nofile()
    if a.mode == "http":
        out = http(a.host, a.port, a.rate, a.seconds, a.conns, a.size)
    elif a.mode == "bulk":
        out = bulk(a.host, a.port, a.bytes, a.seconds)
    elif a.mode == "connect":
        out = connect(a.host, a.port, a.seconds, a.workers, a.count, a.procs)
    elif a.mode == "handshake":
        job = HandshakeJob(
            a.host, a.port, a.protocol, a.app_port, a.server_identity,
            a.cert, a.key, a.roots, a.mark, a.seconds, a.count,
        )  # fmt: skip
        out = handshakes(job, a.workers)
    else:
        uvloop.run(_idle(a.host, a.port, a.count, a.parallel))
        return
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
