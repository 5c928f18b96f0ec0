"""What a new connection costs the tunnels, on loopback in one process (no root).

Two nodes' tunnels (`NodeProxy`, real `PodProxy`s with the plain socket factory: real TCP,
TLS 1.3 with certificates from the project's CA, HTTP/2 CONNECT, policy, metrics, the access
log as `python -m ztunnel` writes it, to /dev/null) on 127.x addresses: pod A (the client)
and pod L on node1, pod B on node2. A client in the same process makes --connections new
connections, --workers at a time, each one small request with `Connection: close`, the
answer, close: A -> B crosses "nodes" over HBONE (cross-node), A -> L is joined in process
(same-node). The same client straight to the app is the reference; the process's CPU time
per connection less the reference's is what the tunnels cost (both of them, with the
app and client costs taken out). --profile adds a cProfile (CPU-time clock) of the
measured runs: steps and areas as in newconn_profile.py.

What the loopback leaves out (capture, transparent sockets, netns switches) is measured by
newconn_profile.py in a real cluster. All parts share one loop and one core here, so
compare runs of this script with each other, never with the cluster's figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import errno
import io
import os
import pstats
import random
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

HERE = Path(__file__).resolve().parent
# NEWCONN_TREE: another checkout whose tunnels to measure (before/after comparisons).
ROOT = Path(os.environ.get("NEWCONN_TREE", HERE.parent))
sys.path[:0] = [str(HERE), str(ROOT)]

from newconn_profile import print_profile  # noqa: E402

from meshcore.identity.certs import CertificateManager  # noqa: E402
from meshcore.observability import logging as meshlog  # noqa: E402
from meshcore.sockets import PlainSocketFactory, SocketAddr  # noqa: E402
from meshcore.state import MeshState, Workload  # noqa: E402
from tests.support.certs import InProcessCA  # noqa: E402
from tests.support.mesh import addr, ips, mesh_state, workload  # noqa: E402
from ztunnel.inpod import Enrolment, PodProxy  # noqa: E402
from ztunnel.node import NodeProxy  # noqa: E402

REQUEST = b"GET / HTTP/1.1\r\nHost: server\r\nConnection: close\r\n\r\n"
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 16\r\nConnection: close\r\n\r\n" + b"x" * 16


class Redirects:
    """The capture's part: each client connection's original destination, recorded by its
    source address before it connects (the tunnels' `orig_dst`)."""

    def __init__(self) -> None:
        self.by_client: dict[SocketAddr, SocketAddr] = {}

    def original_dst(self, sock: socket.socket) -> SocketAddr:
        try:
            return self.by_client.pop(SocketAddr.of(sock.getpeername()))
        except KeyError:
            raise OSError(errno.ENOENT, "no redirect recorded for this client") from None


async def serve_app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The app: one request head, the answer, close."""
    try:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(ANSWER)
        await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()


async def one(src_ip: str, to: SocketAddr, redirect: tuple[Redirects, SocketAddr] | None) -> None:
    """One client connection: bound to `src_ip`, to `to` (recorded as redirected to the
    client pod's 15001 when `redirect` is given), one request, the whole answer, close."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    try:
        sock.setblocking(False)
        sock.bind((src_ip, 0))
        target = to
        if redirect is not None:
            redirects, listener = redirect
            redirects.by_client[SocketAddr.of(sock.getsockname())] = to
            target = listener
        async with asyncio.timeout(10.0):
            await loop.sock_connect(sock, target.pair)
            await loop.sock_sendall(sock, REQUEST)
            got = b""
            while chunk := await loop.sock_recv(sock, 65536):
                got += chunk
        if not got.endswith(b"x" * 16):
            raise ConnectionError(f"short answer: {got[:80]!r}")
    finally:
        sock.close()


async def open_held(
    src_ip: str, to: SocketAddr, redirects: Redirects, listener: SocketAddr
) -> socket.socket:
    """A connection that stays open: redirected through the client pod's 15001 like `one`,
    nothing sent, so the app waits for its request and every hop keeps its state. The
    caller closes it."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    try:
        sock.setblocking(False)
        sock.bind((src_ip, 0))
        redirects.by_client[SocketAddr.of(sock.getsockname())] = to
        async with asyncio.timeout(10.0):
            await loop.sock_connect(sock, listener.pair)
    except BaseException:
        sock.close()
        raise
    return sock


async def run_clients(count: int, workers: int, make: Callable[[], Awaitable[None]]) -> int:
    failed = 0
    left = count

    async def worker() -> None:
        nonlocal left, failed
        while left > 0:
            left -= 1
            try:
                await make()
            except (OSError, TimeoutError):
                failed += 1

    await asyncio.gather(*(worker() for _ in range(workers)))
    return failed


def loopback_ips(n: int) -> list[str]:
    rng = random.SystemRandom()
    base = f"127.{rng.randint(1, 254)}.{rng.randint(0, 255)}."
    start = rng.randint(1, 254 - n)
    return [f"{base}{start + i}" for i in range(n)]


def build_state(ip: dict[str, str]) -> MeshState:
    return mesh_state(
        [
            workload(name="client-0", namespace="mesh", service_account="client", ips=ips(ip["a"])),
            workload(
                name="server-0",
                namespace="mesh",
                service_account="server",
                ips=ips(ip["b"]),
                node="node2",
            ),
            workload(name="server-1", namespace="mesh", service_account="server", ips=ips(ip["l"])),
        ],
        [],
        [],
    )


@dataclass
class LoopbackMesh:
    """The running mesh: the client paths to drive and the two nodes (for their books)."""

    paths: dict[str, Callable[[], Awaitable[None]]]
    nodes: list[NodeProxy]
    # A cross-node connection left open (the soak's held ones); the caller closes it.
    hold: Callable[[], Awaitable[socket.socket]]


@contextlib.asynccontextmanager
async def loopback_mesh() -> AsyncIterator[LoopbackMesh]:
    """Two nodes' tunnels, three pods and two apps on fresh 127.x addresses; everything is
    stopped on the way out."""
    a_ip, b_ip, l_ip, direct_ip = loopback_ips(4)
    # backlog: the default 100 drops SYNs once more than 100 connects are in flight.
    apps = [await asyncio.start_server(serve_app, ip, 0, backlog=1024) for ip in (b_ip, l_ip)]
    app_port = apps[0].sockets[0].getsockname()[1]
    l_port = apps[1].sockets[0].getsockname()[1]
    state = build_state({"a": a_ip, "b": b_ip, "l": l_ip})
    certs = CertificateManager(InProcessCA())
    nodes = [NodeProxy(n, certs, "cluster.local") for n in ("node1", "node2")]
    for n in nodes:
        n.on_state(state)
    redirects = Redirects()
    pods: list[PodProxy] = []

    async def pod(w: Workload, node: NodeProxy) -> None:
        proxy = PodProxy(
            Enrolment(w.uid, "loopback"),
            w,
            lambda: node.state,
            certs,
            "cluster.local",
            node.authorize,
            factory=PlainSocketFactory(),
            connection_table=node.connection_table,
            listen_ip=str(w.ips[0]),
            orig_dst=redirects.original_dst,
            guard=node.guard,
            local=node.local_inbound,
        )
        pods.append(proxy)
        await proxy.start()
        node.pods[w.uid] = proxy  # as the node's own pods: same-node goes in process
        node._by_workload = None  # the node's index of its pods, rebuilt

    try:
        by_name = {w.name: w for w in state.workloads}
        await pod(by_name["client-0"], nodes[0])
        await pod(by_name["server-0"], nodes[1])
        await pod(by_name["server-1"], nodes[0])
        listener = addr(f"{a_ip}:15001")
        to_b, to_l = addr(f"{b_ip}:{app_port}"), addr(f"{l_ip}:{l_port}")  # parsed once
        paths: dict[str, Callable[[], Awaitable[None]]] = {
            "direct": lambda: one(direct_ip, to_b, None),
            "cross-node": lambda: one(a_ip, to_b, (redirects, listener)),
            "same-node": lambda: one(a_ip, to_l, (redirects, listener)),
        }
        yield LoopbackMesh(paths, nodes, lambda: open_held(a_ip, to_b, redirects, listener))
    finally:
        for p in pods:
            await p.stop()
        for s in apps:
            s.close()
        await certs.close()


async def main_async(a: argparse.Namespace, report: TextIO) -> dict[str, Any]:
    async with loopback_mesh() as mesh:
        out = await measure(a, mesh.paths)
    return print_rows(a, out, report)


async def measure(
    a: argparse.Namespace, paths: dict[str, Callable[[], Awaitable[None]]]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    prof = cProfile.Profile(time.process_time) if a.profile else None
    profiled: dict[str, pstats.Stats] = {}
    for make in paths.values():  # warm-up: pools dialled, code paths hot
        await run_clients(100, a.workers, make)
    for rnd in range(a.rounds):
        for name, make in paths.items() if rnd % 2 == 0 else list(paths.items())[::-1]:
            if prof is not None and name != "direct":
                prof.enable()
            cpu0, t0 = time.process_time(), time.perf_counter()
            failed = await run_clients(a.connections, a.workers, make)
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
            if prof is not None and name != "direct":
                prof.disable()
                st = pstats.Stats(prof, stream=io.StringIO())
                if name in profiled:
                    profiled[name].add(st)
                else:
                    profiled[name] = st
                prof = cProfile.Profile(time.process_time)
            out.setdefault(name, []).append(
                {
                    "us_per_conn": cpu * 1e6 / a.connections,
                    "per_second": a.connections / wall,
                    "failed": failed,
                }
            )
    return {"runs": out, "profiles": profiled}


def print_rows(a: argparse.Namespace, measured: dict[str, Any], report: TextIO) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for name, runs in measured["runs"].items():
        us = sorted(r["us_per_conn"] for r in runs)
        rows[name] = {"median_us_per_conn": us[len(us) // 2], "runs": runs}
    direct = rows["direct"]["median_us_per_conn"]
    print(
        f"{'path':<12}{'process us/conn':>17}{'tunnels us/conn':>17}{'conn/s':>9}{'failed':>8}",
        file=report,
    )
    for name, r in rows.items():
        med = r["median_us_per_conn"]
        rate = sorted(x["per_second"] for x in r["runs"])[len(r["runs"]) // 2]
        fails = sum(x["failed"] for x in r["runs"])
        tunnels = "-" if name == "direct" else f"{med - direct:.0f}"
        print(f"{name:<12}{med:>17.0f}{tunnels:>17}{rate:>9.0f}{fails:>8}", file=report)
    n = a.connections * a.rounds
    for name, st in measured["profiles"].items():
        stats = st.stats
        print(f"\n=== profile, {name} (all parts of the process)", file=report)
        print_profile(name, stats, n, a.top, report)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--connections", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument(
        "--log-level", default="info", help="warning: no access-log lines (what they cost)"
    )
    a = ap.parse_args()
    if not 1 <= a.connections <= 100_000 or not 1 <= a.rounds <= 20 or not 1 <= a.workers <= 64:
        ap.error("--connections 1..100000, --rounds 1..20, --workers 1..64")
    import uvloop

    meshlog.configure(a.log_level)
    report = sys.stdout
    # The access log goes where a tunnel's goes (stdout), here /dev/null: its cost counts.
    with (
        open(os.devnull, "w") as null,
        contextlib.redirect_stdout(null),
        asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner,
    ):
        runner.run(main_async(a, report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
