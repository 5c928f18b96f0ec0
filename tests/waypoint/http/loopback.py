"""Real sockets on loopback for the codec tests: a server whose connections each run a
coroutine on an `AsyncioByteStream`, a client connection, and the end-of-test check that
nothing was left behind (no task, no socket)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from tests.support.aio import Loop, wait_until
from waypoint.http.stream import AsyncioByteStream, ByteStream

OnStream = Callable[[ByteStream], Awaitable[None]]


class Server:
    """A TCP server on 127.0.0.1; every accepted connection runs `on_stream` and is then
    closed. `close()` stops it and waits for every connection it served to end."""

    def __init__(self, on_stream: OnStream) -> None:
        self._on_stream = on_stream
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self.errors: list[BaseException] = []
        self.port = 0

    async def start(self) -> Server:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        stream = AsyncioByteStream(reader, writer)
        try:
            await self._on_stream(stream)
        except Exception as e:  # recorded: a test asserts none happened
            self.errors.append(e)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            self._conns.discard(task)

    async def __aenter__(self) -> Server:
        return await self.start()

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        await wait_until(lambda: not self._conns, "the server's connections to end")


async def connect(port: int) -> AsyncioByteStream:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    return AsyncioByteStream(reader, writer)


async def read_until_eof(stream: ByteStream) -> bytes:
    out = bytearray()
    while data := await stream.read():
        out += data
    return bytes(out)


async def read_until(stream: ByteStream, marker: bytes) -> bytes:
    out = bytearray()
    while marker not in out:
        data = await stream.read()
        if not data:
            raise AssertionError(f"connection ended before {marker!r}: got {bytes(out)!r}")
        out += data
    return bytes(out)


async def closed_stream(stream: AsyncioByteStream) -> None:
    stream.close()
    await stream._writer.wait_closed()


def tasks_left(aio: Loop) -> list[asyncio.Task[object]]:
    """The tasks still pending on `aio`'s loop while it is not running: every one is a
    leak (the codecs leave nothing running). Gives stragglers up to 5 s to finish."""
    loop = aio._runner.get_loop()
    for _ in range(500):
        left = [t for t in asyncio.all_tasks(loop) if not t.done()]
        if not left:
            return []
        aio.run(asyncio.sleep(0.01))
    return left
