"""What an undeclared port speaks, from the client's first bytes: HTTP/2 (prior
knowledge), HTTP/1.x, or anything else (TCP, passed through).

In a server-first protocol (MySQL, SMTP, FTP greet first) the client sends nothing until
the server spoke: if nothing comes within the timeout it is TCP, and the proxy connects
upstream and splices, so the greeting flows as if nobody were in between. What was read is
replayed (`PrefixedStream`).
"""

from __future__ import annotations

import asyncio
import re
from typing import Literal

from waypoint.http.stream import ByteStream

Kind = Literal["h2", "http1", "tcp"]

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DEFAULT_TIMEOUT = 0.2
# A request line starts with a method and a space. Methods are tokens, but in practice
# upper-case letters (and "-"): requiring that keeps banners such as "SSH-2.0-..." and
# binary protocols on the TCP path. 24 bytes (the preface) are the most read to decide.
_DECIDE_BYTES = len(H2_PREFACE)
_METHOD = re.compile(rb"[A-Z][A-Z\-]{2,19} ")
_METHOD_PREFIX = re.compile(rb"[A-Z][A-Z\-]{0,19}")


def classify(prefix: bytes) -> Kind | None:
    """The protocol `prefix` starts, or None if more bytes are needed to tell (pure)."""
    if prefix.startswith(H2_PREFACE):
        return "h2"
    if H2_PREFACE.startswith(prefix):
        return None
    if _METHOD.match(prefix):
        return "http1"
    if _METHOD_PREFIX.fullmatch(prefix):
        return None  # a token so far, the space may still come
    return "tcp"


# The timeout is part of the answer (silence means a server-first protocol), not a bound
# a caller could put around the call instead.
async def sniff(stream: ByteStream, timeout: float = DEFAULT_TIMEOUT) -> tuple[Kind, bytes]:  # noqa: ASYNC109
    """Read the client's first bytes until they tell the protocol, for at most `timeout`
    seconds; (kind, the bytes read). Silence, an ended stream or anything not HTTP is TCP."""
    prefix = b""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        kind = classify(prefix) if prefix else None
        if kind is not None:
            return kind, prefix
        if len(prefix) >= _DECIDE_BYTES:
            return "tcp", prefix
        left = deadline - loop.time()
        if left <= 0:
            return "tcp", prefix
        try:
            async with asyncio.timeout(left):
                data = await stream.read(_DECIDE_BYTES - len(prefix))
        except TimeoutError:
            return "tcp", prefix
        if not data:
            return "tcp", prefix
        prefix += data


class PrefixedStream:
    """A `ByteStream` that returns `prefix` first, then reads from `inner`."""

    __slots__ = ("_inner", "_prefix")

    def __init__(self, inner: ByteStream, prefix: bytes) -> None:
        self._inner = inner
        self._prefix = prefix

    async def read(self, max_bytes: int = 65536) -> bytes:
        if self._prefix:
            data, self._prefix = self._prefix[:max_bytes], self._prefix[max_bytes:]
            return data
        return await self._inner.read(max_bytes)

    def write(self, data: bytes) -> None:
        self._inner.write(data)

    async def drain(self) -> None:
        await self._inner.drain()

    def write_eof(self) -> None:
        self._inner.write_eof()

    def abort(self, reason: str) -> None:
        self._prefix = b""
        self._inner.abort(reason)

    @property
    def closed(self) -> bool:
        return self._inner.closed
