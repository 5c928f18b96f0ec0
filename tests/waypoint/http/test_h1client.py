"""The HTTP/1.1 client against our server and against independent peers (an `h11` server,
a `websockets` server and client), all on loopback TCP: keep-alive reuse, chunked both
ways, 100-continue, HEAD, close-delimited bodies, and a WebSocket through
serve_http1 -> Http1Client."""

from __future__ import annotations

import asyncio
import contextlib

import h11
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.asyncio.server import ServerConnection
from websockets.asyncio.server import serve as ws_serve

from tests.support.aio import Loop
from tests.waypoint.http.loopback import Server, connect, read_until
from waypoint.http.h1client import Http1Client, UpstreamError
from waypoint.http.h1server import serve_http1
from waypoint.http.message import (
    BufferedBody,
    Handler,
    Request,
    Response,
    StreamBody,
    read_all,
)
from waypoint.http.splice import splice
from waypoint.http.stream import AsyncioByteStream, ByteStream

# The proxies run on uvloop; these run on both loops.
LOOPS = pytest.mark.parametrize("aio", ["asyncio", "uvloop"], indirect=True)


def http1_server(handler: Handler) -> Server:
    async def on_stream(stream: ByteStream) -> None:
        await serve_http1(stream, handler)

    return Server(on_stream)


async def echo(request: Request) -> Response:
    data = await read_all(request.body, 1 << 20)
    headers = [("x-path", request.path), ("x-method", request.method)]
    headers += [(f"x-trailer-{k}", v) for k, v in request.body.trailers]
    if request.path == "/chunked":
        body = StreamBody()
        body.feed(data or b"")
        body.end([("x-done", "yes")])
        return Response(200, headers, body)
    return Response(200, headers, BufferedBody(data or b""))


def get(path: str, body: bytes = b"", method: str = "GET") -> Request:
    return Request(method, "svc", path, [("accept", "*/*")], BufferedBody(body))


def test_keep_alive_reuse_against_our_server(no_leaks: Loop) -> None:
    async def scenario() -> None:
        async with http1_server(echo) as server:
            stream = await connect(server.port)
            client = Http1Client(stream)
            for i in range(3):
                response = await client.send(get(f"/{i}", b"x" * i, "POST"))
                assert response.status == 200
                assert response.header("x-path") == f"/{i}"
                assert await read_all(response.body, 100) == b"x" * i
                assert client.reusable
            await client.aclose()
            stream.close()

    no_leaks.run(scenario)


class Writes:
    """A ByteStream that records what is written through it."""

    def __init__(self, stream: AsyncioByteStream) -> None:
        self.stream = stream
        self.writes: list[bytes] = []

    async def read(self, max_bytes: int = 65536) -> bytes:
        return await self.stream.read(max_bytes)

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        self.stream.write(data)

    async def drain(self) -> None:
        await self.stream.drain()

    def write_eof(self) -> None:
        self.stream.write_eof()

    def abort(self, reason: str) -> None:
        self.stream.abort(reason)

    @property
    def closed(self) -> bool:
        return self.stream.closed


@LOOPS
def test_whole_messages_go_in_one_write_and_come_without_a_task(no_leaks: Loop) -> None:
    """A request body held whole leaves with its head in one write (one TLS record over
    HBONE), and an answer that arrived whole with its head is complete when `send`
    returns, with no task reading its body."""

    async def scenario() -> None:
        answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        server = await canned(answer)
        try:
            stream = Writes(await connect(server.port))
            client = Http1Client(stream)
            response = await client.send(get("/up", b"payload", "POST"))
            names = {t.get_name() for t in asyncio.all_tasks()}
            assert len(stream.writes) == 1
            assert stream.writes[0].startswith(b"POST /up HTTP/1.1\r\n")
            assert stream.writes[0].endswith(b"\r\n\r\npayload")
            assert isinstance(response.body, StreamBody) and response.body.ended
            assert "http1-client-response-body" not in names
            assert "http1-client-request-body" not in names
            assert await read_all(response.body, 100) == b"ok"
            await client.aclose()
            stream.stream.close()
        finally:
            await server.close()

    no_leaks.run(scenario)


@LOOPS
def test_chunked_both_ways_with_trailers(no_leaks: Loop) -> None:
    async def scenario() -> None:
        async with http1_server(echo) as server:
            stream = await connect(server.port)
            client = Http1Client(stream)
            upload = StreamBody()  # no length: sent chunked
            request = Request("POST", "svc", "/chunked", [], upload)
            upload.feed(b"part1-")
            upload.feed(b"part2")
            upload.end([("x-sum", "11")])
            response = await client.send(request)
            assert await read_all(response.body, 100) == b"part1-part2"
            assert response.header("x-trailer-x-sum") == "11"
            assert response.body.trailers == [("x-done", "yes")]
            assert client.reusable
            await client.aclose()
            stream.close()

    no_leaks.run(scenario)


