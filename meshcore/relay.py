"""Moving bytes: an app-side TCP connection joined to an HBONE stream or to another TCP
connection, in both directions, with half-close and back-pressure end to end.

Invariants:
- No unbounded buffering. Bytes read from a TCP side are written on at once; when the
  other side pushes back (TLS write buffer over its high mark, a full HTTP/2 send queue,
  a TCP write buffer over its high mark) reading stops until it drains. HBONE receive
  credit is returned only once the bytes were handed to the app's transport without it
  pushing back, so a slow app stalls the remote sender, not our memory.
- Half-close crosses the tunnel: a TCP FIN becomes END_STREAM and END_STREAM becomes
  FIN (write_eof). The connection ends when both directions ended, or at once on a reset.
- Every relay finishes exactly once, with its byte counts, through `done`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, cast

from meshcore.hbone.conn import MAX_FRAME_SIZE, SEND_LOW_WATER, Headers, error_name
from meshcore.hbone.h2frames import FRAME_HEADER_LEN, ErrorCode
from meshcore.hbone.transport import H2Transport, _ReadBuffer, read_buffer_lent


@dataclass(frozen=True, slots=True)
class RelayResult:
    """What one proxied connection moved. `sent` is toward the destination."""

    sent: int
    received: int
    error: str | None


DoneCallback = Callable[[RelayResult], None]


class _Ends:
    """How a relay announces its end: once, synchronously, to every callback registered
    with `when_done` (a Future per connection, its callback list and copied context would
    cost more than the relay itself; nothing needs to await the end)."""

    __slots__ = ("_watchers", "result")

    def __init__(self) -> None:
        self.result: RelayResult | None = None
        self._watchers: DoneCallback | list[DoneCallback] | None = None

    @property
    def finished(self) -> bool:
        return self.result is not None

    def when_done(self, callback: DoneCallback) -> None:
        """Call `callback(result)` when the relay ends (at once if it has)."""
        if self.result is not None:
            callback(self.result)
        elif self._watchers is None:
            self._watchers = callback
        elif isinstance(self._watchers, list):
            self._watchers.append(callback)
        else:
            self._watchers = [self._watchers, callback]

    def _announce(self, sent: int, received: int, error: str | None) -> None:
        if self.result is not None:
            return
        self.result = result = RelayResult(sent, received, error)
        watchers, self._watchers = self._watchers, None
        if watchers is None:
            return
        for callback in watchers if isinstance(watchers, list) else (watchers,):
            callback(result)


def _lost_reason(exc: Exception | None) -> str:
    return f"connection lost: {exc}" if exc else "closed before both directions ended"


# What one read from an app socket may take: the largest DATA frame we announce (a peer of
# ours accepts as much), so one read is one frame. Four times uvloop's own read size (250
# KB): a quarter of the reads, flushes and TLS writes per MB.
APP_READ_SIZE = MAX_FRAME_SIZE

# Reads up to this size are copied and flushed at the end of the event loop's turn (so an
# answer and the FIN after it share a TLS record); larger ones leave at once from the
# shared buffer. 16 KiB copies in about a microsecond.
DEFERRED_FLUSH_MAX = 16 * 1024


# How many small reads of a connection we opened may look for the FIN behind them and find
# none, before the connection is taken for one that stays open (keep-alive) and no longer
# looked at: two system calls at most for such a connection.
EOF_PEEK_MISSES = 2
_PEEK_FLAGS = socket.MSG_PEEK | socket.MSG_DONTWAIT


class _AppReadBuffer(_ReadBuffer):
    """The buffer every app socket of the process reads into (a BufferedProtocol), with
    FRAME_HEADER_LEN bytes of room before the payload.

    As a plain Protocol, each read would be copied into a new bytes object, and the DATA
    frame's 9-byte header would be a buffer (so a TLS record) of its own. Here the payload
    lands after the room, the header is written into it, and header and payload go to TLS
    as one buffer. Shared: what a sink has to keep (bytes a stream cannot send yet, bytes
    a transport to a slow peer holds) it copies, so a few kept bytes never hold a whole
    buffer; where it cannot choose (a plain transport keeping a view) it calls
    `app_buffer_lent`, and the next read gets another buffer.
    """

    current: bytearray | None = None
    lent: list[bytearray] = []  # process-wide by design
    size = FRAME_HEADER_LEN + APP_READ_SIZE


def app_buffer_lent() -> None:
    """A view of an app read was kept (not sent at once): do not reuse the buffer."""
    _AppReadBuffer.lend()


class _Sink(Protocol):
    def app_data(self, data: bytes | memoryview, framed: memoryview | None) -> None:
        """Bytes read from the app. A view is valid only during the call (see
        `_AppReadBuffer`); `framed` is the same bytes with FRAME_HEADER_LEN bytes of room
        in front, or None (bytes held from before the sink was attached)."""

    def app_last_data(self, data: bytes | memoryview, framed: memoryview | None) -> None:
        """As `app_data`, for bytes the app's FIN is right behind (`app_eof` follows)."""

    def app_eof(self) -> None: ...

    def app_lost(self, exc: Exception | None) -> None: ...

    def app_pause_writing(self) -> None: ...

    def app_resume_writing(self) -> None: ...


