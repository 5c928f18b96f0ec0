"""Sniffing an undeclared port: the classification table, and on loopback TCP a client
that speaks first (HTTP/1.1, HTTP/2, binary) and a server-first protocol whose client waits
for the greeting (it must work unchanged through the TCP path, prefix replayed)."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.aio import Loop
from tests.waypoint.http.loopback import Server, connect, read_until
from waypoint.http.h1client import Http1Client
from waypoint.http.h1server import serve_http1
from waypoint.http.h2client import Http2Client
from waypoint.http.h2server import serve_http2
from waypoint.http.message import BufferedBody, Request, Response, read_all
from waypoint.http.sniff import H2_PREFACE, PrefixedStream, classify, sniff
from waypoint.http.splice import splice
from waypoint.http.stream import ByteStream


@pytest.mark.parametrize(
    ("prefix", "kind"),
    [
        (H2_PREFACE, "h2"),
        (H2_PREFACE + b"\x00\x00", "h2"),
        (b"PRI * HTTP/2", None),
        (b"GET ", "http1"),
        (b"GET /index.html HTTP/1.1\r\n", "http1"),
        (b"M-SEARCH * HTTP/1.1", "http1"),
        (b"OPTIO", None),
        (b"PRI /x HTTP/1.1", "http1"),
        (b"SSH-2.0-OpenSSH_9.6\r\n", "tcp"),
        (b"\x16\x03\x01\x02\x00", "tcp"),
        (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", "tcp"),
        (b"get / HTTP/1.1", "tcp"),
        (b"EHLO mail\r\n", "http1"),
    ],
    ids=[
        "h2-preface",
        "h2-preface-and-frames",
        "h2-preface-so-far",
        "method-and-space",
        "request-line",
        "method-with-dash",
        "method-so-far",
        "pri-method-on-http1",
        "ssh-banner",
        "tls-client-hello",
        "postgres-ssl-request",
        "lower-case-is-not-a-method",
        "an-upper-case-word-and-space-reads-as-http1",
    ],
)
def test_classify(prefix: bytes, kind: str | None) -> None:
    # A client-first line protocol that starts "WORD " is taken for HTTP/1 and then
    # refused by the HTTP parser (400); server-first protocols never get here.
    assert classify(prefix) == kind


async def sniffed(send: bytes) -> tuple[str, bytes]:
    result: asyncio.Future[tuple[str, bytes]] = asyncio.get_running_loop().create_future()

    async def on_stream(stream: ByteStream) -> None:
        result.set_result(await sniff(stream, 0.2))

    async with Server(on_stream) as server:
        client = await connect(server.port)
        client.write(send)
        got = await result
        client.close()
    return got


@pytest.mark.parametrize(
    ("send", "kind"),
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", "http1"),
        (H2_PREFACE, "h2"),
        (b"\x16\x03\x01\x00\x10", "tcp"),
        (b"", "tcp"),
    ],
    ids=["http1", "h2", "tls", "silent-client"],
)
def test_sniff_on_loopback(no_leaks: Loop, send: bytes, kind: str) -> None:
    got_kind, prefix = no_leaks.run(sniffed(send))
    assert got_kind == kind
    assert send.startswith(prefix)


def test_server_first_protocol_works_through_the_tcp_path(no_leaks: Loop) -> None:
    """An SMTP-like server greets first; the client waits for it. The sniffer hears
    silence, says TCP, and the splice carries the greeting and the conversation."""

    async def smtp(stream: ByteStream) -> None:
        stream.write(b"220 mail ready\r\n")
        line = await read_until(stream, b"\r\n")
        stream.write(b"250 hello " + line[5:])
        await stream.drain()

    async def scenario() -> None:
        async with Server(smtp) as upstream:

            async def proxy(stream: ByteStream) -> None:
                kind, prefix = await sniff(stream, 0.2)
                assert kind == "tcp"
                up = await connect(upstream.port)
                try:
                    await splice(PrefixedStream(stream, prefix), up)
                finally:
                    up.close()

            async with Server(proxy) as middle:
                client = await connect(middle.port)
                assert await read_until(client, b"\r\n") == b"220 mail ready\r\n"
                client.write(b"EHLO client\r\n")
                assert await read_until(client, b"\r\n") == b"250 hello client\r\n"
                client.close()
                assert not middle.errors

    no_leaks.run(scenario)


def test_prefixed_stream_replays_then_reads() -> None:
    async def scenario() -> None:
        from waypoint.http.stream import pipe

        a, b = pipe()
        b.write(b"rest")
        b.write_eof()
        stream = PrefixedStream(a, b"GET ")
        assert await stream.read(2) == b"GE"
        assert await stream.read() == b"T "
        assert await stream.read() == b"rest"
        assert await stream.read() == b""

    asyncio.run(scenario())


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=40))
def test_classify_is_total_and_stable(data: bytes) -> None:
    """Any bytes get an answer once enough arrived, and a decided prefix stays decided
    when more bytes follow (so reading more never changes the path taken)."""
    decided = None
    for i in range(1, len(data) + 1):
        kind = classify(data[:i])
        if decided is not None:
            assert kind == decided
        decided = decided or kind
    if len(data) >= len(H2_PREFACE):
        assert classify(data) is not None


async def hello(request: Request) -> Response:
    return Response(200, [("x-wire", request.wire.value)], BufferedBody(b"hi"))


async def sniffing_server(stream: ByteStream) -> None:
    """What the proxy does on an undeclared port: sniff, then the codec with the prefix."""
    kind, prefix = await sniff(stream, 0.2)
    replayed = PrefixedStream(stream, prefix)
    if kind == "h2":
        await serve_http2(replayed, hello)
    elif kind == "http1":
        await serve_http1(replayed, hello)


@pytest.mark.parametrize("wire", ["h2", "http1"])
def test_sniffed_prefix_is_replayed_to_the_codec(no_leaks: Loop, wire: str) -> None:
    async def scenario() -> None:
        async with Server(sniffing_server) as server:
            stream = await connect(server.port)
            client: Http1Client | Http2Client
            client = Http2Client(stream) if wire == "h2" else Http1Client(stream)
            response = await client.send(Request("GET", "svc", "/", []))
            assert await read_all(response.body, 10) == b"hi"
            assert response.header("x-wire") == ("HTTP/2" if wire == "h2" else "HTTP/1.1")
            await client.aclose()
            stream.close()

    no_leaks.run(scenario)
