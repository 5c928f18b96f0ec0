"""One HBONE CONNECT stream as an awaitable byte stream, for a proxy that parses what it
carries (the waypoint's HTTP codecs) rather than splicing it to a socket (`relay`).

The tunnel splices bytes without looking at them and keeps no coroutine per connection;
the waypoint reads requests out of the stream, so an `async read()` is the natural shape
there. Flow control is kept honest: receive credit goes back to the peer only when `read()`
hands the bytes to the caller, so a slow consumer stalls its sender instead of growing a
buffer here; `drain()` waits while the stream's send queue or the TLS connection pushes
back.

Both ends use it: the server side answers a CONNECT (`accept`), the client side opens one
(`open`) and waits for the 200.
"""

from __future__ import annotations

import asyncio
from collections import deque

from meshcore.hbone.conn import Headers, error_name
from meshcore.hbone.h2frames import ErrorCode
from meshcore.hbone.transport import H2Transport

EOF_CHUNK = b""


class HboneStreamError(ConnectionError):
    """The CONNECT was refused or the stream was reset; the message says which."""


class HboneStream:
    """A `ByteStream` over one CONNECT stream (implements StreamHandler and
    BackpressureListener for the transport)."""

    __slots__ = (
        "_chunks",
        "_ended",
        "_readable",
        "_response",
        "_send_ready",
        "_wrote_eof",
        "h2",
        "received",
        "reset_code",
        "sent",
        "sid",
    )

    def __init__(self, h2: H2Transport, sid: int = 0) -> None:
        self.h2 = h2
        self.sid = sid
        self._chunks: deque[bytes] = deque()
        self._ended = False  # the peer's END_STREAM arrived
        self._wrote_eof = False
        self.reset_code: int | None = None
        self._readable = asyncio.Event()
        self._send_ready = asyncio.Event()
        self._send_ready.set()
        self._response: asyncio.Future[tuple[int, Headers]] | None = None
        self.sent = 0
        self.received = 0

    # ---- the two ways to get one ----------------------------------------------------------

    @classmethod
    def accept(cls, h2: H2Transport, sid: int) -> HboneStream:
        """Server side: answer the CONNECT on `sid` with 200 and carry its payload."""
        stream = cls(h2, sid)
        h2.conn.respond(sid, 200, stream, end=False)
        h2.listeners[stream] = None
        h2.flush()
        return stream

    @classmethod
    async def open(
        cls, h2: H2Transport, headers: Headers, answer_within: float, reserved: bool = False
    ) -> HboneStream:
        """Client side: send the CONNECT and wait for a 200. `reserved`: the pool reserved a
        stream slot on `h2` for this call (ConnectionPool.checkout)."""
        stream = cls(h2)
        loop = asyncio.get_running_loop()
        stream._response = loop.create_future()
        if reserved:
            h2.reserved -= 1
        stream.sid = h2.open_stream(headers, stream)
        h2.listeners[stream] = None
        try:
            status, _ = await asyncio.wait_for(asyncio.shield(stream._response), answer_within)
        except TimeoutError:
            stream.abort("no answer to CONNECT")
            raise HboneStreamError(f"no answer to CONNECT within {answer_within:g}s") from None
        if status != 200:
            stream.abort(f"CONNECT answered {status}")
            raise HboneStreamError(f"CONNECT refused with {status}")
        return stream

    # ---- ByteStream ------------------------------------------------------------------------

    async def read(self, max_bytes: int = 65536) -> bytes:
        while not self._chunks:
            if self._ended or self.reset_code is not None:
                return EOF_CHUNK
            self._readable.clear()
            await self._readable.wait()
        data = self._chunks.popleft()
        if len(data) > max_bytes:
            self._chunks.appendleft(data[max_bytes:])
            data = data[:max_bytes]
        # The caller has the bytes: only now does the peer get the credit back (sent with
        # whatever else this turn writes). Credit goes back in batches, so most reads owe
        # no frame: then nothing is scheduled (a scheduled flush is a loop turn of its own
        # for a waypoint that read a request and has not answered yet).
        conn = self.h2.conn
        conn.ack(self.sid, len(data))
        if conn.out:
            self.h2.flush_soon()
        return data

    def write(self, data: bytes) -> None:
        if not data or self._wrote_eof or self.reset_code is not None:
            return
        self.sent += len(data)
        if not self.h2.conn.send_data(self.sid, data):
            self._send_ready.clear()
        self.h2.flush_soon()

    async def drain(self) -> None:
        ready = self._send_ready
        while self.reset_code is None and not self.h2.conn.closed:
            if self.h2.write_paused:
                ready.clear()  # the TLS connection is full: resume_producing wakes us
            elif ready.is_set():
                return
            self.h2.conn.notify_when_drained(self.sid)
            await ready.wait()

    def write_eof(self) -> None:
        if self._wrote_eof or self.reset_code is not None:
            return
        self._wrote_eof = True
        self.h2.conn.end_stream(self.sid)
        self.h2.flush_soon()
        self._forget_if_done()

    def abort(self, reason: str) -> None:
        if self.reset_code is None:
            self.reset_code = ErrorCode.CANCEL
            self.h2.conn.reset(self.sid, ErrorCode.CANCEL)
            self.h2.flush()
        self._wake_all()
        self.h2.listeners.pop(self, None)

    @property
    def closed(self) -> bool:
        return self.reset_code is not None or (self._ended and self._wrote_eof)

    # ---- StreamHandler (called by the connection) ------------------------------------------

    def on_response(self, status: int, headers: Headers) -> None:
        if self._response is not None and not self._response.done():
            self._response.set_result((status, headers))

    def on_data(self, data: memoryview) -> None:
        # Copied: the view belongs to the process's shared receive buffer. The stream window
        # (4 MiB) bounds what can wait here unread.
        n = len(data)
        self.received += n
        self._chunks.append(bytes(data))
        self._readable.set()

    def on_end(self) -> None:
        self._ended = True
        self._readable.set()
        self._forget_if_done()

    def on_reset(self, code: int) -> None:
        self.reset_code = code
        if self._response is not None and not self._response.done():
            self._response.set_exception(
                HboneStreamError(f"CONNECT stream reset ({error_name(code)})")
            )
            self._response.exception()  # seen: the opener reports it
        self._wake_all()
        self.h2.listeners.pop(self, None)

    def on_send_ready(self) -> None:
        self._send_ready.set()

    # ---- BackpressureListener (the TLS connection) ------------------------------------------

    def pause_producing(self) -> None:
        pass  # drain() reads h2.write_paused itself

    def resume_producing(self) -> None:
        self._send_ready.set()

    # ---- helpers ---------------------------------------------------------------------------

    def _wake_all(self) -> None:
        self._readable.set()
        self._send_ready.set()

    def _forget_if_done(self) -> None:
        if self._ended and self._wrote_eof:
            self.h2.listeners.pop(self, None)