class AppSide(asyncio.BufferedProtocol):
    """A plain TCP connection (the app's, or an upstream's) feeding a sink.

    Until a sink is attached, received bytes are held (copied) and reading pauses: that
    bounds the early data to one read. (uvloop ignores pause_reading inside
    connection_made, so the pause happens on the first data instead.) A BufferedProtocol
    only: the event loop ignores get_buffer on a class that is also an asyncio.Protocol.
    """

    __slots__ = (
        "_peek_misses",
        "early",
        "eof",
        "lost",
        "on_eof",
        "on_lost",
        "on_made",
        "paused_writing",
        "peek",
        "sink",
        "transport",
    )

    def __init__(self, on_made: Callable[[AppSide], None] | None = None) -> None:
        self.on_made = on_made  # for accepted connections: start handling them
        # For a book of accepted connections: told once, when the connection is gone, so
        # the book drops it then and keeps nothing of a closed connection.
        self.on_lost: Callable[[AppSide], None] | None = None
        # Told when the app's EOF arrives, before the sink (the accepting proxy's look at
        # the socket's state then: see meshcore.timewait).
        self.on_eof: Callable[[AppSide], None] | None = None
        self.transport: asyncio.Transport | None = None
        self.sink: _Sink | None = None
        self.early: list[bytes] | None = None  # created on first early data (rare)
        self.eof = False
        self.lost: Exception | bool | None = False
        self.paused_writing = False
        # The socket itself, to look for a FIN right behind a small read (`_eof_behind`);
        # None: not looked for.
        self.peek: socket.socket | None = None
        self._peek_misses = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        on_made, self.on_made = self.on_made, None  # once; and not held for the connection
        if on_made is not None:
            on_made(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(_AppReadBuffer.get())[FRAME_HEADER_LEN:]

    def buffer_updated(self, nbytes: int) -> None:
        # The buffer get_buffer gave: the loop reads and hands over before anything else runs.
        framed = memoryview(_AppReadBuffer.get())[: FRAME_HEADER_LEN + nbytes]
        data = framed[FRAME_HEADER_LEN:]
        sink = self.sink
        if sink is not None:
            if self.peek is not None and nbytes <= DEFERRED_FLUSH_MAX and self._eof_behind():
                sink.app_last_data(data, framed)
                self.eof_received()
            else:
                sink.app_data(data, framed)
        else:
            if self.early is None:
                self.early = []
            self.early.append(bytes(data))
            assert self.transport is not None
            self.transport.pause_reading()

    def take_ahead(self, limit: int) -> bytes:
        """The app's first bytes, up to `limit`, taken out to go with the HBONE CONNECT
        (early data) instead of a round trip later, once the answer is in.

        What the loop has read already comes first, then what is waiting in the socket (a
        client usually sends its request as soon as its connect returns, before this
        tunnel has even dialled): one read, never a wait, so a protocol in which the
        server speaks first sends nothing early. The FIN is never taken (a read of 0
        bytes leaves it to the loop), nor anything after a loss. The caller gives the
        bytes back (`give_back`) if the stream is not answered."""
        early, self.early = self.early, None
        got = b"".join(early) if early else b""
        t = self.transport
        if len(got) < limit and not self.eof and self.lost is False and t is not None:
            sock = t.get_extra_info("socket")
            # EAGAIN: nothing there yet; any other error is the loop's to read and report.
            with contextlib.suppress(OSError):
                got += os.read(sock.fileno(), limit - len(got))
        if len(got) > limit:
            self.early = [got[limit:]]
            got = got[:limit]
        return got

    def give_back(self, data: bytes) -> None:
        """Bytes `take_ahead` took that no stream carried: first in line again."""
        if data:
            self.early = [data, *(self.early or ())]

    def _eof_behind(self) -> bool:
        """Whether the peer's FIN is already here, right behind what was just read.

        An app that answers and closes (HTTP/1.0, `Connection: close`) has its answer and
        its FIN arrive together, but the event loop reads the FIN a turn later: the answer
        would leave as a TLS record (DATA) of its own and END_STREAM as another, and the
        client's app, woken by the answer before the FIN reaches it, would close first and
        keep the TIME-WAIT (each one makes every later connect of that app search further
        for a free port). Told now, the sink sends both as one record and the client's app
        gets the answer with the FIN. One peek; a connection whose reads are followed by no
        FIN EOF_PEEK_MISSES times is not looked at again."""
        assert self.peek is not None
        try:
            if self.peek.recv(1, _PEEK_FLAGS) == b"":
                return True
        except BlockingIOError:
            pass  # nothing behind the read yet
        except OSError:
            self.peek = None  # an error is the loop's to read and report
            return False
        # Nothing, or more data (an app streaming small writes): no FIN right behind.
        self._peek_misses += 1
        if self._peek_misses >= EOF_PEEK_MISSES:
            self.peek = None
        return False

    def eof_received(self) -> bool:
        if self.eof:
            return True  # the FIN was seen behind the last read (`_eof_behind`)
        self.eof = True
        if self.on_eof is not None:
            self.on_eof(self)
        if self.sink is not None:
            self.sink.app_eof()
        return True  # keep our write side open: half-close

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc if exc is not None else True
        on_lost, self.on_lost = self.on_lost, None
        if on_lost is not None:
            on_lost(self)
        # The last event: the sink is told and let go. A sink refers back to its app side,
        # and that cycle would leave the whole relay (both sides, the transport, the
        # result) to the cyclic collector; as garbage that outlived a young collection it
        # waits for a full one, and the soak's RSS rose with it between those.
        sink, self.sink = self.sink, None
        if sink is not None:
            sink.app_lost(exc)

    def pause_writing(self) -> None:
        self.paused_writing = True
        if self.sink is not None:
            self.sink.app_pause_writing()

    def resume_writing(self) -> None:
        self.paused_writing = False
        if self.sink is not None:
            self.sink.app_resume_writing()

    def attach(self, sink: _Sink) -> None:
        """Start delivering to `sink`: first what arrived early, then live."""
        self.sink = sink
        early, self.early = self.early, None
        for chunk in early or ():
            sink.app_data(chunk, None)
        if self.eof:
            sink.app_eof()
        if self.lost is not False:
            self.sink = None  # gone already: told once, not kept (see connection_lost)
            sink.app_lost(self.lost if isinstance(self.lost, Exception) else None)
        elif self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()


def _hold_for_fin(t: asyncio.BaseTransport) -> None:
    """The stream's last bytes are about to be written, its end right behind them: hold
    them (TCP_CORK) so the FIN leaves with them in one segment (the kernel sends a FIN
    with what a cork holds, at once). The far app sent its answer and its FIN together; a
    client that gets them apart may close first, before the FIN arrives, and keep the
    TIME-WAIT its server would have kept without the mesh: under churn its TIME-WAITs
    fill its port range, and every connect then searches it (measured: a load generator's
    connects went from 0.24 to 1.1 cores after 40 000 connections in 20 s). Without the
    FIN (the transport closes instead) the close sends what is held."""
    sock = t.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)


