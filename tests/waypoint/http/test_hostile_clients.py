"""What a hostile HTTP client of the waypoint may cost, on loopback TCP: limits that end
one request leave the connection serving the next, and a client that pipelines without
reading stops being read (the server holds one request at a time)."""

from __future__ import annotations

import asyncio
import socket

import h2.events

from tests.support.aio import Loop
from tests.waypoint.http.loopback import Server
from tests.waypoint.http.test_h2 import echo, events_until, h2_server, raw_h2
from waypoint.http.h1server import serve_http1
from waypoint.http.h2base import Http2Limits
from waypoint.http.message import BufferedBody, Request, Response
from waypoint.http.stream import ByteStream

GET = [(":method", "GET"), (":scheme", "http"), (":authority", "a"), (":path", "/")]


def test_too_many_header_fields_get_431_and_the_connection_goes_on(no_leaks: Loop) -> None:
    async def scenario() -> None:
        async with h2_server(echo, Http2Limits(max_headers=20)) as server:
            stream, conn = await raw_h2(server.port)
            # Tiny fields: far under the header list size, over the count.
            conn.send_headers(1, [*GET, *[(f"x-{i}", "") for i in range(40)]], end_stream=True)
            stream.write(conn.data_to_send())
            first = await events_until(stream, conn, h2.events.StreamEnded)
            conn.send_headers(3, GET, end_stream=True)
            stream.write(conn.data_to_send())
            second = await events_until(stream, conn, h2.events.StreamEnded)
            stream.close()
        statuses = [
            dict(e.headers)[b":status"]
            for e in first + second
            if isinstance(e, h2.events.ResponseReceived)
        ]
        assert statuses == [b"431", b"200"]

    no_leaks.run(scenario)


def test_a_pipelining_client_that_never_reads_stops_being_read(no_leaks: Loop) -> None:
    """500 000 pipelined GETs (23 MB) whose answers are never read: the server answers
    until its socket's send buffer is full, then stops reading; what it took stays within
    the kernel's buffers, and the handler ran a bounded number of times."""
    served = 0
    request = b"GET / HTTP/1.1\r\nhost: a\r\nx-pad: 0123456789\r\n\r\n"
    answer = b"x" * 4096  # answers larger than the requests: the send side fills first

    async def handler(_: Request) -> Response:
        nonlocal served
        served += 1
        return Response(200, [], BufferedBody(answer))

    async def on_stream(stream: ByteStream) -> None:
        await serve_http1(stream, handler)

    async def scenario() -> None:
        async with Server(on_stream) as server:
            loop = asyncio.get_running_loop()
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", server.port))
            flood = memoryview(request * 500_000)
            sent = 0
            try:
                while sent < len(flood):
                    try:
                        async with asyncio.timeout(3.0):
                            await loop.sock_sendall(sock, flood[sent : sent + 65536])
                        sent += len(flood[sent : sent + 65536])
                    except TimeoutError:
                        break  # the server stopped taking bytes
            finally:
                sock.close()
        assert sent < len(flood)
        # Each answer is ~4.1 KB; the send buffers in between hold a few MB at most.
        assert served < 2_000

    no_leaks.run(scenario)
