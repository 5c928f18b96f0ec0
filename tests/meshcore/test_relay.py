"""HboneSplice over real loopback sockets: plain HTTP/2 between two of our H2Transports
(TLS adds nothing to what is tested here), real TCP apps on either end."""

from __future__ import annotations

import asyncio
import hashlib
import socket
from collections import Counter
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import pytest

from meshcore.hbone.conn import CONNECTION_WINDOW, STREAM_WINDOW, Headers
from meshcore.hbone.h2frames import FRAME_HEADER_LEN, Flag, FrameType, parse_header
from meshcore.hbone.transport import H2Transport
from meshcore.relay import EOF_PEEK_MISSES, AppSide, HboneSplice, RelayResult, TcpPipe
from tests.support.aio import Loop, wait_until
from tests.support.gcprobe import cyclic_garbage
from tests.support.h2 import StreamRec, connect_request

MB = 1024 * 1024
LOOPBACK = "127.0.0.1"

# On the tunnel's own loop: the shared receive buffer is a BufferedProtocol path.
pytestmark = pytest.mark.parametrize("aio", ["uvloop"], indirect=True)


async def app_port(aio: Loop, serve: Callable[..., Awaitable[None]], rcvbuf: int = 0) -> int:
    """A TCP app on loopback (closed when the test ends); its port. A small `rcvbuf`
    makes an app that does not read push back quickly."""
    srv = aio.closing(await asyncio.start_server(serve, LOOPBACK, 0))
    if rcvbuf:
        for s in srv.sockets:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    port: int = srv.sockets[0].getsockname()[1]
    return port


