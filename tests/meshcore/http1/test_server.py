"""The node HTTP server over real loopback sockets: good requests, and every kind of bad
input answered with a clear status instead of a crash or a hang."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest

from meshcore.http1.server import NodeHttpServer, Request, Response, Routes
from tests.support.aio import wait_until


class EchoServer(NodeHttpServer):
    """Answers what it was asked; /boom raises."""

    async def _echo(self, request: Request) -> Response:
        return Response.json(
            {
                "method": request.method,
                "path": request.path,
                "query": dict(request.query),
                "body": request.body.decode(errors="replace"),
                "host": request.headers.get("host"),
                "remote": request.remote,
            }
        )

    async def _boom(self, request: Request) -> Response:
        raise RuntimeError("handler exploded")

    release: asyncio.Event | None = None  # /hold answers once it is set

    async def _hold(self, request: Request) -> Response:
        if self.release is None:
            self.release = asyncio.Event()
        await self.release.wait()
        return Response.text("released")

    def routes(self) -> Routes:
        return {
            "/echo": {"GET": self._echo, "POST": self._echo},
            "/a b/é": {"GET": self._echo},
            "/boom": {"GET": self._boom},
            "/hold": {"GET": self._hold},
        }


async def started(**kw: Any) -> EchoServer:
    server = EchoServer(0, "127.0.0.1", **kw)
    await server.start()
    return server


async def exchange(
    port: int, data: bytes, *, half_close: bool = False
) -> tuple[int, dict[str, str], bytes]:
    """Send `data`, read the answer to EOF; (status, headers, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        if half_close:
            writer.write_eof()
        async with asyncio.timeout(10):
            raw = await reader.read(-1)
    finally:
        writer.close()
    return parse(raw)


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep, f"no complete response: {raw[:200]!r}"
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1.1 ")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    assert int(headers["content-length"]) == len(body)
    assert headers["connection"] == "close"
    return int(lines[0].split(" ")[1]), headers, body


async def answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One answer read off a connection that may stay open: (status, headers, body)."""
    async with asyncio.timeout(10):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head[:-4].decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers["content-length"]))
    return int(lines[0].split(" ")[1]), headers, body


# -- good requests ------------------------------------------------------------------------


def test_get_and_post_with_query_and_body(aio):
    async def main() -> None:
        server = aio.closing(await started())
        status, headers, body = await exchange(
            server.port,
            b"GET /echo?a=1&b=two%20words&a=2&flag&plus=x+y HTTP/1.1\r\nHost: h\r\n\r\n",
        )
        assert status == 200
        assert headers["content-type"] == "application/json; charset=utf-8"
        doc = json.loads(body)
        assert doc["method"] == "GET"
        assert doc["query"] == {"a": "1", "b": "two words", "flag": "", "plus": "x y"}
        assert doc["host"] == "h"
        assert doc["remote"] == "127.0.0.1"

        status, _, body = await exchange(
            server.port,
            b"POST /echo HTTP/1.0\r\nContent-Length: 5\r\n\r\nhello",
        )
        assert status == 200
        assert json.loads(body)["body"] == "hello"

        # Percent-decoded path; absolute-form target.
        status, _, body = await exchange(
            server.port, b"GET http://x/a%20b/%C3%A9?q=1 HTTP/1.1\r\n\r\n"
        )
        assert status == 200
        assert json.loads(body)["path"] == "/a b/é"

        # HEAD: the headers of the GET, no body.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"HEAD /echo HTTP/1.1\r\n\r\n")
        raw = await asyncio.wait_for(reader.read(-1), 10)
        writer.close()
        head, _, rest = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK") and rest == b""
        assert b"Content-Length: 0" not in head

    aio.run(main)


def test_unknown_path_is_404_and_a_failing_handler_is_500(aio):
    async def main() -> None:
        server = aio.closing(await started())
        status, headers, body = await exchange(server.port, b"GET /nope HTTP/1.1\r\n\r\n")
        assert (status, body) == (404, b"404: Not Found")
        assert headers["content-type"] == "text/plain; charset=utf-8"
        status, _, body = await exchange(server.port, b"GET /boom HTTP/1.1\r\n\r\n")
        assert status == 500
        assert b"RuntimeError: handler exploded" in body
        # Still serving.
        status, _, _ = await exchange(server.port, b"GET /echo HTTP/1.1\r\n\r\n")
        assert status == 200

    aio.run(main)


# -- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_bytes", "status", "says"),
    [
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400, b"request line"),
        (b"garbage\r\n\r\n", 400, b"request line"),
        (b"GET /echo\r\n\r\n", 400, b"request line"),
        (b"GET  /echo HTTP/1.1\r\n\r\n", 400, b"request line"),
        (b"GET /echo HTTP/1.1 extra\r\n\r\n", 400, b"request line"),
        (b"G(T /echo HTTP/1.1\r\n\r\n", 400, b"method"),
        (b"GET /echo HTTP/x\r\n\r\n", 400, b"version"),
        (b"GET /echo HTTP/2.0\r\n\r\n", 505, b"HTTP/1.0 and HTTP/1.1"),
        (b"GET echo HTTP/1.1\r\n\r\n", 400, b"starting with /"),
        (b"GET /echo?x=%ff HTTP/1.1\r\n\r\n", 400, b"UTF-8"),
        (b"GET /\xc3\xa9 HTTP/1.1\r\n\r\n", 400, b"ASCII"),
        (b"GET /echo HTTP/1.1\r\nno colon here\r\n\r\n", 400, b"malformed header"),
        (b"GET /echo HTTP/1.1\r\nHost : x\r\n\r\n", 400, b"malformed header"),
        (b"GET /echo HTTP/1.1\r\nA: 1\r\n folded\r\n\r\n", 400, b"malformed header"),
        (b"GET /echo HTTP/1.1\r\nA: \x01\r\n\r\n", 400, b"control character"),
        (b"POST /echo HTTP/1.1\r\nContent-Length: x\r\n\r\n", 400, b"Content-Length"),
        (b"POST /echo HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400, b"Content-Length"),
        (
            b"POST /echo HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            400,
            b"conflicting",
        ),
        (
            b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            501,
            b"Content-Length",
        ),
        (b"DELETE /echo HTTP/1.1\r\n\r\n", 405, b"Method Not Allowed"),
        (b"BREW /echo HTTP/1.1\r\n\r\n", 405, b"Method Not Allowed"),
        (b"POST /boom HTTP/1.1\r\n\r\n", 405, b"Method Not Allowed"),
    ],
)
def test_malformed_requests_get_a_clear_error(aio, request_bytes, status, says):
    async def main() -> None:
        server = aio.closing(await started())
        got, headers, body = await exchange(server.port, request_bytes)
        assert got == status, body
        assert says in body
        if status == 405:
            assert headers["allow"] in ("GET, HEAD, POST", "GET, HEAD")
        # The server is unharmed.
        got, _, _ = await exchange(server.port, b"GET /echo HTTP/1.1\r\n\r\n")
        assert got == 200

    aio.run(main)


def test_oversized_head_is_431(aio):
    async def main() -> None:
        server = aio.closing(await started(max_head=4096))
        big = b"GET /echo HTTP/1.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"
        status, _, body = await exchange(server.port, big)
        assert status == 431
        assert b"4096 bytes" in body
        many = b"GET /echo HTTP/1.1\r\n" + b"X: y\r\n" * 2000 + b"\r\n"
        status, _, _ = await exchange(server.port, many)
        assert status == 431
        line = b"GET /" + b"x" * 10000 + b" HTTP/1.1\r\n\r\n"
        status, _, _ = await exchange(server.port, line)
        assert status == 431
        # A head just under the limit is fine.
        ok = b"GET /echo HTTP/1.1\r\nX-Big: " + b"a" * 3000 + b"\r\n\r\n"
        status, _, _ = await exchange(server.port, ok)
        assert status == 200

    aio.run(main)


def test_default_head_limit_is_16k(aio):
    async def main() -> None:
        server = aio.closing(await started())
        big = b"GET /echo HTTP/1.1\r\nX-Big: " + b"a" * (17 * 1024) + b"\r\n\r\n"
        status, _, _ = await exchange(server.port, big)
        assert status == 431
        ok = b"GET /echo HTTP/1.1\r\nX-Big: " + b"a" * (15 * 1024) + b"\r\n\r\n"
        status, _, _ = await exchange(server.port, ok)
        assert status == 200

    aio.run(main)


def test_body_too_large_is_413_before_it_is_read(aio):
    async def main() -> None:
        server = aio.closing(await started(max_body=1024))
        # Only the head is sent: the answer must not wait for the promised body.
        head = b"POST /echo HTTP/1.1\r\nContent-Length: 2000000\r\n\r\n"
        status, _, body = await exchange(server.port, head + b"x" * 5000)
        assert status == 413
        assert b"2000000" in body
        status, _, body = await exchange(
            server.port, b"POST /echo HTTP/1.1\r\nContent-Length: 1024\r\n\r\n" + b"y" * 1024
        )
        assert status == 200
        assert json.loads(body)["body"] == "y" * 1024

    aio.run(main)


def test_body_shorter_than_announced_is_400(aio):
    async def main() -> None:
        server = aio.closing(await started())
        data = b"POST /echo HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc"
        status, _, body = await exchange(server.port, data, half_close=True)
        assert status == 400
        assert b"shorter" in body
        # A head cut short is a 400 too.
        status, _, _ = await exchange(server.port, b"GET /echo HTTP/1.1\r\n", half_close=True)
        assert status == 400

    aio.run(main)


def test_idle_client_is_closed_after_the_read_timeout(aio):
    async def main() -> None:
        server = aio.closing(await started(read_timeout=0.3))
        t0 = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        raw = await asyncio.wait_for(reader.read(-1), 5)  # EOF: the server closed
        elapsed = time.monotonic() - t0
        writer.close()
        assert 0.25 <= elapsed < 3
        assert parse(raw)[0] == 408

        # Slowloris: a head trickled in, a byte at a time, gets no more time than that.
        t0 = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)

        async def trickle() -> None:
            for b in b"GET /echo HTTP/1.1\r\nX: " + b"a" * 100:
                writer.write(bytes([b]))
                await asyncio.sleep(0.05)

        feeder = asyncio.create_task(trickle())
        raw = await asyncio.wait_for(reader.read(-1), 5)
        feeder.cancel()
        writer.close()
        assert time.monotonic() - t0 < 3
        assert parse(raw)[0] == 408

    aio.run(main)


def test_many_concurrent_connections_are_all_served(aio):
    async def main() -> None:
        server = aio.closing(await started(max_connections=300))
        results = await asyncio.gather(
            *(
                exchange(server.port, f"GET /echo?i={i} HTTP/1.1\r\n\r\n".encode())
                for i in range(200)
            )
        )
        assert [json.loads(body)["query"]["i"] for _, _, body in results] == [
            str(i) for i in range(200)
        ]

    aio.run(main)


def test_connections_past_the_limit_get_503_and_the_server_recovers(aio):
    async def main() -> None:
        server = aio.closing(await started(max_connections=4, read_timeout=20))
        held = [
            asyncio.create_task(exchange(server.port, b"GET /hold HTTP/1.1\r\n\r\n"))
            for _ in range(4)
        ]
        await wait_for(lambda: server.release is not None and server._serving == 4)
        # Every slot is answering (none is still reading): nothing to evict.
        status, _, body = await exchange(server.port, b"")
        assert status == 503
        assert b"too many connections" in body
        assert server.release is not None
        server.release.set()
        assert [status for status, _, _ in await asyncio.gather(*held)] == [200] * 4
        status, _, _ = await exchange(server.port, b"GET /echo HTTP/1.1\r\n\r\n")
        assert status == 200

    aio.run(main)


def test_slow_loris_connections_make_room_for_a_client_that_asks_at_once(aio):
    """Connections that never finish their request hold every slot; each new connection
    takes the oldest one's place, so a scraper is answered at once, again and again."""

    async def main() -> None:
        server = aio.closing(await started(max_connections=8, read_timeout=60))
        loris = []
        for _ in range(30):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"GET /echo HTTP/1.1\r\nx-slow: ")  # and never the rest
            loris.append((reader, aio.closing(writer)))
        await wait_for(lambda: server.evicted >= 30 - 8)
        for _ in range(5):
            status, _, _ = await exchange(server.port, b"GET /echo HTTP/1.1\r\n\r\n")
            assert status == 200
        assert server._serving <= 8
        # The oldest were cut off (EOF, no answer); the newest still wait.
        reader, _ = loris[0]
        async with asyncio.timeout(10):
            assert await reader.read() == b""

    aio.run(main)