class HboneSplice(_Ends):
    """One TCP connection <-> one HTTP/2 CONNECT stream (either end of the tunnel)."""

    __slots__ = (
        "_app_read_paused",
        "_early",
        "_owed",
        "app",
        "down_done",
        "h2",
        "received",
        "reset_code",
        "response",
        "sent",
        "sid",
        "started",
        "up_done",
    )

    def __init__(self, h2: H2Transport, client: bool = False) -> None:
        loop = asyncio.get_running_loop()
        self.h2 = h2
        self.sid = 0
        self.app: AppSide | None = None
        self.sent = 0  # app -> stream
        self.received = 0  # stream -> app
        self.up_done = False
        self.down_done = False
        self.started = False
        self._owed = 0  # receive credit held back while the app pushes back
        # Stream bytes that arrived before the app was attached (None until some do).
        self._early: list[bytes] | None = None
        self._app_read_paused = False
        self.reset_code: int | None = None  # why the stream was reset, if it was
        # The client end awaits the CONNECT's answer; the server end has none to await.
        self.response: asyncio.Future[tuple[int, Headers]] | None = (
            loop.create_future() if client else None
        )
        super().__init__()

    # ---- joining ------------------------------------------------------------------------

    def start(self, app: AppSide) -> None:
        """Both ends exist: move bytes from now on."""
        self.app = app
        self.started = True
        self.h2.listeners[self] = None
        early, self._early = self._early, None
        for chunk in early or ():
            self._to_app(chunk)
        if self.down_done:
            self._app_write_eof()
        if self.result is not None:
            self._close_app(abort=True)
            return
        app.attach(self)
        self.h2.flush()
        self._maybe_finish()

    # ---- StreamHandler: the HTTP/2 side --------------------------------------------------

    def on_response(self, status: int, headers: Headers) -> None:
        if self.response is not None and not self.response.done():
            self.response.set_result((status, headers))

    def on_data(self, data: memoryview) -> None:
        if not self.started:
            # The stream window (4 MiB) bounds what can arrive before we acknowledge it.
            if self._early is None:
                self._early = []
            self._early.append(bytes(data))
            return
        self._to_app(data)

    def _to_app(self, data: bytes | memoryview) -> None:
        n = len(data)
        self.received += n
        app = self.app
        assert app is not None and app.transport is not None
        if app.transport.is_closing():
            self.h2.conn.ack(self.sid, n)
            return
        if self.h2.conn.data_ends_stream and not app.transport.get_write_buffer_size():
            _hold_for_fin(app.transport)
        app.transport.write(data)
        if app.transport.get_write_buffer_size():
            read_buffer_lent()  # the transport may hold this view of the receive buffer
        if app.paused_writing:
            self._owed += n
        else:
            self.h2.conn.ack(self.sid, n)

    def on_end(self) -> None:
        self.down_done = True
        if self.started:
            self._app_write_eof()
            self._maybe_finish()

    def on_reset(self, code: int) -> None:
        self.reset_code = code
        name = error_name(code)
        if self.response is not None and not self.response.done():
            self.response.set_exception(
                ConnectionError(f"HBONE stream reset ({name}): {self.h2.conn.close_reason}")
            )
            # Only the client side awaits the response; mark it seen so a server-side
            # reset is not reported as an unretrieved exception.
            self.response.exception()
        if self.down_done:
            # The peer's side had ended whole (END_STREAM) before the reset: a server may
            # answer in full and then reset to stop what is still coming (RFC 9113 8.1).
            # Its answer is delivered and the app's connection closed after it, not cut;
            # nothing more goes to the peer. (With early data the answer, its end and the
            # reset can all arrive before this end is even started.)
            self.up_done = True
            if self.started:
                self._maybe_finish()
            return
        self._finish(f"stream reset ({name})")
        if self.started:
            self._close_app(abort=True)

    def on_send_ready(self) -> None:
        self.resume_producing()

    # ---- BackpressureListener: TLS write buffer --------------------------------------

    def pause_producing(self) -> None:
        if self.app is not None and self.app.transport is not None and not self._app_read_paused:
            self._app_read_paused = True
            self.app.transport.pause_reading()
        # Whatever paused us, resuming also needs the stream queue drained: be told.
        self.h2.conn.notify_when_drained(self.sid)

    def resume_producing(self) -> None:
        if (
            self._app_read_paused
            and not self.h2.write_paused
            and self.h2.conn.pending(self.sid) <= SEND_LOW_WATER
            and self.app is not None
            and self.app.transport is not None
        ):
            self._app_read_paused = False
            self.app.transport.resume_reading()

    # ---- _Sink: the TCP side -----------------------------------------------------------

    def app_last_data(self, data: bytes | memoryview, framed: memoryview | None) -> None:
        # The END_STREAM that follows rides on this DATA frame (H2Connection.end_stream).
        self.app_data(data, framed)

    def app_data(self, data: bytes | memoryview, framed: memoryview | None) -> None:
        self.sent += len(data)
        h2 = self.h2
        if len(data) <= DEFERRED_FLUSH_MAX:
            # A small read is copied out of the shared buffer and flushed once the event
            # loop's turn is over, not at once: an app that answers and closes (HTTP/1.0,
            # `Connection: close`) has both read in one turn, and its DATA and END_STREAM
            # then leave as one TLS record, not two. The copy costs less than the record.
            more = h2.conn.send_data(self.sid, bytes(data))
            h2.flush_soon()
            if not more or h2.write_paused:
                self.pause_producing()
            return
        # A large read leaves at once, header and payload as one buffer, before the shared
        # buffer is read into again.
        more = h2.conn.send_data(self.sid, data, framed)
        h2.flush()
        if h2.conn.pending(self.sid):
            # No window for some of it yet: the queue keeps copies, not the shared buffer
            # (a few queued bytes must not hold a whole read buffer while the peer waits).
            h2.conn.own_pending(self.sid)
        if h2.transport is not None and h2.transport.get_write_buffer_size():
            # TLS has encrypted (copied) everything it was given; a plain transport (HTTP/2
            # without TLS, in tests) may keep the view itself.
            app_buffer_lent()
        if not more or h2.write_paused:
            self.pause_producing()

    def app_eof(self) -> None:
        self.up_done = True
        self.h2.conn.end_stream(self.sid)
        self.h2.flush_soon()
        self._maybe_finish()

    def app_lost(self, exc: Exception | None) -> None:
        if not (self.up_done and self.down_done):
            self.h2.conn.reset(self.sid, ErrorCode.CANCEL)
            self.h2.flush()
            self._finish(
                f"connection lost: {exc}" if exc else "closed before both directions ended"
            )
        self._finish(None)

    def app_pause_writing(self) -> None:
        pass  # credit is withheld in _to_app while the app's transport pushes back

    def app_resume_writing(self) -> None:
        if self._owed:
            owed, self._owed = self._owed, 0
            self.h2.conn.ack(self.sid, owed)
            self.h2.flush()

    # ---- ending ------------------------------------------------------------------------

    def _app_write_eof(self) -> None:
        t = self.app.transport if self.app is not None else None
        if t is not None and not t.is_closing() and t.can_write_eof():
            t.write_eof()

    def _maybe_finish(self) -> None:
        if self.up_done and self.down_done:
            self._close_app(abort=False)
            self._finish(None)

    def _close_app(self, abort: bool) -> None:
        t = self.app.transport if self.app is not None else None
        if t is not None and not t.is_closing():
            if abort:
                t.abort()
            else:
                t.close()

    def _finish(self, error: str | None) -> None:
        self.h2.listeners.pop(self, None)
        # Credit still held back (bytes the app never took, or that arrived before it was
        # attached) belongs to the shared connection window: return it, or every such
        # stream would shrink that window for good until the connection stalls.
        leftover = self._owed + sum(len(c) for c in self._early or ())
        self._owed = 0
        self._early = None
        if leftover:
            self.h2.conn.ack(self.sid, leftover)
            self.h2.flush()
        self._announce(self.sent, self.received, error)

    def finish_unstarted(self, reason: str) -> None:
        """The stream was answered with an error and never joined to an app."""
        self._finish(reason)

    def abort(self, reason: str) -> None:
        """End both sides now (for example when policy no longer allows the connection)."""
        self.h2.conn.reset(self.sid, ErrorCode.CANCEL)
        self.h2.flush()
        self._close_app(abort=True)
        self._finish(reason)


