"""The byte stream an HTTP codec reads and writes: a CONNECT stream's payload, a TCP socket,
or an in-memory pipe in tests. Codecs see only this protocol, so the same code serves a
request that arrived over HBONE and one a test wrote into a pipe.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol


class ByteStream(Protocol):
    async def read(self, max_bytes: int = 65536) -> bytes:
        """Up to `max_bytes`, at least one; b"" once the peer has ended its side (or on abort)."""

    def write(self, data: bytes) -> None:
        """Queue bytes; never blocks. Call `drain()` to respect back-pressure."""

    async def drain(self) -> None:
        """Wait until the queued bytes are below the stream's high-water mark."""

    def write_eof(self) -> None:
        """End our side (FIN / END_STREAM) after every queued byte."""

    def abort(self, reason: str) -> None:
        """End both sides at once (RST / RST_STREAM); pending reads return b""."""

    @property
    def closed(self) -> bool:
        """Both sides have ended, or the stream was aborted."""


class AsyncioByteStream:
    """`ByteStream` over an asyncio StreamReader/StreamWriter pair (a TCP socket)."""

    __slots__ = ("_aborted", "_reader", "_writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._aborted = False

    async def read(self, max_bytes: int = 65536) -> bytes:
        if self._aborted:
            return b""
        try:
            return await self._reader.read(max_bytes)
        except (ConnectionError, OSError):
            return b""

    def write(self, data: bytes) -> None:
        if not self._writer.is_closing():
            self._writer.write(data)

    async def drain(self) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.drain()

    def write_eof(self) -> None:
        if not self._writer.is_closing() and self._writer.can_write_eof():
            with contextlib.suppress(OSError):
                self._writer.write_eof()

    def abort(self, reason: str) -> None:
        self._aborted = True
        transport = self._writer.transport
        if not transport.is_closing():
            transport.abort()

    def close(self) -> None:
        self._writer.close()

    @property
    def closed(self) -> bool:
        return self._aborted or self._writer.is_closing()


class _PipeEnd:
    """One end of `pipe()`: what one side writes, the other reads."""

    __slots__ = ("_aborted", "_eof", "_inbox", "_peer", "_waiter", "_wrote_eof")

    def __init__(self) -> None:
        self._inbox = bytearray()
        self._peer: _PipeEnd | None = None
        self._eof = False
        self._aborted = False
        self._wrote_eof = False
        self._waiter: asyncio.Future[None] | None = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def read(self, max_bytes: int = 65536) -> bytes:
        while not self._inbox and not self._eof and not self._aborted:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
            self._waiter = None
        if self._aborted:
            return b""
        data = bytes(self._inbox[:max_bytes])
        del self._inbox[:max_bytes]
        return data

    def write(self, data: bytes) -> None:
        peer = self._peer
        if peer is None or self._wrote_eof or self._aborted or peer._aborted:
            return
        peer._inbox += data
        peer._wake()

    async def drain(self) -> None:
        return None

    def write_eof(self) -> None:
        self._wrote_eof = True
        if self._peer is not None:
            self._peer._eof = True
            self._peer._wake()

    def abort(self, reason: str) -> None:
        for end in (self, self._peer):
            if end is not None:
                end._aborted = True
                end._wake()

    @property
    def closed(self) -> bool:
        return self._aborted or (self._eof and self._wrote_eof)


def pipe() -> tuple[ByteStream, ByteStream]:
    """Two connected in-memory `ByteStream`s (unbounded; for tests and in-process hops)."""
    a, b = _PipeEnd(), _PipeEnd()
    a._peer, b._peer = b, a
    return a, b