def test_expect_100_continue_waits_for_the_server(no_leaks: Loop) -> None:
    async def scenario() -> None:
        async with http1_server(echo) as server:
            stream = await connect(server.port)
            client = Http1Client(stream, continue_timeout=30.0)
            request = get("/upload", b"payload", "PUT")
            request.headers.append(("expect", "100-continue"))
            response = await client.send(request)
            assert response.status == 200
            assert await read_all(response.body, 100) == b"payload"
            assert client.reusable
            await client.aclose()
            stream.close()

    no_leaks.run(scenario)


def test_expect_100_continue_refused_body_is_not_sent(no_leaks: Loop) -> None:
    async def refuse(request: Request) -> Response:
        return Response(417, [], BufferedBody(b"no"))

    async def scenario() -> None:
        async with http1_server(refuse) as server:
            stream = await connect(server.port)
            client = Http1Client(stream, continue_timeout=30.0)
            request = get("/upload", b"payload", "PUT")
            request.headers.append(("expect", "100-continue"))
            response = await client.send(request)
            assert response.status == 417
            assert await read_all(response.body, 100) == b"no"
            assert not client.reusable
            await client.aclose()
            stream.close()

    no_leaks.run(scenario)


def test_head_and_204_have_no_body(no_leaks: Loop) -> None:
    async def handler(request: Request) -> Response:
        status = 204 if request.path == "/empty" else 200
        return Response(status, [("content-length", "5")], BufferedBody(b"hello"))

    async def scenario() -> None:
        async with http1_server(handler) as server:
            stream = await connect(server.port)
            client = Http1Client(stream)
            head = await client.send(get("/", method="HEAD"))
            assert head.header("content-length") == "5"
            assert await read_all(head.body, 100) == b""
            empty = await client.send(get("/empty"))
            assert (empty.status, await read_all(empty.body, 100)) == (204, b"")
            full = await client.send(get("/"))
            assert await read_all(full.body, 100) == b"hello"
            assert client.reusable
            await client.aclose()
            stream.close()

    no_leaks.run(scenario)


async def canned(answer: bytes) -> Server:
    """A raw server: reads one request head, writes `answer`, closes."""

    async def on_stream(stream: ByteStream) -> None:
        await read_until(stream, b"\r\n\r\n")
        stream.write(answer)
        await stream.drain()

    return await Server(on_stream).start()


@pytest.mark.parametrize(
    ("answer", "body", "trailers"),
    [
        (b"HTTP/1.0 200 OK\r\n\r\nuntil the end", b"until the end", []),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nclosing", b"closing", []),
        (
            b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            b"ok",
            [],
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nx-t: 1\r\n\r\n",
            b"ok",
            [("x-t", "1")],
        ),
    ],
    ids=["close-delimited-http10", "close-delimited-http11", "1xx-skipped", "chunked-trailers"],
)
def test_response_framings(
    no_leaks: Loop, answer: bytes, body: bytes, trailers: list[tuple[str, str]]
) -> None:
    async def scenario() -> None:
        server = await canned(answer)
        try:
            stream = await connect(server.port)
            client = Http1Client(stream)
            response = await client.send(get("/"))
            assert await read_all(response.body, 100) == body
            assert response.body.trailers == trailers
            await client.aclose()
            stream.close()
        finally:
            await server.close()

    no_leaks.run(scenario)


@pytest.mark.parametrize(
    "answer",
    [
        b"",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"SSH-2.0-OpenSSH\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
    ],
    ids=["closed", "two-lengths", "cl-and-te", "bad-status", "not-http", "unasked-101"],
)
def test_broken_upstreams_raise(no_leaks: Loop, answer: bytes) -> None:
    async def scenario() -> None:
        server = await canned(answer)
        try:
            stream = await connect(server.port)
            client = Http1Client(stream)
            with pytest.raises(UpstreamError):
                await client.send(get("/"))
            assert not client.reusable
            await client.aclose()
            stream.close()
        finally:
            await server.close()

    no_leaks.run(scenario)


# --- An independent server: h11 --------------------------------------------------------


async def h11_server(stream: ByteStream) -> None:
    """Answers every request with its body echoed, chunked, keep-alive (h11's framing)."""
    conn = h11.Connection(h11.SERVER)
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.read()
            conn.receive_data(data)
            if not data:
                return
            continue
        if isinstance(event, h11.Request):
            target = event.target
            body = b""
            while not isinstance(ev := conn.next_event(), h11.EndOfMessage):
                if ev is h11.NEED_DATA:
                    conn.receive_data(await stream.read())
                elif isinstance(ev, h11.Data):
                    body += ev.data
            stream.write(
                conn.send(h11.Response(status_code=200, headers=[(b"x-target", target)])) or b""
            )
            stream.write(conn.send(h11.Data(data=body)) or b"")
            stream.write(conn.send(h11.EndOfMessage()) or b"")
            await stream.drain()
            if conn.our_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()
        elif isinstance(event, h11.ConnectionClosed):
            return