async def hbone_pair(
    aio: Loop,
    apps: dict[str, int],
    server_cls: type[H2Transport] = H2Transport,
    peek: bool = False,
) -> tuple[H2Transport, list[HboneSplice]]:
    """Our HTTP/2 client connected to an HBONE-like server on loopback: a CONNECT to
    `:authority` name goes to the app on that port. Returns the client and the server's
    splices (as they are made); everything is closed when the test ends. `peek`: the
    server's app sides look for the FIN behind a read, as the tunnel's do."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()
    splices: list[HboneSplice] = []

    async def join(h2: H2Transport, splice: HboneSplice, port: int) -> None:
        # A tiny send buffer toward the app, so a stalled app pushes back quickly.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        sock.setblocking(False)
        await loop.sock_connect(sock, (LOOPBACK, port))
        _, app = await loop.create_connection(AppSide, sock=sock)
        if peek:
            app.peek = sock
        h2.conn.respond(splice.sid, 200, splice, end=False)
        splice.start(app)

    def on_request(h2: H2Transport, sid: int, headers: Headers) -> None:
        splice = HboneSplice(h2)
        splice.sid = sid
        h2.conn.streams[sid].handler = splice
        splices.append(splice)
        port = apps[dict(headers)[":authority"]]
        tasks.add(loop.create_task(join(h2, splice, port)))

    server = aio.closing(
        await loop.create_server(
            lambda: server_cls(client=False, on_request=on_request, keepalive=False), LOOPBACK, 0
        )
    )
    port = server.sockets[0].getsockname()[1]
    _, client = await loop.create_connection(
        lambda: H2Transport(client=True, keepalive=False), LOOPBACK, port
    )
    aio.closing(client)
    await client.ready
    return client, splices


def test_credit_held_by_dead_streams_returns_to_the_shared_connection_window(aio: Loop) -> None:
    async def main() -> None:
        drained = [0]

        async def stall(_: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            aio.defer(w.close)  # never reads: every byte for it is held back

        async def drain(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            while data := await r.read(MB):
                drained[0] += len(data)
            w.close()

        apps = {
            "stall": await app_port(aio, stall, rcvbuf=16384),
            "drain": await app_port(aio, drain),
        }
        client, splices = await hbone_pair(aio, apps)
        # Enough stalled streams, each offered more than its window, to use up the
        # whole connection window with bytes the server holds back.
        n = CONNECTION_WINDOW // STREAM_WINDOW + 1
        sids = []
        for _ in range(n):
            sid = client.open_stream(connect_request("stall"), StreamRec())
            client.conn.send_data(sid, b"s" * (STREAM_WINDOW + MB))
            client.flush()
            sids.append(sid)
        await wait_until(
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
        await wait_until(lambda: all(s.finished for s in splices), "stalled streams ended")

        # A fresh stream on the same connection must get its bytes through.
        sid = client.open_stream(connect_request("drain"), StreamRec())
        client.conn.send_data(sid, b"d" * (2 * MB))
        client.conn.end_stream(sid)
        client.flush()
        await wait_until(lambda: drained[0] == 2 * MB, "a new stream moves its bytes")

    aio.run(main)


def test_a_slow_app_gets_every_byte_exactly_while_other_streams_reuse_the_read_buffer(
    aio: Loop,
) -> None:
    """Received DATA reaches apps as views of the one shared receive buffer. An app that
    reads slowly makes its transport queue such views; the buffer must then not be reused,
    or the queued bytes would be overwritten by the next read (any stream's)."""

    async def main() -> None:
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

        apps = {
            "slow": await app_port(aio, sink("slow", 0.002), rcvbuf=16384),
            "fast": await app_port(aio, sink("fast", 0.0)),
        }
        client, _ = await hbone_pair(aio, apps)
        want = {name: hashlib.sha256() for name in apps}
        total = 3 * MB
        sids = {name: client.open_stream(connect_request(name), StreamRec()) for name in apps}
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
        await wait_until(lambda: min(sizes.values()) >= sent, "both apps got everything", 60)
        for name in apps:
            assert sizes[name] == sent
            assert got[name].hexdigest() == want[name].hexdigest(), name

    aio.run(main)


def test_app_bytes_arrive_exactly_while_stream_queues_hold_views_of_the_read_buffer(
    aio: Loop,
) -> None:
    """Reads from apps land in one buffer shared by every app connection and go on as
    views of it. When the peer returns no credit, bytes wait in the stream's send queue;
    the next read (this stream's or another's) reuses the buffer, so what waits must not
    be a view of it, or it would be overwritten before it is sent."""
    total = 12 * MB  # three stream windows: the queue fills while credit is held back

    def chunks(seed: int) -> list[bytes]:
        out, size, i = [], 0, 0
        while size < total:  # distinct bytes per chunk: an overwritten view would show
            out.append(bytes([(i * 7 + seed) % 251]) * 65521 + i.to_bytes(8, "big"))
            size += 65529
            i += 1
        return out

    data = {"a": chunks(1), "b": chunks(2)}

    def source(name: str) -> Callable[..., Awaitable[None]]:
        async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            for chunk in data[name]:
                w.write(chunk)
                await w.drain()
            w.write_eof()
            await r.read()  # until the tunnel closes its side
            w.close()

        return serve

    async def main() -> None:
        apps = {name: await app_port(aio, source(name)) for name in data}
        client, _ = await hbone_pair(aio, apps)
        recs: dict[str, StreamRec] = {}
        acked = dict.fromkeys(apps, 0)
        for name in apps:
            rec = recs[name] = StreamRec(client.conn, auto_ack=False)
            rec.sid = client.open_stream(connect_request(name), rec)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while not all(rec.ended for rec in recs.values()):
            assert loop.time() < deadline, "the streams did not end in 60 s"
            await asyncio.sleep(0.005)  # a slow reader: credit comes back in batches
            for name, rec in recs.items():
                if len(rec.data) > acked[name]:
                    client.conn.ack(rec.sid, len(rec.data) - acked[name])
                    acked[name] = len(rec.data)
            client.flush()
        for name, rec in recs.items():
            want = b"".join(data[name])
            assert len(rec.data) == len(want), name
            assert hashlib.sha256(rec.data).digest() == hashlib.sha256(want).digest(), name

    aio.run(main)


def test_tcp_pipes_deliver_every_byte_while_a_slow_peer_holds_views_of_the_read_buffer(
    aio: Loop,
) -> None:
    """TCP <-> TCP pipes read into the same shared buffer as the splices. A peer that reads
    slowly makes its transport keep what it could not send; the next read (any pipe's)
    reuses the buffer, so what is kept must not be a view of it."""
    total = 6 * MB

    def chunks(seed: int) -> list[bytes]:
        out, size, i = [], 0, 0
        while size < total:
            out.append(bytes([(i * 5 + seed) % 251]) * 65521 + i.to_bytes(8, "big"))
            size += 65529
            i += 1
        return out

    async def main() -> None:
        loop = asyncio.get_running_loop()
        got: dict[int, bytearray] = {}
        results: list[RelayResult] = []
        tasks: set[asyncio.Task[None]] = set()

        def sink(delay: float) -> Callable[..., Awaitable[None]]:
            async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
                buf = got.setdefault(len(got), bytearray())
                while data := await r.read(7919):
                    buf += data
                    if delay:
                        await asyncio.sleep(delay)
                w.close()

            return serve

        sinks = [await app_port(aio, sink(0.001), rcvbuf=16384), await app_port(aio, sink(0))]

        def accepted(port: int) -> Callable[[AppSide], None]:
            def on_made(client: AppSide) -> None:
                async def join() -> None:
                    sock = socket.socket()
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
                    sock.setblocking(False)
                    await loop.sock_connect(sock, (LOOPBACK, port))
                    _, upstream = await loop.create_connection(AppSide, sock=sock)
                    pipe = TcpPipe(client, upstream)
                    pipe.when_done(results.append)
                    pipe.start()

                tasks.add(loop.create_task(join()))

            return on_made

        listeners = [
            aio.closing(await loop.create_server(partial(AppSide, accepted(p)), LOOPBACK, 0))
            for p in sinks
        ]
        data = [chunks(1), chunks(2)]

        async def send(i: int) -> None:
            port = listeners[i].sockets[0].getsockname()[1]
            r, w = await asyncio.open_connection(LOOPBACK, port)
            for chunk in data[i]:
                w.write(chunk)
                await w.drain()
            w.write_eof()
            await r.read()
            w.close()

        await asyncio.wait_for(asyncio.gather(send(0), send(1)), 60)
        await wait_until(lambda: len(results) == 2, "both pipes ended")
        assert all(r.error is None for r in results), results
        assert sorted(len(b) for b in got.values()) == [len(b"".join(d)) for d in data]
        wanted = {hashlib.sha256(b"".join(d)).digest() for d in data}
        assert {hashlib.sha256(b).digest() for b in got.values()} == wanted

    aio.run(main)


def test_a_finished_tcp_pipe_is_freed_without_the_cyclic_collector(aio: Loop) -> None:
    """The same-node relay (two app sides joined by a pipe): once both ends are gone,
    reference counting frees it all; nothing waits in a cycle for the collector."""

    async def main() -> Counter[str]:
        loop = asyncio.get_running_loop()
        results: list[RelayResult] = []
        tasks: set[asyncio.Task[None]] = set()

        async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(await r.read())
            w.close()

        port = await app_port(aio, echo)

        def on_made(client: AppSide) -> None:
            async def join() -> None:
                _, upstream = await loop.create_connection(AppSide, LOOPBACK, port)
                pipe = TcpPipe(client, upstream)
                pipe.when_done(results.append)
                pipe.start()

            tasks.add(loop.create_task(join()))

        listener = aio.closing(await loop.create_server(partial(AppSide, on_made), LOOPBACK, 0))
        lport = listener.sockets[0].getsockname()[1]

        async def one() -> None:
            r, w = await asyncio.open_connection(LOOPBACK, lport)
            w.write(b"ping")
            w.write_eof()
            assert await r.read() == b"ping"
            w.close()
            await w.wait_closed()

        await one()  # warm-up
        await wait_until(lambda: len(results) == 1, "the warm-up pipe to end")
        tasks.clear()
        with cyclic_garbage() as found:
            for _ in range(30):
                await one()
            await wait_until(lambda: len(results) == 31, "the pipes to end")
            await asyncio.sleep(0.05)
            tasks.clear()
        assert all(r.error is None for r in results), results
        return found

    found = aio.run(main)
    relay = {k: n for k, n in found.items() if k.startswith("meshcore.")}
    assert relay == {}, found.most_common(12)


class _WriteLog(H2Transport):
    """An H2Transport that keeps, per write to its transport, the frames written: (type,
    flags, length) each."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.writes: list[list[tuple[int, int, int]]] = []

    def flush(self) -> None:
        out = b"".join(bytes(b) for b in self.conn.out)
        frames = []
        off = 0
        while len(out) - off >= FRAME_HEADER_LEN:
            length, ftype, flags, _ = parse_header(out, off)
            frames.append((ftype, flags, length))
            off += FRAME_HEADER_LEN + length
        if frames:
            self.writes.append(frames)
        super().flush()


ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
DATA, END_STREAM = FrameType.DATA, Flag.END_STREAM


@pytest.mark.parametrize("peek", [True, False], ids=["peeked", "not_peeked"])
def test_an_answer_and_the_fin_right_behind_it_leave_as_one_record(aio: Loop, peek: bool) -> None:
    """An app that answers and closes: with its FIN looked for behind the answer's read,
    the answer is one DATA frame carrying END_STREAM, in one write to TLS (one record), so
    the client's app gets the FIN with the answer and is not the one to close first (and
    keep the TIME-WAIT). Not looked for, the event loop reads the FIN a turn later: two
    writes."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        srv = socket.create_server((LOOPBACK, 0))
        srv.setblocking(False)
        aio.defer(srv.close)

        async def answer_and_close() -> None:
            # Plain socket calls: the answer and the FIN leave back to back.
            conn, _ = await loop.sock_accept(srv)
            with conn:
                await loop.sock_recv(conn, 1024)
                conn.setblocking(True)
                conn.sendall(ANSWER)
                conn.shutdown(socket.SHUT_WR)
                await asyncio.sleep(0.5)

        task = loop.create_task(answer_and_close())
        aio.defer(task.cancel)
        client, splices = await hbone_pair(
            aio, {"app": srv.getsockname()[1]}, server_cls=_WriteLog, peek=peek
        )
        rec = StreamRec(client.conn)
        sid = client.open_stream(connect_request("app"), rec)
        rec.sid = sid
        client.conn.send_data(sid, b"GET / HTTP/1.1\r\n\r\n")
        client.flush()
        await wait_until(lambda: rec.ended, "the answer and its end arrived")
        assert bytes(rec.data) == ANSWER
        server = splices[0].h2
        assert isinstance(server, _WriteLog)
        stream_writes = [w for w in server.writes if any(t == DATA for t, _, _ in w)]
        if peek:
            assert stream_writes == [[(DATA, END_STREAM, len(ANSWER))]]
        else:
            assert stream_writes == [[(DATA, 0, len(ANSWER))], [(DATA, END_STREAM, 0)]]

    aio.run(main)


