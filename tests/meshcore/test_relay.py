"""HboneSplice over real loopback sockets: plain HTTP/2 between two of our H2Transports
(TLS adds nothing to what is tested here), real TCP apps on either end."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

import uvloop

from meshcore.hbone.conn import CONNECTION_WINDOW, STREAM_WINDOW, Headers
from meshcore.hbone.transport import H2Transport
from meshcore.relay import AppSide, HboneSplice

MB = 1024 * 1024
LOOPBACK = "127.0.0.1"
STALL = [(":method", "CONNECT"), (":authority", "stall")]
DRAIN = [(":method", "CONNECT"), (":authority", "drain")]


def run(main: Callable[[], Awaitable[None]]) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())  # type: ignore[arg-type]


async def _until(cond: Callable[[], bool], what: str, limit: float = 20.0) -> None:
    """Wait for a state; the limit only turns a hang into a failure."""
    deadline = asyncio.get_running_loop().time() + limit
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.01)


class _Client:
    """A client-side stream owner that only needs to exist."""

    def on_response(self, status: int, headers: Headers) -> None:
        self.status = status

    def on_data(self, data: memoryview) -> None: ...

    def on_end(self) -> None: ...

    def on_reset(self, code: int) -> None: ...

    def on_send_ready(self) -> None: ...


async def _server_side(
    apps: dict[str, int], splices: list[HboneSplice]
) -> tuple[asyncio.Server, int]:
    """An HBONE-like server: CONNECT to `:authority` name -> the app on that port."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    async def join(h2: H2Transport, splice: HboneSplice, port: int) -> None:
        # A tiny send buffer toward the app, so a stalled app pushes back quickly.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        sock.setblocking(False)
        await loop.sock_connect(sock, (LOOPBACK, port))
        _, app = await loop.create_connection(AppSide, sock=sock)
        h2.conn.respond(splice.sid, 200, splice, end=False)
        splice.start(app)

    def on_request(h2: H2Transport, sid: int, headers: Headers) -> None:
        splice = HboneSplice(h2)
        splice.sid = sid
        h2.conn.streams[sid].handler = splice
        splices.append(splice)
        port = apps[dict(headers)[":authority"]]
        tasks.add(loop.create_task(join(h2, splice, port)))

    server = await loop.create_server(
        lambda: H2Transport(client=False, on_request=on_request, keepalive=False), LOOPBACK, 0
    )
    return server, server.sockets[0].getsockname()[1]


def test_credit_held_by_dead_streams_returns_to_the_shared_connection_window() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        stalled: list[asyncio.StreamWriter] = []
        drained = [0]

        async def stall(_: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            stalled.append(w)  # never reads: every byte for it is held back

        async def drain(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            while data := await r.read(MB):
                drained[0] += len(data)
            w.close()

        stall_srv = await asyncio.start_server(stall, LOOPBACK, 0)
        for s in stall_srv.sockets:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        drain_srv = await asyncio.start_server(drain, LOOPBACK, 0)
        apps = {
            "stall": stall_srv.sockets[0].getsockname()[1],
            "drain": drain_srv.sockets[0].getsockname()[1],
        }
        splices: list[HboneSplice] = []
        server, port = await _server_side(apps, splices)
        _, client = await loop.create_connection(
            lambda: H2Transport(client=True, keepalive=False), LOOPBACK, port
        )
        await client.ready
        try:
            # Enough stalled streams, each offered more than its window, to use up the
            # whole connection window with bytes the server holds back.
            n = CONNECTION_WINDOW // STREAM_WINDOW + 1
            sids = []
            for _ in range(n):
                sid = client.open_stream(STALL, _Client())
                client.conn.send_data(sid, b"s" * (STREAM_WINDOW + MB))
                client.flush()
                sids.append(sid)
            await _until(
                lambda: (
                    len(splices) == n
                    and all(s.started for s in splices)
                    and client.conn._send_window <= 0
                    and sum(s._owed for s in splices) >= CONNECTION_WINDOW // 2
                ),
                "the server holds back most of the connection window for stalled apps",
            )

            for sid in sids:
                client.conn.reset(sid)
            client.flush()
            await _until(lambda: all(s.finished for s in splices), "stalled streams ended")

            # A fresh stream on the same connection must get its bytes through.
            sid = client.open_stream(DRAIN, _Client())
            client.conn.send_data(sid, b"d" * (2 * MB))
            client.conn.end_stream(sid)
            client.flush()
            await _until(lambda: drained[0] == 2 * MB, "a new stream moves its bytes")
        finally:
            client.close()
            for w in stalled:
                w.close()
            for srv in (server, stall_srv, drain_srv):
                srv.close()

    run(main)


def test_a_slow_app_gets_every_byte_exactly_while_other_streams_reuse_the_read_buffer() -> None:
    """Received DATA reaches apps as views of the one shared receive buffer. An app that
    reads slowly makes its transport queue such views; the buffer must then not be reused,
    or the queued bytes would be overwritten by the next read (any stream's)."""
    import hashlib

    async def main() -> None:
        loop = asyncio.get_running_loop()
        got: dict[str, hashlib._Hash] = {"slow": hashlib.sha256(), "fast": hashlib.sha256()}
        sizes = {"slow": 0, "fast": 0}

        def sink(name: str, delay: float) -> Callable[..., Awaitable[None]]:
            async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
                while data := await r.read(7919):
                    got[name].update(data)
                    sizes[name] += len(data)
                    if delay:
                        await asyncio.sleep(delay)
                w.close()

            return serve

        slow_srv = await asyncio.start_server(sink("slow", 0.002), LOOPBACK, 0)
        for s in slow_srv.sockets:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        fast_srv = await asyncio.start_server(sink("fast", 0.0), LOOPBACK, 0)
        apps = {
            "slow": slow_srv.sockets[0].getsockname()[1],
            "fast": fast_srv.sockets[0].getsockname()[1],
        }
        splices: list[HboneSplice] = []
        server, port = await _server_side(apps, splices)
        _, client = await loop.create_connection(
            lambda: H2Transport(client=True, keepalive=False), LOOPBACK, port
        )
        await client.ready
        want = {name: hashlib.sha256() for name in apps}
        total = 3 * MB
        try:
            sids = {
                name: client.open_stream([(":method", "CONNECT"), (":authority", name)], _Client())
                for name in apps
            }
            sent = 0
            i = 0
            while sent < total:  # distinct bytes per chunk: a reused buffer would show
                for name, sid in sids.items():
                    chunk = bytes([(i * 7 + len(name)) % 251]) * 65521 + i.to_bytes(8, "big")
                    want[name].update(chunk)
                    client.conn.send_data(sid, chunk)
                client.flush()
                sent += 65529
                i += 1
                await asyncio.sleep(0)
            for sid in sids.values():
                client.conn.end_stream(sid)
            client.flush()
            await _until(lambda: min(sizes.values()) >= sent, "both apps got everything", 60)
            for name in apps:
                assert sizes[name] == sent
                assert got[name].hexdigest() == want[name].hexdigest(), name
        finally:
            client.close()
            for srv in (server, slow_srv, fast_srv):
                srv.close()

    run(main)
