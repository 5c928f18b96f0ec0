"""The node agent's readiness endpoint (`GET /readyz`), as istio-cni's :8000.

200 once the agent has started (its ZDS socket listens and every pod of the first view is
registered), 503 before. Deliberately tiny and bounded: a request head of at most 4 KiB
read within 2 s, 64 connections at a time, one answer per connection; anything else gets
400 or the connection closed. It runs in the node netns (the DaemonSet uses the host
network), so the kubelet's probe reaches it on the node's address.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

MAX_HEAD = 4096
HEAD_TIMEOUT_S = 2.0
MAX_CONNECTIONS = 64


def answer(request_head: bytes, ready: bool) -> bytes:
    """The whole response to one request head (pure)."""
    line = request_head.split(b"\r\n", 1)[0]
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return _response(400, "bad request")
    method, path = parts[0], parts[1].split(b"?", 1)[0]
    if method not in (b"GET", b"HEAD") or path not in (b"/readyz", b"/healthz"):
        return _response(404, "not found")
    if path == b"/healthz" or ready:
        return _response(200, "ok", head_only=method == b"HEAD")
    return _response(503, "starting", head_only=method == b"HEAD")


def _response(status: int, text: str, head_only: bool = False) -> bytes:
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 503: "Service Unavailable"}[status]
    body = (text + "\n").encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    return head if head_only else head + body


class ReadinessServer:
    def __init__(self, port: int, ready: Callable[[], bool], host: str = "0.0.0.0") -> None:
        self.port = port
        self.host = host
        self.ready = ready
        self._server: asyncio.Server | None = None
        self._slots = asyncio.Semaphore(MAX_CONNECTIONS)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._slots.locked():
            writer.close()  # over the cap: closed, not queued
            return
        async with self._slots:
            try:
                async with asyncio.timeout(HEAD_TIMEOUT_S):
                    head = await reader.readuntil(b"\r\n\r\n")
                writer.write(answer(head, self.ready()))
                await writer.drain()
            except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                pass
            except OSError:
                pass
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