def test_a_connection_flood_past_the_limit_is_reset_not_queued(aio):
    async def main() -> None:
        server = aio.closing(await started(max_connections=2, read_timeout=20))
        held = [
            asyncio.create_task(exchange(server.port, b"GET /hold HTTP/1.1\r\n\r\n"))
            for _ in range(2)
        ]
        await wait_for(lambda: server.release is not None and server._serving == 2)
        # Two refusals linger (503, then reading what the client still sends); the rest
        # are reset at once, without a task each.
        flood = []
        for _ in range(20):
            _, writer = await asyncio.open_connection("127.0.0.1", server.port)
            flood.append(aio.closing(writer))
        await wait_for(lambda: server.refused + server.reset == 20)
        assert server.refusing_peak <= 2
        assert server.release is not None
        server.release.set()
        await asyncio.gather(*held)

    aio.run(main)


async def wait_for(done: Callable[[], bool]) -> None:
    await wait_until(done, "the server to get there")


def test_close_ends_open_connections_and_frees_the_port(aio):
    async def main() -> None:
        server = aio.closing(await started(read_timeout=60))
        port = server.port
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        aio.closing(writer)
        writer.write(b"GET /echo HTTP/1.1\r\n")  # an unfinished request
        await asyncio.sleep(0.1)
        t0 = time.monotonic()
        await server.close()
        assert time.monotonic() - t0 < 2
        assert await asyncio.wait_for(reader.read(-1), 5) == b""
        writer.close()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()

    aio.run(main)