def test_client_against_h11_server(no_leaks: Loop) -> None:
    async def scenario() -> None:
        async with Server(h11_server) as server:
            stream = await connect(server.port)
            client = Http1Client(stream)
            for i in range(3):
                upload = StreamBody()
                upload.feed(b"chunk%d" % i)
                upload.end()
                response = await client.send(Request("POST", "svc", f"/x?i={i}", [], upload))
                assert response.header("x-target") == f"/x?i={i}"
                assert await read_all(response.body, 100) == b"chunk%d" % i
                assert client.reusable
            await client.aclose()
            stream.close()

    no_leaks.run(scenario)


# --- WebSocket through the proxy path ----------------------------------------------------


class Forwarder:
    """A handler that forwards each request over a new upstream connection: what the
    proxy's router does, without routing."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._streams: list[AsyncioByteStream] = []

    async def __call__(self, request: Request) -> Response:
        upstream = await connect(self.port)
        self._streams.append(upstream)
        response = await Http1Client(upstream).send(request)
        inner = response.upgraded
        if inner is not None:

            async def upgraded(downstream: ByteStream, leftover: bytes) -> None:
                try:
                    await inner(downstream, leftover)
                finally:
                    upstream.close()

            response.upgraded = upgraded
        return response

    async def close(self) -> None:
        for stream in self._streams:
            stream.close()
            with contextlib.suppress(Exception):
                await stream._writer.wait_closed()


@LOOPS
def test_websocket_echo_through_serve_http1_and_http1_client(no_leaks: Loop) -> None:
    async def echo_ws(ws: ServerConnection) -> None:
        async for message in ws:
            await ws.send(message)

    async def scenario() -> None:
        async with ws_serve(echo_ws, "127.0.0.1", 0) as ws_server:
            ws_port = next(iter(ws_server.sockets)).getsockname()[1]
            forwarder = Forwarder(ws_port)
            try:
                async with (
                    http1_server(forwarder) as proxy,
                    ws_connect(f"ws://127.0.0.1:{proxy.port}/chat") as ws,
                ):
                    for message in ["hello", "x" * 100_000]:
                        await ws.send(message)
                        assert await ws.recv() == message
                    await ws.send(b"\x00\x01binary")
                    assert await ws.recv() == b"\x00\x01binary"
            finally:
                await forwarder.close()

    no_leaks.run(scenario)


def test_websocket_refused_upstream_answer_passes_through(no_leaks: Loop) -> None:
    async def no_ws(request: Request) -> Response:
        return Response(403, [], BufferedBody(b"no"))

    async def scenario() -> None:
        async with http1_server(no_ws) as upstream:
            forwarder = Forwarder(upstream.port)
            try:
                async with http1_server(forwarder) as proxy:
                    with pytest.raises(Exception, match="403"):
                        async with ws_connect(f"ws://127.0.0.1:{proxy.port}/chat"):
                            pass
            finally:
                await forwarder.close()

    no_leaks.run(scenario)


@LOOPS
def test_splice_half_close_and_counts(no_leaks: Loop) -> None:
    """A client that ends its side still receives the rest of the answer."""

    async def upstream_side(stream: ByteStream) -> None:
        data = bytearray()
        while chunk := await stream.read():
            data += chunk
        stream.write(b"got:" + bytes(data))
        await stream.drain()

    counts: list[tuple[int, int]] = []

    async def relay(up_port: int, stream: ByteStream) -> None:
        upstream = await connect(up_port)
        try:
            counts.append(await splice(stream, upstream, from_a=b"pre-"))
        finally:
            upstream.close()

    async def scenario() -> None:
        async with Server(upstream_side) as up:

            async def on_stream(stream: ByteStream) -> None:
                await relay(up.port, stream)

            async with Server(on_stream) as middle:
                client = await connect(middle.port)
                client.write(b"hello")
                client.write_eof()
                got = b""
                while data := await client.read():
                    got += data
                client.close()
        assert got == b"got:pre-hello"
        assert counts == [(9, 13)]

    no_leaks.run(scenario)


def test_splice_cancelled_aborts_both(no_leaks: Loop) -> None:
    async def scenario() -> None:
        a, b = await _pair()
        task = asyncio.create_task(splice(a[0], b[0]))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert a[0].closed and b[0].closed
        for stream in (*a, *b):
            stream.close()

    no_leaks.run(scenario)


async def _pair() -> tuple[tuple[AsyncioByteStream, AsyncioByteStream], ...]:
    """Two connected TCP pairs (each: our end, the far end)."""
    pairs = []
    accepted: asyncio.Queue[AsyncioByteStream] = asyncio.Queue()

    async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await accepted.put(AsyncioByteStream(r, w))

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    for _ in range(2):
        near = await connect(port)
        pairs.append((near, await accepted.get()))
    server.close()
    await server.wait_closed()
    return tuple(pairs)