def _segments_in(sock: socket.socket) -> int:
    """tcpi_segs_in of TCP_INFO (struct tcp_info, Linux 4.2+): segments the socket got."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 144)
    return int.from_bytes(info[140:144], "little")


async def _read_to_end(sock: socket.socket, segments_before: int) -> tuple[bytes, int]:
    """Everything `sock` receives up to the FIN, and the segments it took since then."""
    got = b""
    while data := await asyncio.get_running_loop().sock_recv(sock, 65536):
        got += data
    return got, _segments_in(sock) - segments_before


def test_the_last_bytes_of_a_stream_and_its_end_reach_the_app_in_one_segment(aio: Loop) -> None:
    """A DATA frame with END_STREAM: its bytes are held (TCP_CORK) until the FIN, which
    then leaves with them, so the app gets both at once, as the peer's own app sent them
    (an app that closes once it has what it waited for then closes second, and the
    TIME-WAIT stays where it would be without the mesh)."""

    async def main() -> tuple[bytes, int]:
        loop = asyncio.get_running_loop()
        srv = socket.create_server((LOOPBACK, 0))
        srv.setblocking(False)
        aio.defer(srv.close)
        accepted: asyncio.Future[socket.socket] = loop.create_future()

        async def accept() -> None:
            conn, _ = await loop.sock_accept(srv)
            accepted.set_result(conn)

        task = loop.create_task(accept())
        aio.defer(task.cancel)
        client, _ = await hbone_pair(aio, {"app": srv.getsockname()[1]})
        rec = StreamRec(client.conn)
        sid = client.open_stream(connect_request("app"), rec)
        rec.sid = sid
        conn = await accepted
        aio.defer(conn.close)
        await wait_until(lambda: rec.response is not None, "the CONNECT answered")
        before = _segments_in(conn)
        client.conn.send_data(sid, b"the whole request")
        client.conn.end_stream(sid)
        client.flush()
        return await _read_to_end(conn, before)

    got, segments = aio.run(main)
    assert got == b"the whole request"
    assert segments == 1


def test_through_a_tcp_pipe_an_answer_and_its_fin_reach_the_client_in_one_segment(
    aio: Loop,
) -> None:
    """The same-node relay: an upstream app that answers and closes (one segment) is
    peeked at for its FIN, and the client gets the answer and the FIN together again."""

    async def main() -> tuple[bytes, int]:
        loop = asyncio.get_running_loop()
        srv = socket.create_server((LOOPBACK, 0))
        srv.setblocking(False)
        aio.defer(srv.close)

        go = asyncio.Event()

        async def answer_and_close() -> None:
            conn, _ = await loop.sock_accept(srv)
            with conn:
                await loop.sock_recv(conn, 1024)
                await go.wait()
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
                conn.setblocking(True)
                conn.sendall(ANSWER)
                conn.shutdown(socket.SHUT_WR)  # with what the cork holds: one segment
                await asyncio.sleep(0.5)

        tasks = {loop.create_task(answer_and_close())}

        def on_made(client: AppSide) -> None:
            async def join() -> None:
                sock = socket.socket()
                sock.setblocking(False)
                await loop.sock_connect(sock, srv.getsockname())
                _, upstream = await loop.create_connection(AppSide, sock=sock)
                upstream.peek = sock
                TcpPipe(client, upstream).start()

            tasks.add(loop.create_task(join()))

        aio.defer(lambda: [t.cancel() for t in tasks])
        listener = aio.closing(await loop.create_server(partial(AppSide, on_made), LOOPBACK, 0))
        client = socket.socket()
        aio.defer(client.close)
        client.setblocking(False)
        await loop.sock_connect(client, listener.sockets[0].getsockname())
        await loop.sock_sendall(client, b"GET / HTTP/1.0\r\n\r\n")
        await asyncio.sleep(0.1)  # the request's ACK is in before counting
        before = _segments_in(client)
        go.set()
        return await _read_to_end(client, before)

    got, segments = aio.run(main)
    assert got == ANSWER
    assert segments == 1


def test_a_connection_that_stays_open_is_peeked_at_twice_then_left_alone(aio: Loop) -> None:
    """Keep-alive: reads followed by no FIN. After EOF_PEEK_MISSES of them the app side
    stops looking (no system call per read for the rest of the connection), and every byte
    still arrives."""

    async def main() -> None:
        writers: list[asyncio.StreamWriter] = []

        async def talk(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            writers.append(w)
            while await r.read(1024):
                w.write(b"pong")
            w.close()

        client, splices = await hbone_pair(aio, {"app": await app_port(aio, talk)}, peek=True)
        rec = StreamRec(client.conn)
        sid = client.open_stream(connect_request("app"), rec)
        rec.sid = sid
        await wait_until(lambda: bool(splices) and splices[0].app is not None, "joined")
        app = splices[0].app
        assert app is not None
        for n in range(1, EOF_PEEK_MISSES + 2):
            client.conn.send_data(sid, b"ping")
            client.flush()
            want = 4 * n
            await wait_until(lambda: len(rec.data) == want, f"answer {n}")  # noqa: B023
            assert (app.peek is None) == (n >= EOF_PEEK_MISSES), n
        assert not app.eof
        client.conn.end_stream(sid)
        client.flush()
        await wait_until(lambda: rec.ended, "the app's close ends the stream")

    aio.run(main)