class _TcpEnd:
    """One direction's view of a TCP<->TCP pipe: bytes read here go to `peer`."""

    __slots__ = ("counter", "peer", "pipe", "side")

    def __init__(self, pipe: TcpPipe, side: AppSide, peer: AppSide, counter: str) -> None:
        self.pipe = pipe
        self.side = side
        self.peer = peer
        self.counter = counter

    def app_data(self, data: bytes | memoryview, framed: memoryview | None) -> None:
        self.pipe.count(self.counter, len(data))
        t = self.peer.transport
        assert t is not None
        # A copy, as uvloop's own reads made: a slow peer's transport keeps what it could not
        # send, and a view would hold the whole shared read buffer for those few bytes.
        t.write(data if isinstance(data, bytes) else data.tobytes())

    def app_last_data(self, data: bytes | memoryview, framed: memoryview | None) -> None:
        t = self.peer.transport
        if t is not None and not t.get_write_buffer_size():
            _hold_for_fin(t)  # the peer gets these bytes and the FIN together
        self.app_data(data, framed)

    def app_eof(self) -> None:
        t = self.peer.transport
        if t is not None and not t.is_closing() and t.can_write_eof():
            t.write_eof()
        self.pipe.eof(self.counter)

    def app_lost(self, exc: Exception | None) -> None:
        self.pipe.lost(self.counter, exc)

    # The peer's write buffer is full: stop reading here until it drains.
    def app_pause_writing(self) -> None:
        t = self.peer.transport
        if t is not None and not t.is_closing():
            t.pause_reading()

    def app_resume_writing(self) -> None:
        t = self.peer.transport
        if t is not None and not t.is_closing():
            t.resume_reading()


