"""The asyncio shell around the sans-IO HTTP/2 connection: one per TLS connection.

It feeds received bytes to `H2Connection`, writes what the connection queued, and turns
TLS back-pressure (pause_writing) into back-pressure on every stream's producer.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Callable
from typing import Protocol, cast

from meshcore.hbone.conn import H2Connection, Headers, StreamHandler, error_name
from meshcore.hbone.h2frames import ErrorCode
from meshcore.hbone.limits import DEFAULT_LIMITS, HboneLimits

# How long a drained connection stays open to refuse late streams before it closes.
DRAIN_CLOSE_GRACE = 1.0


class BackpressureListener(Protocol):
    def pause_producing(self) -> None: ...

    def resume_producing(self) -> None: ...


# Output up to this size is joined into one buffer (one TLS record) per flush.
COALESCE_BYTES = 64 * 1024
# The receive buffer: as large as the TLS transport's own read size.
READ_BUFFER_SIZE = 256 * 1024
# Buffers set aside while app transports still queue views of them (beyond: not kept).
MAX_LENT_BUFFERS = 8


class _ReadBuffer:
    """The receive buffer every HBONE connection of the process reads into.

    As a plain Protocol, the TLS transport would allocate a fresh 256 KiB bytes object per
    read (glibc maps and unmaps that much memory for each: three system calls and a page
    fault per request) and join multi-record reads with a copy. Decrypting into this buffer
    instead costs nothing per read. One buffer serves all connections: a read is handed
    to `buffer_updated` and fully processed before the loop reads anything else.

    Received DATA is passed on as views of this buffer, so it may be reused only once
    nothing holds such a view. Everything the HTTP/2 connection keeps is copied; the one
    holder is an app transport that could not send a view at once and queued it. Whoever
    sees that calls `lend`: the buffer is set aside and the next read gets another. A
    set-aside buffer is taken back once no view of it is left (every view holds a
    reference to it), so a slow app does not cost a new zero-filled 256 KiB per read.
    """

    current: bytearray | None = None
    lent: list[bytearray] = []  # process-wide by design
    size = READ_BUFFER_SIZE  # a subclass for other reads sets its own three attributes

    @classmethod
    def get(cls) -> bytearray:
        buf = cls.current
        if buf is None:
            buf = cls.current = cls._reclaim() or bytearray(cls.size)
        return buf

    @classmethod
    def lend(cls) -> None:
        buf, cls.current = cls.current, None
        if buf is not None and len(cls.lent) < MAX_LENT_BUFFERS:
            cls.lent.append(buf)

    @classmethod
    def _reclaim(cls) -> bytearray | None:
        lent = cls.lent
        for i in range(len(lent)):
            # Held by the list and by getrefcount's argument only: no view is alive.
            if sys.getrefcount(lent[i]) == 2:
                return lent.pop(i)
        return None


def read_buffer_lent() -> None:
    """A view of received data was queued (not sent at once): do not reuse the buffer."""
    _ReadBuffer.lend()


class H2Transport(asyncio.BufferedProtocol):
    """An HTTP/2 connection bound to one (TLS) transport. (A BufferedProtocol only: the
    event loop ignores get_buffer on a class that is also an asyncio.Protocol.)"""

    # Connections of the process that have closed (their TLS state is freed then): a
    # running total, activity for whoever watches for quiet. Process-wide by design.
    closed_total = 0

    def __init__(
        self,
        client: bool,
        on_request: Callable[[H2Transport, int, Headers], None] | None = None,
        on_closed: Callable[[H2Transport], None] | None = None,
        keepalive: bool = True,
        limits: HboneLimits = DEFAULT_LIMITS,
        on_refused: Callable[[H2Transport, str], None] | None = None,
    ) -> None:
        self.conn = H2Connection(client, self, limits)
        self.limits = limits
        # Told once when we end the connection for the peer's misbehaviour (the limit it
        # hit, or the HTTP/2 error it caused), to log and count it.
        self._on_refused = on_refused
        self.transport: asyncio.Transport | None = None
        # Producers pause while the TLS write buffer is full, or while the streams' queues
        # together are over the connection's budget; they resume when neither holds.
        self.write_paused = False
        self._tls_full = False
        self._over_budget = False
        # A dict as an ordered set: at a hundred streams a set's table costs twice the
        # dict's per entry, and a tunnel holds one entry per proxied connection.
        self.listeners: dict[BackpressureListener, None] = {}
        self.last_active = time.monotonic()
        self.reserved = 0  # stream slots promised by the pool but not yet opened
        # When the certificates this connection was authenticated with run out (the earlier
        # of ours and the peer's notAfter, Unix time); None: not tracked. A client pool
        # stops opening streams on it shortly before (meshcore/hbone/pool.py).
        self.expires_at: float | None = None
        # Kept: `asyncio.get_running_loop()` costs a getpid() system call each time (it
        # checks for a fork), and `flush_soon` runs once per request.
        self._loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = self._loop.create_future()
        self._on_request = on_request
        self._on_closed = on_closed
        self._keepalive = keepalive
        self._ping_timer: asyncio.TimerHandle | None = None
        self._ping_outstanding: bytes | None = None
        self._ping_sent_at = 0.0
        self._closed_reported = False
        self._drain_close: asyncio.TimerHandle | None = None
        self._preface_timer: asyncio.TimerHandle | None = None
        # The stall check: DATA sent so far when bytes were last seen waiting, and since when.
        self._stall_mark = -1
        self._stall_since = 0.0
        self._flush_scheduled = False

    # ---- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.conn.initiate()
        if self.conn.client:
            self.flush()
        # A server's preface (SETTINGS, window) waits for the client's bytes, which must
        # come first anyway (RFC 9113 3.4), and leaves with the ACK of the client's
        # SETTINGS in one TLS record: one write and one read fewer per connection.
        if not self.ready.done():
            self.ready.set_result(None)
        loop = self._loop
        if self._keepalive:
            self._ping_timer = loop.call_later(self.limits.ping_interval, self._ping)
        if not self.conn.client:
            # A client that finished TLS must speak HTTP/2 promptly: a connection that
            # never sends its preface would otherwise be held for ever.
            self._preface_timer = loop.call_later(self.limits.preface_timeout, self._preface_due)

    def get_buffer(self, sizehint: int) -> bytearray:
        return _ReadBuffer.get()

    def buffer_updated(self, nbytes: int) -> None:
        buf = _ReadBuffer.get()
        self.conn.receive(memoryview(buf)[:nbytes])
        self.flush()

    def eof_received(self) -> bool:
        self.conn.close(reason="peer closed the TLS connection")
        self.flush()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        H2Transport.closed_total += 1
        if self._ping_timer is not None:
            self._ping_timer.cancel()
        if self._preface_timer is not None:
            self._preface_timer.cancel()
        if self._drain_close is not None:
            self._drain_close.cancel()
        if not self.conn.closed:
            reason = f"TLS connection lost: {exc}" if exc else "TLS connection closed"
            self.conn.out.clear()
            self.conn.close(reason=reason)
            self.conn.out.clear()
        self._report_closed()
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("connection lost before it was ready"))

    def pause_writing(self) -> None:
        # From now on, what the peer makes us answer piles up: the connection bounds it.
        self.conn.peer_behind = True
        self._tls_full = True
        self._pause_producers()

    def resume_writing(self) -> None:
        self.conn.peer_caught_up()
        self._tls_full = False
        self._resume_producers()

    def _pause_producers(self) -> None:
        if self.write_paused:
            return
        self.write_paused = True
        for listener in list(self.listeners):
            listener.pause_producing()

    def _resume_producers(self) -> None:
        if not self.write_paused or self._tls_full or self._over_budget:
            return
        self.write_paused = False
        for listener in list(self.listeners):
            listener.resume_producing()

    def _check_budget(self) -> None:
        """Every producer pauses once the streams' queues together are over the budget (so a
        peer cannot make us hold a full queue per stream), and resumes at half of it."""
        budget = self.limits.max_buffered_per_connection
        buffered = self.conn.buffered
        if buffered > budget and not self._over_budget:
            self._over_budget = True
            self._pause_producers()
        elif self._over_budget and buffered <= budget // 2:
            self._over_budget = False
            self._resume_producers()

    # ---- ConnectionHandler (called by H2Connection) -------------------------------------

    def on_request(self, stream_id: int, headers: Headers) -> None:
        self.last_active = time.monotonic()
        if self._on_request is None:
            self.conn.respond(stream_id, 405, None, end=True)
            return
        self._on_request(self, stream_id, headers)

    def on_terminated(self, code: int, reason: str) -> None:
        if code != ErrorCode.NO_ERROR and not self.conn.goaway_received:
            # We ended it for something the peer did (a GOAWAY it sent is its own business).
            self._refused(self.conn.limit_hit or error_name(code))
        # Flush the GOAWAY, then close; the transport reports connection_lost later.
        self.flush()
        if self.transport is not None:
            self.transport.close()
        self._report_closed()

    def on_ping_ack(self, payload: bytes) -> None:
        if payload == self._ping_outstanding:
            self._ping_outstanding = None

    # ---- use ---------------------------------------------------------------------------

    def flush_soon(self) -> None:
        """Flush once this turn of the event loop is over. A proxy that writes a response
        head, then its body, then returns credit, in one turn, sends them as one TLS record
        instead of three (measured at the waypoint: 11 flushes per request became 4)."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        self.flush()

    def flush(self) -> None:
        conn = self.conn
        if conn.buffered > self.limits.max_buffered_per_connection or self._over_budget:
            self._check_budget()
        out = conn.take_output()
        if out and self.transport is not None and not self.transport.is_closing():
            # The TLS transport turns every buffer it is given into a TLS record of its
            # own: a 9-byte frame header and its payload would be two records, each
            # encrypted, framed and decrypted on its own (and one read event each on the
            # peer). Joined, a small frame is one record: measured, a third less added
            # p99 latency and 12% less CPU per request. Large output (bulk transfer) is
            # passed as is: copying it would cost more than the records it saves.
            if len(out) == 1:
                self.transport.write(out[0])
            elif sum(map(len, out)) <= COALESCE_BYTES:
                self.transport.write(b"".join(out))
            else:
                self.transport.writelines(out)
        # `draining` first: a plain attribute, so the per-write path pays one test.
        if (
            self.conn.draining
            and self.conn.drained
            and not self.conn.closed
            and self._drain_close is None
        ):
            # Not at once: a stream the peer opened as our GOAWAY was on its way must
            # still get its REFUSED_STREAM (closing now would reset the TCP connection
            # and could discard the GOAWAY before the peer read it).
            self._drain_close = self._loop.call_later(DRAIN_CLOSE_GRACE, self.close, "drained")

    def drain(self, reason: str = "draining") -> None:
        """Stop taking new streams; close once the open ones have ended."""
        self.conn.drain(reason)
        self.flush()

    def open_stream(self, headers: Headers, handler: StreamHandler, data: bytes = b"") -> int:
        """A new stream; `data`, if any, is its first DATA, in the same TLS record as the
        HEADERS (early data: the peer holds it until it answers)."""
        self.last_active = time.monotonic()
        sid = self.conn.open_stream(headers, handler)
        if data:
            self.conn.send_data(sid, data)
        self.flush()
        return sid

    @property
    def usable(self) -> bool:
        return not (self.conn.closed or self.conn.goaway_received) and self.transport is not None

    def close(self, reason: str = "closed locally") -> None:
        self.conn.close(reason=reason)
        self.flush()

    def _refused(self, reason: str) -> None:
        on_refused, self._on_refused = self._on_refused, None  # once per connection
        if on_refused is not None:
            on_refused(self, reason)

    def _preface_due(self) -> None:
        self._preface_timer = None
        if self.conn.closed or self.conn.preface_received:
            return
        self.conn.limit_hit = "preface_timeout"  # what on_terminated reports
        self.conn.close(ErrorCode.PROTOCOL_ERROR, "no HTTP/2 preface", "no HTTP/2 preface")
        self.flush()

    def _stalled(self, now: float) -> bool:
        """Whether bytes have waited for the peer, with no DATA sent, for `stall_timeout`."""
        conn = self.conn
        if not conn.buffered or conn.data_out != self._stall_mark:
            self._stall_mark = conn.data_out if conn.buffered else -1
            self._stall_since = now
            return False
        return now - self._stall_since >= self.limits.stall_timeout

    def _report_closed(self) -> None:
        if self._closed_reported:
            return
        self._closed_reported = True
        if self._on_closed is not None:
            self._on_closed(self)

    def _ping(self) -> None:
        if self.conn.closed:
            return
        loop = self._loop
        t = self.limits
        if self._ping_outstanding is not None:
            if loop.time() - self._ping_sent_at >= t.ping_timeout:
                self.close(reason=f"no PING answer within {t.ping_timeout:.0f} s")
                return
        else:
            self._ping_outstanding = os.urandom(8)
            self._ping_sent_at = loop.time()
            self.conn.send_ping(self._ping_outstanding)
            self.flush()
        now = time.monotonic()
        if self._stalled(now):
            self.conn.limit_hit = "stall_timeout"  # what on_terminated reports
            self.conn.close(
                ErrorCode.ENHANCE_YOUR_CALM,
                f"{self.conn.buffered} bytes queued and none read for {t.stall_timeout:.0f} s",
                "stalled",
            )
            self.flush()
            return
        if (
            not self.conn.client
            and not self.conn.streams
            and now - self.last_active >= t.idle_timeout
        ):
            # Idle: drained, not cut, so a stream opened as we decide still gets its
            # REFUSED_STREAM and is retried on a new connection.
            self.drain(f"idle for {t.idle_timeout:.0f} s")
        self._ping_timer = loop.call_later(t.ping_interval, self._ping)