def test_two_servers_share_a_port_with_reuseport(aio):
    async def main() -> None:
        first = aio.closing(await started())
        second = aio.closing(EchoServer(first.port, "127.0.0.1"))
        await second.start()
        assert second.port == first.port
        await second.close()

    aio.run(main)


async def connect(aio: Any, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to keep, closed when the test ends."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    aio.closing(writer)
    return reader, writer


# -- keep-alive (a server made with max_requests > 1) -----------------------------------------


def test_by_default_a_connection_carries_one_request(aio):
    async def main() -> None:
        server = aio.closing(await started())
        reader, writer = await connect(aio, server.port)
        writer.write(b"GET /echo HTTP/1.1\r\n\r\n" * 2)  # a second one pipelined
        status, headers, _ = await answer(reader)
        assert (status, headers["connection"]) == (200, "close")
        async with asyncio.timeout(10):
            assert await reader.read() == b""  # closed, the second never answered
        assert (server.connections, server.requests) == (1, 1)

    aio.run(main)


def test_a_kept_connection_carries_requests_up_to_its_bound(aio):
    async def main() -> None:
        server = aio.closing(await started(max_requests=3))
        reader, writer = await connect(aio, server.port)
        for n, connection in enumerate(["keep-alive", "keep-alive", "close"]):
            body = f"n={n}".encode()
            writer.write(
                b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n%s"
                % (len(body), body)
            )
            status, headers, raw = await answer(reader)
            assert status == 200
            assert json.loads(raw)["body"] == f"n={n}"  # each answer its own request's
            assert headers["connection"] == connection  # the third is the last: it says so
        async with asyncio.timeout(10):
            assert await reader.read() == b""
        assert (server.connections, server.requests) == (1, 3)

        # Pipelined requests are answered in order; `Connection: close` ends it at once.
        reader, writer = await connect(aio, server.port)
        writer.write(
            b"GET /echo?a=1 HTTP/1.1\r\n\r\n"
            b"GET /echo?a=2 HTTP/1.1\r\nConnection: close\r\n\r\n"
            b"GET /echo?a=3 HTTP/1.1\r\n\r\n"
        )
        for n, connection in ((1, "keep-alive"), (2, "close")):
            status, headers, raw = await answer(reader)
            assert json.loads(raw)["query"] == {"a": str(n)}
            assert headers["connection"] == connection
        async with asyncio.timeout(10):
            assert await reader.read() == b""

        # HTTP/1.0 is closed unless it asks for keep-alive.
        status, _, _ = await exchange(server.port, b"GET /echo HTTP/1.0\r\n\r\n")
        assert status == 200
        assert server.requests == 6

    aio.run(main)


def test_a_bad_request_on_a_kept_connection_is_answered_and_ends_it(aio):
    async def main() -> None:
        server = aio.closing(await started(max_requests=10))
        reader, writer = await connect(aio, server.port)
        writer.write(b"GET /echo HTTP/1.1\r\n\r\nGET /echo HTTP/9.9\r\n\r\n")
        status, headers, _ = await answer(reader)
        assert (status, headers["connection"]) == (200, "keep-alive")
        async with asyncio.timeout(10):
            status, _, body = parse(await reader.read())
        assert status == 505
        assert b"only HTTP/1.0 and HTTP/1.1" in body

    aio.run(main)


def test_a_kept_connection_left_idle_is_closed_without_a_word(aio):
    async def main() -> None:
        server = aio.closing(await started(max_requests=10, idle_timeout=0.3, read_timeout=60))
        reader, writer = await connect(aio, server.port)
        writer.write(b"GET /echo HTTP/1.1\r\n\r\n")
        await answer(reader)
        t0 = time.monotonic()
        async with asyncio.timeout(10):
            assert await reader.read() == b""  # no 408: an idle connection is just closed
        assert 0.25 <= time.monotonic() - t0 < 5

        # Once its next request has begun, it has read_timeout, as any request: a request
        # trickled in past the idle timeout is still answered.
        server2 = aio.closing(await started(max_requests=10, idle_timeout=0.3))
        reader, writer = await connect(aio, server2.port)
        writer.write(b"GET /echo HTTP/1.1\r\n\r\n")
        await answer(reader)
        for part in (b"GE", b"T /echo HTTP/1.1\r\n", b"\r\n"):
            writer.write(part)
            await asyncio.sleep(0.2)
        assert (await answer(reader))[0] == 200

    aio.run(main)


def test_kept_connections_waiting_make_room_for_a_new_client(aio):
    """Idle kept connections hold every slot; a new client takes the oldest one's place."""

    async def main() -> None:
        server = aio.closing(await started(max_connections=4, max_requests=100, idle_timeout=60))
        kept = []
        for _ in range(4):
            reader, writer = await connect(aio, server.port)
            writer.write(b"GET /echo HTTP/1.1\r\n\r\n")
            await answer(reader)
            kept.append(reader)
        for _ in range(3):  # new clients that keep their connections too
            reader, writer = await connect(aio, server.port)
            writer.write(b"GET /echo HTTP/1.1\r\n\r\n")
            assert (await answer(reader))[0] == 200
            kept.append(reader)
        assert (server.evicted, server.refused) == (3, 0)
        for reader in kept[:3]:  # the three oldest idle ones were closed
            async with asyncio.timeout(10):
                assert await reader.read() == b""

    aio.run(main)