class TcpPipe(_Ends):
    """Two TCP connections joined: `client` is the accepted one, `upstream` the one we
    opened. `sent` counts client -> upstream."""

    __slots__ = ("_eofs", "client", "received", "sent", "upstream")

    def __init__(self, client: AppSide, upstream: AppSide) -> None:
        self.client = client
        self.upstream = upstream
        self.sent = 0
        self.received = 0
        self._eofs = 0  # bit 1: client -> upstream ended, bit 2: the other direction
        super().__init__()

    def start(self) -> None:
        # Each side's pause/resume_writing callbacks throttle reading on the other side,
        # so the sink objects are crossed: client's sink writes to upstream, and when the
        # client's write buffer fills, the *upstream* reader pauses.
        self.client.attach(_TcpEnd(self, self.client, self.upstream, "sent"))
        self.upstream.attach(_TcpEnd(self, self.upstream, self.client, "received"))

    def count(self, which: str, n: int) -> None:
        if which == "sent":
            self.sent += n
        else:
            self.received += n

    def eof(self, which: str) -> None:
        self._eofs |= 1 if which == "sent" else 2
        if self._eofs == 3:
            self._close(abort=False)
            self._finish(None)

    def lost(self, which: str, exc: Exception | None) -> None:
        if self._eofs != 3:
            self._close(abort=True)
            self._finish(
                f"connection lost: {exc}" if exc else "closed before both directions ended"
            )

    def abort(self, reason: str) -> None:
        self._close(abort=True)
        self._finish(reason)

    def _close(self, abort: bool) -> None:
        for side in (self.client, self.upstream):
            t = side.transport
            if t is not None and not t.is_closing():
                if abort:
                    t.abort()
                else:
                    t.close()

    def _finish(self, error: str | None) -> None:
        self._announce(self.sent, self.received, error)
