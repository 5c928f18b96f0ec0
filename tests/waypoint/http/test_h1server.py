"""The HTTP/1.1 server on loopback TCP, driven by raw bytes: keep-alive, pipelining, chunked
bodies and trailers, 100-continue, HEAD/204/304, limits, and request smuggling refused with
400 and a closed connection."""

from __future__ import annotations

import asyncio
import re
from dataclasses import replace

import pytest

from tests.support.aio import Loop
from tests.waypoint.http.loopback import Server, connect, read_until, read_until_eof
from waypoint.http.h1 import Http1Limits
from waypoint.http.h1server import serve_http1
from waypoint.http.message import (
    BodyError,
    BufferedBody,
    Handler,
    Request,
    Response,
    StreamBody,
    read_all,
)
from waypoint.http.stream import ByteStream

# The proxies run on uvloop; these run on both loops.
LOOPS = pytest.mark.parametrize("aio", ["asyncio", "uvloop"], indirect=True)


class Recorder:
    """A handler that records each request (with its whole body) and answers with the
    body echoed, plus `x-method`/`x-path`/`x-authority` headers."""

    def __init__(self, status: int = 200) -> None:
        self.requests: list[tuple[Request, bytes | None]] = []
        self.status = status

    async def __call__(self, request: Request) -> Response:
        try:
            body: bytes | None = await read_all(request.body, 1 << 20)
        except BodyError:
            body = None
        self.requests.append((request, body))
        payload = body or b""
        headers = [
            ("x-method", request.method),
            ("x-path", request.path),
            ("x-authority", request.authority),
        ]
        trailers = request.body.trailers
        if trailers:
            headers.append(("x-trailers", ";".join(f"{k}={v}" for k, v in trailers)))
        return Response(self.status, headers, BufferedBody(payload))


def serving(handler: Handler, limits: Http1Limits | None = None) -> Server:
    async def on_stream(stream: ByteStream) -> None:
        await serve_http1(stream, handler, limits or Http1Limits())

    return Server(on_stream)


async def exchange(handler: Handler, data: bytes, limits: Http1Limits | None = None) -> bytes:
    """Send `data`, half-close, and return everything the server wrote until it closed."""
    async with serving(handler, limits) as server:
        client = await connect(server.port)
        try:
            client.write(data)
            await client.drain()
            client.write_eof()
            return await read_until_eof(client)
        finally:
            client.close()


