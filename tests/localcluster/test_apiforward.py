"""The API server forwarder on loopback: bytes both ways, half-closes, and its bounds."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

from localcluster.kube.apiforward import ApiForwarder, ForwardLimits

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _upstream(handler: Handler) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _forwarder(port: int, limits: ForwardLimits) -> tuple[ApiForwarder, int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    fwd = ApiForwarder("127.0.0.1", port, limits)
    await fwd.start(sock)
    return fwd, sock.getsockname()[1]


async def _until(cond: Callable[[], bool]) -> None:
    for _ in range(500):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in 5 s")


async def _echo_then_close(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    # Echoes until the client half-closes, then says goodbye and closes.
    while data := await r.read(65536):
        w.write(data)
        await w.drain()
    w.write(b"bye")
    await w.drain()
    w.close()


def test_bytes_pass_both_ways_and_half_close_is_passed_on() -> None:
    async def main() -> None:
        up, port = await _upstream(_echo_then_close)
        fwd, fport = await _forwarder(port, ForwardLimits())
        try:
            r, w = await asyncio.open_connection("127.0.0.1", fport)
            big = bytes(range(256)) * 4096  # 1 MiB, more than one read
            w.write(b"hello")
            assert await r.readexactly(5) == b"hello"
            w.write(big)
            assert await r.readexactly(len(big)) == big
            w.write_eof()
            assert await r.read() == b"bye"  # the EOF reached the server; its close came back
            w.close()
            assert fwd.accepted == 1
        finally:
            await fwd.close()
            up.close()

    asyncio.run(main())


async def _hold(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    await r.read()
    w.close()


def test_connection_cap_closes_the_excess() -> None:
    async def main() -> None:
        up, port = await _upstream(_hold)
        fwd, fport = await _forwarder(port, ForwardLimits(max_connections=2))
        try:
            held = []
            for _ in range(2):
                r, w = await asyncio.open_connection("127.0.0.1", fport)
                w.write(b"x")
                held.append((r, w))
            await _until(lambda: fwd.active == 2)
            r, w = await asyncio.open_connection("127.0.0.1", fport)
            assert await r.read() == b""
            assert fwd.refused == 1
            for _, hw in held:
                hw.close()
            w.close()
        finally:
            await fwd.close()
            up.close()

    asyncio.run(main())


def test_silent_client_and_idle_connection_are_closed() -> None:
    async def main() -> None:
        up, port = await _upstream(_hold)
        limits = ForwardLimits(first_byte_timeout=0.2, idle_timeout=0.3)
        fwd, fport = await _forwarder(port, limits)
        try:
            # Never sends a byte: closed after the first-byte bound.
            r, w = await asyncio.open_connection("127.0.0.1", fport)
            assert await asyncio.wait_for(r.read(), 5) == b""
            w.close()
            # Sends, then nothing moves either way: closed after the idle bound.
            r, w = await asyncio.open_connection("127.0.0.1", fport)
            w.write(b"x")
            assert await asyncio.wait_for(r.read(), 5) == b""
            w.close()
            await _until(lambda: fwd.active == 0)
        finally:
            await fwd.close()
            up.close()

    asyncio.run(main())


def test_upstream_down_closes_the_client() -> None:
    async def main() -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            dead = s.getsockname()[1]  # nothing listens once closed
        fwd, fport = await _forwarder(dead, ForwardLimits())
        try:
            r, w = await asyncio.open_connection("127.0.0.1", fport)
            w.write(b"x")
            assert await asyncio.wait_for(r.read(), 5) == b""
            w.close()
        finally:
            await fwd.close()

    asyncio.run(main())
