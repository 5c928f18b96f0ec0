"""The HTTP exchange as the waypoint's filters and router see it, whatever the wire.

A codec (HTTP/1.1 or HTTP/2) turns bytes into a `Request` and writes a `Response`; the
router, the filters and the upstream client work on these alone. Header names are
lower-case `str`, order and repeats kept; hop-by-hop headers (`connection`, `keep-alive`,
`transfer-encoding`, `te` other than `trailers`, `upgrade`, `proxy-connection`) never
appear here: each codec consumes them on the way in and writes its own on the way out.

Bodies stream: a `Body` is read chunk by chunk, so a gRPC server stream or a large upload
passes through without being held whole. A body that a retry may need to resend is
buffered by the caller up to a bound (`BufferedBody`).
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from waypoint.http.stream import ByteStream

Headers = list[tuple[str, str]]

HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te"}
)


class Wire(enum.Enum):
    """How a message travelled (`request_protocol` in the metrics: http or grpc is derived)."""

    HTTP11 = "HTTP/1.1"
    HTTP2 = "HTTP/2"


class Body(Protocol):
    """A message body, read once, chunk by chunk."""

    async def read(self) -> bytes:
        """The next chunk; b"" once the body is complete (then `trailers` is final)."""

    @property
    def length(self) -> int | None:
        """The declared length (Content-Length), if the sender declared one."""

    @property
    def trailers(self) -> Headers:
        """Trailers that followed the body (gRPC status lives here); [] if none."""


class BufferedBody:
    """A body held in memory: a fixed payload, or one read whole so it can be sent again."""

    __slots__ = ("_data", "_done", "_trailers")

    def __init__(self, data: bytes = b"", trailers: Headers | None = None) -> None:
        self._data = data
        self._done = False
        self._trailers = trailers or []

    async def read(self) -> bytes:
        data = self.take()
        return b"" if data is None else data

    @property
    def length(self) -> int | None:
        return len(self._data)

    @property
    def trailers(self) -> Headers:
        return self._trailers

    @property
    def data(self) -> bytes:
        return self._data

    def take(self) -> bytes | None:
        """The whole body at once, as `read` would give it; None if it was read already."""
        if self._done:
            return None
        self._done = True
        return self._data

    def replay(self) -> BufferedBody:
        """A fresh copy for another attempt."""
        return BufferedBody(self._data, self._trailers)


EMPTY = b""


class StreamBody:
    """A body fed by a codec as bytes arrive, read by whoever forwards it.

    Bounded: `feed` returns False once `high_water` bytes wait unread, and the codec stops
    reading its socket until `wait_writable()` returns; so a slow upstream slows the client
    instead of growing memory here.
    """

    __slots__ = (
        "_chunks",
        "_ended",
        "_error",
        "_length",
        "_queued",
        "_readable",
        "_trailers",
        "_writable",
        "high_water",
    )

    def __init__(self, length: int | None = None, high_water: int = 256 * 1024) -> None:
        self._chunks: list[bytes] = []
        self._queued = 0
        self._ended = False
        self._error: str | None = None
        self._trailers: Headers = []
        self._length = length
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self.high_water = high_water

    # The codec's side.
    def feed(self, data: bytes) -> bool:
        if data:
            self._chunks.append(data)
            self._queued += len(data)
            self._readable.set()
        if self._queued >= self.high_water:
            self._writable.clear()
            return False
        return True

    async def wait_writable(self) -> None:
        await self._writable.wait()

    @property
    def writable(self) -> bool:
        """Below the high-water mark: the codec may feed more."""
        return self._writable.is_set()

    def end(self, trailers: Headers | None = None) -> None:
        self._trailers = trailers or []
        self._ended = True
        self._readable.set()

    def fail(self, reason: str) -> None:
        """The sender went away mid-body: the reader gets `BodyError`."""
        self._error = reason
        self._readable.set()

    # The reader's side.
    async def read(self) -> bytes:
        while not self._chunks:
            if self._error is not None:
                raise BodyError(self._error)
            if self._ended:
                return EMPTY
            self._readable.clear()
            await self._readable.wait()
        data = b"".join(self._chunks) if len(self._chunks) > 1 else self._chunks[0]
        self._chunks.clear()
        self._queued = 0
        self._writable.set()
        return data

    @property
    def length(self) -> int | None:
        return self._length

    @property
    def trailers(self) -> Headers:
        return self._trailers

    @property
    def ended(self) -> bool:
        return self._ended


class BodyError(Exception):
    """A body ended early: the peer reset or closed before the message was complete."""


async def read_all(body: Body, limit: int) -> bytes | None:
    """The whole body if it is at most `limit` bytes, else None (what was read is lost:
    only call this on a body you may still answer with an error)."""
    parts: list[bytes] = []
    size = 0
    while chunk := await body.read():
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
    return b"".join(parts)


# After a 101 the connection is no longer HTTP: the codec hands the client's byte stream to
# this callback (any bytes read past the request head are already in `leftover`), which
# splices it to the upstream's and returns when both directions are done.
UpgradeSplice = Callable[[ByteStream, bytes], Awaitable[None]]


@dataclass(slots=True)
class Request:
    method: str
    authority: str  # Host (HTTP/1.1) or :authority (HTTP/2)
    path: str  # origin-form target, query included ("/a/b?x=1")
    headers: Headers
    body: Body = field(default_factory=BufferedBody)
    scheme: str = "http"
    wire: Wire = Wire.HTTP11
    # The protocol the client asked to switch to (Upgrade: websocket), if any.
    upgrade: str | None = None

    def header(self, name: str) -> str | None:
        """The first value of `name` (lower-case), or None."""
        for k, v in self.headers:
            if k == name:
                return v
        return None


@dataclass(slots=True)
class Response:
    status: int
    headers: Headers = field(default_factory=list)
    body: Body = field(default_factory=BufferedBody)
    # Set on a 101 answer to an upgrade request: the codec runs it after writing the head.
    upgraded: UpgradeSplice | None = None

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None


def text_response(status: int, text: str, headers: Headers | None = None) -> Response:
    """A small plain-text answer the waypoint makes itself (403, 503, 504, ...)."""
    body = text.encode()
    return Response(
        status,
        [("content-type", "text/plain"), ("content-length", str(len(body))), *(headers or [])],
        BufferedBody(body),
    )


# What serves a request: the router, or a test's function.
Handler = Callable[[Request], Awaitable[Response]]
