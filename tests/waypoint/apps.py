"""Small HTTP/1.1 apps for the waypoint's tests (real sockets; keep-alive; each answer
says which app served it)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    body = b""
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            body += await reader.readexactly(size)
            await reader.readexactly(2)
    return method, target, headers, body


def app(
    name: str,
    status: int = 200,
    delay: float = 0.0,
    reset_every: int = 0,
    seen: list[dict[str, object]] | None = None,
) -> Serve:
    """An app that answers every request with JSON naming itself, the method, path and the
    headers it got. `reset_every`: every n-th connection is reset before an answer (a
    flaky replica); `delay`: seconds before each answer."""
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        try:
            while True:
                try:
                    method, target, headers, body = await _read_request(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                if reset_every and connections % reset_every == 0:
                    writer.transport.abort()
                    return
                if delay:
                    await asyncio.sleep(delay)
                info = {"app": name, "method": method, "path": target, "headers": headers,
                        "body": len(body)}  # fmt: skip
                if seen is not None:
                    seen.append(info)
                data = json.dumps(info).encode()
                writer.write(
                    f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n"
                    f"content-length: {len(data)}\r\nx-served-by: {name}\r\n\r\n".encode()
                    + (b"" if method == "HEAD" else data)  # a HEAD answer has no body
                )
                await writer.drain()
        finally:
            writer.close()

    return serve


def get(
    path: str, host: str = "web", method: str = "GET", headers: str = "", body: bytes = b""
) -> bytes:
    extra = f"content-length: {len(body)}\r\n" if body or method in ("POST", "PUT") else ""
    return (
        f"{method} {path} HTTP/1.1\r\nhost: {host}\r\n{headers}{extra}connection: close\r\n\r\n"
    ).encode() + body


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one HTTP/1.1 answer read whole."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    if headers.get("transfer-encoding") == "chunked":
        out = b""
        rest = body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            out += rest[:size]
            rest = rest[size + 2 :]
        body = out
    return status, headers, body
