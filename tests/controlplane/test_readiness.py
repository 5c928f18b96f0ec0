"""The control plane's readiness port: the node HTTP server's bounds, and its one route."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from controlplane.__main__ import ControlPlaneReadiness
from tests.support.aio import run


async def get(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /ready HTTP/1.1\r\n\r\n")
    async with asyncio.timeout(10):
        raw = await reader.read()
    writer.close()
    return raw


def test_ready_once_the_first_state_is_pushed_and_bounded_like_the_proxies() -> None:
    controller: Any = SimpleNamespace(state=None)

    async def main() -> None:
        server = ControlPlaneReadiness(controller, 0, "127.0.0.1")
        await server.start()
        try:
            assert (await get(server.port)).startswith(b"HTTP/1.1 503")
            controller.state = object()
            assert (await get(server.port)).startswith(b"HTTP/1.1 200")
            # A slow-loris connection for every slot does not keep the probe out.
            held = []
            for _ in range(server._max_connections + 5):
                _, writer = await asyncio.open_connection("127.0.0.1", server.port)
                writer.write(b"GET /ready HTTP/1.1\r\n")
                held.append(writer)
            assert (await get(server.port)).startswith(b"HTTP/1.1 200")
            for writer in held:
                writer.close()
        finally:
            await server.close()

    run(main)