def statuses(raw: bytes) -> list[int]:
    return [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", raw)]


@LOOPS
def test_keep_alive_serves_several_requests_on_one_connection(no_leaks: Loop) -> None:
    handler = Recorder()

    async def scenario() -> None:
        async with serving(handler) as server:
            client = await connect(server.port)
            for i in range(3):
                client.write(f"GET /r{i} HTTP/1.1\r\nHost: svc\r\n\r\n".encode())
                answer = await read_until(client, b"\r\n\r\n")
                assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
                assert f"x-path: /r{i}".encode() in answer
                assert b"connection: close" not in answer
            client.close()
        assert [r.path for r, _ in handler.requests] == ["/r0", "/r1", "/r2"]

    no_leaks.run(scenario)


def _task_names() -> set[str]:
    return {t.get_name() for t in asyncio.all_tasks()}


@LOOPS
def test_a_body_that_came_with_its_head_is_handed_over_whole(no_leaks: Loop) -> None:
    """No task pumps a body that is already here, and the client that sent it without
    waiting gets no 100 Continue for it (RFC 9110 10.1.1 lets the server omit it)."""
    seen: list[tuple[bool, set[str]]] = []

    async def handler(request: Request) -> Response:
        assert isinstance(request.body, StreamBody)
        seen.append((request.body.ended, _task_names()))
        data = await read_all(request.body, 100)
        return Response(200, [], BufferedBody(data or b""))

    async def scenario() -> None:
        async with serving(handler) as server:
            client = await connect(server.port)
            client.write(
                b"PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n"
                b"Expect: 100-continue\r\n\r\nbody"
                b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"2\r\nok\r\n0\r\n\r\n"
            )
            raw = await read_until(client, b"\r\n\r\nok")
            client.close()
        assert b"100 Continue" not in raw
        assert statuses(raw) == [200, 200]
        assert raw.index(b"body") < raw.index(b"ok")
        assert [ended for ended, _ in seen] == [True, True]
        assert all("http1-request-body" not in names for _, names in seen)

    no_leaks.run(scenario)


@LOOPS
def test_pipelined_requests_are_answered_in_order(no_leaks: Loop) -> None:
    requests = b"".join(
        f"POST /p{i} HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n{i}{i}".encode()
        for i in range(5)
    )
    raw = no_leaks.run(exchange(Recorder(), requests + b"GET /last HTTP/1.1\r\nHost: a\r\n\r\n"))
    assert statuses(raw) == [200] * 6
    paths = [line for line in raw.split(b"\r\n") if line.startswith(b"x-path")]
    assert paths == [f"x-path: /p{i}".encode() for i in range(5)] + [b"x-path: /last"]
    for i in range(5):
        assert f"\r\n\r\n{i}{i}".encode() in raw


@pytest.mark.parametrize(
    ("request_bytes", "closes"),
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", True),
        (b"GET / HTTP/1.0\r\n\r\n", True),
        (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", False),
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", False),
    ],
    ids=["http11-connection-close", "http10-default", "http10-keep-alive", "http11-default"],
)
def test_keep_alive_rules(no_leaks: Loop, request_bytes: bytes, closes: bool) -> None:
    async def scenario() -> None:
        async with serving(Recorder()) as server:
            client = await connect(server.port)
            client.write(request_bytes + b"GET /second HTTP/1.1\r\nHost: a\r\n\r\n")
            client.write_eof()
            raw = await read_until_eof(client)
            client.close()
        assert len(statuses(raw)) == (1 if closes else 2)
        first = raw.split(b"\r\n\r\n", 1)[0].lower()
        assert (b"connection: close" in first) == closes

    no_leaks.run(scenario)


def test_chunked_request_with_trailers_and_chunked_response(no_leaks: Loop) -> None:
    async def streaming(request: Request) -> Response:
        body = StreamBody()

        async def produce() -> None:
            data = await read_all(request.body, 1000)
            body.feed(data or b"")
            body.feed(b"-more")
            body.end([("grpc-status", "0")])

        task = asyncio.create_task(produce())
        await task
        return Response(200, [("content-type", "text/plain")], body)

    raw = no_leaks.run(
        exchange(
            streaming,
            b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n4;ext=1\r\ndefg\r\n0\r\nx-sum: 7\r\n\r\n",
        )
    )
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head
    # What the handler's body yields is sent as it comes (here one read: both parts).
    assert body == b"c\r\nabcdefg-more\r\n0\r\ngrpc-status: 0\r\n\r\n"


def test_request_trailers_reach_the_handler(no_leaks: Loop) -> None:
    handler = Recorder()
    no_leaks.run(
        exchange(
            handler,
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"1\r\nx\r\n0\r\nx-a: 1\r\nContent-Length: 9\r\n\r\n",
        )
    )
    (request, body), *_ = handler.requests
    assert body == b"x"
    # A framing field in a trailer section is dropped, never acted on.
    assert request.body.trailers == [("x-a", "1")]


def test_hop_by_hop_headers_are_consumed(no_leaks: Loop) -> None:
    handler = Recorder()
    no_leaks.run(
        exchange(
            handler,
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: x-private, close\r\nX-Private: 1\r\n"
            b"Keep-Alive: 5\r\nTE: trailers\r\nProxy-Connection: x\r\nX-Kept: yes\r\n\r\n",
        )
    )
    (request, _), *_ = handler.requests
    assert request.headers == [("te", "trailers"), ("x-kept", "yes")]


def test_absolute_form_target_wins_over_host(no_leaks: Loop) -> None:
    handler = Recorder()
    no_leaks.run(exchange(handler, b"GET http://svc.ns:8080/a?b=1 HTTP/1.1\r\nHost: other\r\n\r\n"))
    (request, _), *_ = handler.requests
    assert (request.authority, request.path) == ("svc.ns:8080", "/a?b=1")


@pytest.mark.parametrize(
    ("method", "status", "bodies"),
    [("HEAD", 200, 1), ("GET", 204, 0), ("GET", 304, 0), ("GET", 200, 2)],
    ids=["head", "no-content", "not-modified", "get-200"],
)
def test_responses_without_body(no_leaks: Loop, method: str, status: int, bodies: int) -> None:
    async def handler(request: Request) -> Response:
        return Response(status, [("content-length", "5")], BufferedBody(b"hello"))

    raw = no_leaks.run(
        exchange(
            handler,
            f"{method} / HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n".encode(),
        )
    )
    # Both responses arrive, so the first was framed right (no stray body bytes); the
    # second request is a GET.
    assert statuses(raw) == [status, status]
    assert raw.count(b"hello") == bodies
    assert raw.count(b"content-length: 5") == 2


def test_expect_100_continue_sent_only_when_the_handler_reads(no_leaks: Loop) -> None:
    reads = asyncio.Event()

    async def reader(request: Request) -> Response:
        await reads.wait()
        data = await read_all(request.body, 100)
        return Response(200, [], BufferedBody(data or b""))

    async def scenario() -> None:
        async with serving(reader) as server:
            client = await connect(server.port)
            client.write(
                b"PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
            )
            await asyncio.sleep(0.05)  # the handler has not asked for the body yet
            reads.set()
            got = await read_until(client, b"\r\n\r\n")
            assert got == b"HTTP/1.1 100 Continue\r\n\r\n"
            client.write(b"body")
            final = await read_until(client, b"body")
            assert final.startswith(b"HTTP/1.1 200 OK\r\n")
            client.close()

    no_leaks.run(scenario)


def test_expect_100_continue_refused_body_closes_connection(no_leaks: Loop) -> None:
    async def refuse(request: Request) -> Response:
        return Response(413, [], BufferedBody(b"no"))

    raw = no_leaks.run(
        exchange(
            refuse,
            b"PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n",
        )
    )
    assert b"100 Continue" not in raw
    assert statuses(raw) == [413]
    assert b"connection: close" in raw


def test_unread_request_body_ends_the_connection(no_leaks: Loop) -> None:
    async def ignore(request: Request) -> Response:
        return Response(200, [], BufferedBody(b"ok"))

    async def scenario() -> None:
        async with serving(ignore) as server:
            client = await connect(server.port)
            # A body far larger than what is buffered, never read by the handler.
            client.write(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10000000\r\n\r\n")
            client.write(b"x" * 1_000_000)
            raw = await read_until_eof(client)
            client.close()
        assert statuses(raw) == [200]

    no_leaks.run(scenario)


def test_draining_closes_after_the_current_response(no_leaks: Loop) -> None:
    draining = False

    async def handler(request: Request) -> Response:
        nonlocal draining
        draining = True
        return Response(200, [], BufferedBody(b""))

    async def on_stream(stream: ByteStream) -> None:
        await serve_http1(stream, handler, Http1Limits(), draining=lambda: draining)

    async def scenario() -> None:
        async with Server(on_stream) as server:
            client = await connect(server.port)
            client.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
            raw = await read_until_eof(client)
            client.close()
        assert statuses(raw) == [200]
        assert b"connection: close" in raw

    no_leaks.run(scenario)


def test_http10_client_gets_a_close_delimited_body(no_leaks: Loop) -> None:
    async def unknown_length(request: Request) -> Response:
        body = StreamBody()
        body.feed(b"streamed")
        body.end()
        return Response(200, [], body)

    raw = no_leaks.run(exchange(unknown_length, b"GET / HTTP/1.0\r\n\r\n"))
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"chunked" not in head
    assert b"connection: close" in head
    assert body == b"streamed"


def test_handler_error_is_a_500(no_leaks: Loop) -> None:
    async def broken(request: Request) -> Response:
        raise RuntimeError("boom")

    raw = no_leaks.run(exchange(broken, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"))
    assert statuses(raw) == [500]


# --- Smuggling and malformed requests: 4xx/5xx, then the connection is closed ------------

POST = b"POST / HTTP/1.1\r\nHost: a\r\n"
SMUGGLING = [
    ("cl-and-te", POST + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("te-and-cl", POST + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n", 400),
    ("two-differing-cl", POST + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", 400),
    ("cl-list-differing", POST + b"Content-Length: 5, 6\r\n\r\nhello!", 400),
    ("cl-negative", POST + b"Content-Length: -1\r\n\r\n", 400),
    ("cl-plus-sign", POST + b"Content-Length: +5\r\n\r\nhello", 400),
    ("cl-hex", POST + b"Content-Length: 0x5\r\n\r\nhello", 400),
    ("cl-inner-space", POST + b"Content-Length: 1 2\r\n\r\n", 400),
    ("cl-huge", POST + b"Content-Length: 99999999999999999999999\r\n\r\n", 400),
    ("te-chunked-then-identity", POST + b"Transfer-Encoding: chunked, identity\r\n\r\n", 400),
    ("te-identity", POST + b"Transfer-Encoding: identity\r\n\r\n", 400),
    ("te-gzip-chunked", POST + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
    ("te-chunked-twice", POST + b"Transfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n", 400),
    (
        "te-two-fields",
        POST + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    ("te-xchunked", POST + b"Transfer-Encoding: xchunked\r\n\r\n", 400),
    ("te-quoted", POST + b'Transfer-Encoding: "chunked"\r\n\r\n', 400),
    ("te-space-before-colon", POST + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n", 400),
    ("te-obs-fold", POST + b"Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n", 400),
    ("te-in-http10", b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("te-vertical-tab", POST + b"Transfer-Encoding: \x0bchunked\r\n\r\n0\r\n\r\n", 400),
    ("obs-fold", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n 2\r\n\r\n", 400),
    ("obs-fold-tab", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n\t2\r\n\r\n", 400),
    ("bare-lf-in-head", b"GET / HTTP/1.1\r\nHost: a\nX-A: 1\r\n\r\n", 400),
    ("bare-lf-request-line", b"GET / HTTP/1.1\nHost: a\r\n\r\n", 400),
    ("bare-cr-in-value", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r2\r\n\r\n", 400),
    ("nul-in-value", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\x002\r\n\r\n", 400),
    ("nul-in-target", b"GET /\x00 HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("space-before-colon", b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),
    ("tab-before-colon", b"GET / HTTP/1.1\r\nHost: a\r\nX-A\t: 1\r\n\r\n", 400),
    ("bad-name-char", b"GET / HTTP/1.1\r\nHost: a\r\nX(A): 1\r\n\r\n", 400),
    ("empty-name", b"GET / HTTP/1.1\r\nHost: a\r\n: 1\r\n\r\n", 400),
    ("no-colon", b"GET / HTTP/1.1\r\nHost: a\r\nX-A\r\n\r\n", 400),
    ("ctl-in-value", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: \x01\r\n\r\n", 400),
    ("del-in-value", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: \x7f\r\n\r\n", 400),
    ("missing-host-http11", b"GET / HTTP/1.1\r\nX-A: 1\r\n\r\n", 400),
    ("two-hosts", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    ("two-hosts-same", b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n", 400),
    ("host-with-slash", b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", 400),
    ("double-space-request-line", b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("trailing-space-request-line", b"GET / HTTP/1.1 \r\nHost: a\r\n\r\n", 400),
    ("lowercase-version", b"GET / http/1.1\r\nHost: a\r\n\r\n", 400),
    ("tab-in-request-line", b"GET\t/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("relative-target", b"GET foo HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("http2-version", b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    ("http09-style", b"GET /\r\n\r\n", 400),
    ("connect-method", b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", 405),
    ("expect-unknown", b"GET / HTTP/1.1\r\nHost: a\r\nExpect: dance\r\n\r\n", 417),
    ("chunk-size-not-hex", POST + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    (
        "chunk-size-17-digits",
        POST + b"Transfer-Encoding: chunked\r\n\r\n" + b"1" * 17 + b"\r\n",
        400,
    ),
    ("chunk-size-negative", POST + b"Transfer-Encoding: chunked\r\n\r\n-1\r\n", 400),
    ("chunk-size-0x", POST + b"Transfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n", 400),
    ("chunk-size-trailing-space", POST + b"Transfer-Encoding: chunked\r\n\r\n5 \r\nhello\r\n", 400),
    ("chunk-size-bare-lf", POST + b"Transfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n", 400),
    ("chunk-ext-bare-lf", POST + b"Transfer-Encoding: chunked\r\n\r\n5;a\nb\r\nhello\r\n", 400),
    ("chunk-ext-bare-cr", POST + b"Transfer-Encoding: chunked\r\n\r\n5;a\rb\r\nhello\r\n", 400),
    (
        "chunk-ext-abuse",
        POST + b"Transfer-Encoding: chunked\r\n\r\n" + b"1;" + b"x" * 1000 + b"\r\na\r\n" * 10,
        400,
    ),
    ("chunk-data-too-long", POST + b"Transfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n0\r\n\r\n", 400),
    ("chunk-missing-crlf", POST + b"Transfer-Encoding: chunked\r\n\r\n2\r\nab0\r\n\r\n", 400),
    (
        "trailer-obs-fold",
        POST + b"Transfer-Encoding: chunked\r\n\r\n0\r\nX-T: 1\r\n 2\r\n\r\n",
        400,
    ),
]


@LOOPS
@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [(r, s) for _, r, s in SMUGGLING],
    ids=[name for name, _, _ in SMUGGLING],
)
def test_smuggling_is_refused_and_the_connection_closed(
    no_leaks: Loop, request_bytes: bytes, status: int
) -> None:
    handler = Recorder()

    async def scenario() -> None:
        async with serving(handler) as server:
            client = await connect(server.port)
            # Nothing is half-closed: the server must close on its own, and a second request
            # must never be answered.
            client.write(request_bytes + b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n")
            raw = await read_until_eof(client)
            client.close()
        assert statuses(raw) == [status], raw
        assert b"connection: close" in raw
        assert all(r.path != "/smuggled" for r, _ in handler.requests)
        for _, body in handler.requests:
            assert body is None  # a body with broken framing never reads as complete

    no_leaks.run(scenario)


# --- Limits ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X-A: 1\r\n" * 101 + b"\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X-Abcdefgh: 12345678\r\n" * 4000, 431),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2000\r\n\r\n", 413),
    ],
    ids=["long-request-line", "long-header-line", "too-many-headers", "head-too-large", "body"],
)
def test_oversized_requests_are_refused(no_leaks: Loop, request_bytes: bytes, status: int) -> None:
    handler = Recorder()

    async def scenario() -> None:
        async with serving(handler, Http1Limits(max_body_bytes=1000)) as server:
            client = await connect(server.port)
            client.write(request_bytes)
            raw = await read_until_eof(client)
            client.close()
        assert statuses(raw) == [status]
        assert handler.requests == []

    no_leaks.run(scenario)


def test_chunked_body_over_the_limit_is_413(no_leaks: Loop) -> None:
    chunks = b"".join(b"100\r\n" + b"x" * 256 + b"\r\n" for _ in range(8)) + b"0\r\n\r\n"
    raw = no_leaks.run(
        exchange(
            Recorder(),
            POST + b"Transfer-Encoding: chunked\r\n\r\n" + chunks,
            Http1Limits(max_body_bytes=1000),
        )
    )
    assert statuses(raw) == [413]


@LOOPS
def test_slow_loris_head_gets_408(no_leaks: Loop) -> None:
    limits = Http1Limits(head_timeout=0.3)
    handler = Recorder()

    async def scenario() -> None:
        async with serving(handler, limits) as server:
            client = await connect(server.port)
            client.write(b"GET / HTTP/1.1\r\nHost: a\r\n")
            answer = asyncio.create_task(read_until_eof(client))
            # One header line at a time, each well within any per-read timeout.
            for i in range(1000):
                if answer.done():
                    break
                client.write(f"X-{i}: 1\r\n".encode())
                await asyncio.sleep(0.02)
            raw = await answer
            client.close()
        assert statuses(raw) == [408]
        assert handler.requests == []

    no_leaks.run(scenario)


def test_idle_keep_alive_connection_is_closed_silently(no_leaks: Loop) -> None:
    limits = Http1Limits(idle_timeout=0.2)

    async def scenario() -> None:
        async with serving(Recorder(), limits) as server:
            client = await connect(server.port)
            client.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            raw = await read_until_eof(client)  # ends: the server closes the idle connection
            client.close()
        assert statuses(raw) == [200]

    no_leaks.run(scenario)


def test_client_gone_mid_body_fails_the_body(no_leaks: Loop) -> None:
    seen: list[str] = []

    async def handler(request: Request) -> Response:
        try:
            await read_all(request.body, 1 << 20)
        except BodyError as e:
            seen.append(str(e))
        return Response(200, [], BufferedBody(b""))

    async def scenario() -> None:
        async with serving(handler) as server:
            client = await connect(server.port)
            client.write(POST + b"Content-Length: 100\r\n\r\nonly-some")
            await client.drain()
            client.write_eof()
            await read_until_eof(client)
            client.close()
        assert len(seen) == 1

    no_leaks.run(scenario)


def test_limits_are_settings() -> None:
    limits = replace(Http1Limits(), max_headers=10)
    assert limits.max_headers == 10


def test_stalled_request_body_fails_the_body(no_leaks: Loop) -> None:
    seen: list[str] = []

    async def handler(request: Request) -> Response:
        try:
            await read_all(request.body, 1 << 20)
        except BodyError as e:
            seen.append(str(e))
        return Response(200, [], BufferedBody(b""))

    async def scenario() -> None:
        async with serving(handler, Http1Limits(body_timeout=0.2)) as server:
            client = await connect(server.port)
            client.write(POST + b"Content-Length: 100\r\n\r\nonly-some")
            raw = await read_until_eof(client)  # the server ends the connection
            client.close()
        assert seen == ["request body stalled"]
        assert statuses(raw) == [408]

    no_leaks.run(scenario)
