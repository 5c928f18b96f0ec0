"""A sans-IO HTTP/2 connection, cut to what HBONE needs: CONNECT streams carrying bytes.

Bytes go in with `receive()`; frames to send collect in an output list taken with
`take_output()`; what happened is reported by calling the connection's and each stream's
handler. Nothing here touches a socket or the event loop.

Invariants:
- Receive flow control: credit is returned only when the stream's consumer calls `ack()`,
  i.e. after it handed the bytes to the other side, so a slow reader stalls its sender
  instead of growing a buffer here. Credit is announced in batches (each WINDOW_UPDATE
  costs both tunnels a TLS record, a packet and a wake-up): a stream's once half its
  window is owed; the connection's once what is owed is at least half of what the peer
  may still send on it (the rule of the Rust `h2` crate under upstream's ztunnel), so
  streams that stopped reading, holding most of the connection's window, never leave the
  others waiting on owed credit. (A stream waits only on its own consumer.)
- Send flow control: `send_data` queues; the queue drains as far as the stream and
  connection windows allow. `send_data` returns False when the queue is above the high
  water mark; the handler's `on_send_ready` fires once it is back below the low mark.
- END_STREAM is sent only after every queued byte of that stream.
- Any protocol violation by the peer ends the connection with GOAWAY and resets every
  stream; a stream-level error resets only that stream. Nothing raises to the caller on
  bad input: the peer's bytes can never crash the process.
- What a peer may cost is bounded (`HboneLimits`): streams, header bytes, streams it resets
  before we answer (rapid reset), empty frames, control frames between useful ones,
  SETTINGS entries, and replies queued while it does not read. Past a limit the connection
  ends with GOAWAY ENHANCE_YOUR_CALM and `limit_hit` names the limit.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Protocol

import hpack

from meshcore.hbone import hpacklit
from meshcore.hbone.h2frames import (
    DEFAULT_MAX_FRAME,
    DEFAULT_WINDOW,
    FRAME_HEADER_LEN,
    MAX_FRAME_LIMIT,
    MAX_WINDOW,
    PREFACE,
    ErrorCode,
    Flag,
    FrameType,
    Setting,
    frame_header,
    frame_header_into,
    goaway,
    parse_header,
    ping,
    rst_stream,
    settings_ack,
    settings_frame,
    u32,
    window_update,
)
from meshcore.hbone.limits import DEFAULT_LIMITS, HboneLimits

Headers = list[tuple[str, str]]

# Stream and connection receive windows (protocols.md: 4 MiB and 16 MiB) and the largest
# frame we accept. Large windows and frames halve the per-byte cost of the tunnel.
STREAM_WINDOW = 4 * 1024 * 1024
CONNECTION_WINDOW = 16 * 1024 * 1024
MAX_FRAME_SIZE = 1024 * 1024
# Send queue marks per stream: pause the producer above HIGH, resume below LOW.
SEND_HIGH_WATER = 512 * 1024
SEND_LOW_WATER = 128 * 1024


class StreamHandler(Protocol):
    """What a stream's owner is told. Called synchronously from `receive()`."""

    def on_response(self, status: int, headers: Headers) -> None: ...

    def on_data(self, data: memoryview) -> None: ...

    def on_end(self) -> None: ...

    def on_reset(self, code: int) -> None: ...

    def on_send_ready(self) -> None: ...


class ConnectionHandler(Protocol):
    def on_request(self, stream_id: int, headers: Headers) -> None:
        """Server side: a new request. Answer with `respond()` or `reset()`."""

    def on_terminated(self, code: int, reason: str) -> None:
        """The connection is over (GOAWAY either way, or a protocol error)."""

    def on_ping_ack(self, payload: bytes) -> None: ...


def error_name(code: int) -> str:
    return ErrorCode(code).name if code in ErrorCode._value2member_map_ else str(code)


class ProtocolViolation(Exception):
    def __init__(self, code: ErrorCode, message: str, limit: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.limit = limit  # the HboneLimits field that was exceeded, if that is what happened


def _over(limit: str, message: str) -> ProtocolViolation:
    return ProtocolViolation(ErrorCode.ENHANCE_YOUR_CALM, message, limit)


# Request headers a CONNECT may carry as pseudo-headers (RFC 9113 8.3.1, 8.5; RFC 8441).
_REQUEST_PSEUDO = frozenset({":method", ":scheme", ":authority", ":path", ":protocol"})
# Connection-specific fields are malformed in HTTP/2 (RFC 9113 8.2.2).
_CONNECTION_FIELDS = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"}
)
_UPPER = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def malformed_request(headers: Headers) -> str | None:
    """Why a request's header list is malformed (RFC 9113 8.1.1, 8.2, 8.3), or None."""
    seen: set[str] = set()
    regular = False
    for name, value in headers:
        if not name or not _UPPER.isdisjoint(name):
            return f"header name {name!r} is not lowercase"
        if name.startswith(":"):
            if regular:
                return f"pseudo-header {name} after a regular header"
            if name not in _REQUEST_PSEUDO:
                return f"unknown pseudo-header {name}"
            if name in seen:
                return f"pseudo-header {name} given twice"
            seen.add(name)
        else:
            regular = True
            if name in _CONNECTION_FIELDS or (name == "te" and value != "trailers"):
                return f"connection-specific header {name}"
    if ":method" not in seen:
        return "no :method"
    return None


class _Stream:
    __slots__ = (
        "end_queued",
        "handler",
        "id",
        "local_closed",
        "pending",
        "pending_bytes",
        "recv_unacked",
        "recv_window",
        "remote_closed",
        "send_paused",
        "send_window",
    )

    def __init__(self, sid: int, handler: StreamHandler | None, send_window: int) -> None:
        self.id = sid
        self.handler = handler
        self.send_window = send_window
        self.recv_window = STREAM_WINDOW
        self.recv_unacked = 0
        # None while nothing waits for window (the usual case): an empty deque costs
        # 600 bytes per stream, and a tunnel holds one stream per proxied connection.
        self.pending: deque[memoryview] | None = None
        self.pending_bytes = 0
        self.end_queued = False
        self.local_closed = False
        self.remote_closed = False
        self.send_paused = False


class H2Connection:
    """One HTTP/2 connection, client or server side."""

    def __init__(
        self,
        client: bool,
        handler: ConnectionHandler,
        limits: HboneLimits = DEFAULT_LIMITS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.handler = handler
        self.limits = limits
        self._clock = clock
        self.out: list[bytes | memoryview] = []
        self.streams: dict[int, _Stream] = {}
        self.closed = False
        self.goaway_received = False
        self.draining = False  # we sent a graceful GOAWAY: no new streams, open ones finish
        self.close_reason = ""
        # Which limit ended the connection: an HboneLimits field, or a timeout of the shell.
        self.limit_hit: str | None = None
        self._buf = bytearray()
        self._preface_pending = not client
        self._next_stream_id = 1
        self._last_peer_stream = 0
        # Our header blocks never use the dynamic table (hpacklit); a size update is owed
        # only after the peer changes SETTINGS_HEADER_TABLE_SIZE.
        self._table_size_update: int | None = None
        self._decoder = hpack.Decoder()
        self._decoder.max_header_list_size = limits.max_header_block
        self._peer_initial_window = DEFAULT_WINDOW
        self._peer_max_frame = DEFAULT_MAX_FRAME
        self.peer_max_concurrent = 2**31 - 1
        self._send_window = DEFAULT_WINDOW
        self._recv_window = CONNECTION_WINDOW
        self._recv_unacked = 0
        self._blocked: dict[int, None] = {}  # streams waiting for connection credit, in order
        self._cont_sid = 0  # stream whose header block is being continued
        self._cont_block = bytearray()
        self._cont_end_stream = False
        self._expect_settings = client  # set for a server once the preface has arrived
        self._data_left = 0  # bytes of the current DATA frame still to come
        self._data_flags = 0
        self._data_stream: _Stream | None = None
        # While a handler's `on_data` runs: whether these are the last bytes of a DATA
        # frame that ends its stream (its `on_end` follows at once).
        self.data_ends_stream = False
        # The header of the newest DATA frame queued in `out` without END_STREAM (one of
        # ours, told by identity: never bytes an app sent), for `_flush_stream` to mark.
        self._tail_header: bytes | None = None
        # What the peer has cost so far (see HboneLimits).
        self._unanswered: dict[int, None] = {}  # server: peer streams we have not answered
        self._peer_streams = 0
        self._premature_resets = 0
        self._empty_frames = 0
        self._control_frames = 0
        self._settings_second = 0.0
        self._settings_entries = 0
        self.replies_queued = 0  # replies queued since the peer last read everything
        # Bytes queued on all streams for want of window, and the streams paused because
        # that total is over the connection's budget (not for their own queue).
        self.buffered = 0
        self._budget_paused: dict[int, None] = {}
        self.data_out = 0  # DATA bytes sent: progress, for the shell's stall check
        self.peer_behind = False  # set by the shell while the peer does not read

    # ---- setup -------------------------------------------------------------------------

    def initiate(self) -> None:
        """Queue the opening bytes: the client preface (client side), our SETTINGS and
        the connection window increase."""
        settings: dict[int, int] = {
            Setting.ENABLE_PUSH: 0,
            Setting.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            Setting.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
            Setting.MAX_HEADER_LIST_SIZE: self.limits.max_header_block,
        }
        if not self.client:
            settings[Setting.MAX_CONCURRENT_STREAMS] = self.limits.max_concurrent_streams
            del settings[Setting.ENABLE_PUSH]
        if self.client:
            self.out.append(PREFACE)
        self.out.append(settings_frame(settings))
        self.out.append(window_update(0, CONNECTION_WINDOW - DEFAULT_WINDOW))

    def take_output(self) -> list[bytes | memoryview]:
        out, self.out = self.out, []
        self._tail_header = None
        return out

    @property
    def open_streams(self) -> int:
        return len(self.streams)

    @property
    def preface_received(self) -> bool:
        """Server side: the client's preface and first SETTINGS have arrived."""
        return not self._preface_pending and not self._expect_settings

    # ---- API used by stream owners ---------------------------------------------------

    def open_stream(self, headers: Headers, handler: StreamHandler) -> int:
        """Client side: send a request's HEADERS (without END_STREAM); returns the id."""
        if self.closed or self.goaway_received:
            raise ConnectionError("HTTP/2 connection is closing; open a new one")
        sid = self._next_stream_id
        self._next_stream_id += 2
        self.streams[sid] = _Stream(sid, handler, self._peer_initial_window)
        self._send_headers(sid, headers, end_stream=False)
        return sid

    def respond(self, sid: int, status: int, handler: StreamHandler | None, end: bool) -> None:
        """Server side: answer a request. `end` closes our side (an error reply)."""
        st = self.streams.get(sid)
        if st is None or self.closed:
            return
        st.handler = handler
        self._unanswered.pop(sid, None)
        self._send_headers(sid, [(":status", str(status))], end_stream=end)
        if end:
            st.local_closed = True
            self._maybe_forget(st)

    def send_data(
        self, sid: int, data: bytes | memoryview, framed: memoryview | None = None
    ) -> bool:
        """Queue bytes on a stream. Returns False when the producer should pause.

        `framed`, if given, is `data` preceded by FRAME_HEADER_LEN bytes of room: when the
        bytes go out at once as one frame, its header is written there and the frame is
        one buffer (the TLS layer then makes it one run of records, not a 9-byte record of
        its own and then the payload's)."""
        st = self.streams.get(sid)
        if st is None or st.local_closed or st.end_queued or self.closed:
            return True  # the stream is gone; the owner learns that through on_reset
        if data:
            n = len(data)
            if st.pending is None and n <= min(
                st.send_window, self._send_window, self._peer_max_frame
            ):
                # Nothing queued and the windows allow it all: one DATA frame, now.
                st.send_window -= n
                self._send_window -= n
                self.data_out += n
                if framed is not None:
                    frame_header_into(framed, n, FrameType.DATA, 0, sid)
                    self.out.append(framed)
                else:
                    self._tail_header = frame_header(n, FrameType.DATA, 0, sid)
                    self.out.append(self._tail_header)
                    self.out.append(data)
                return True
            mv = data if isinstance(data, memoryview) else memoryview(data)
            if st.pending is None:
                st.pending = deque()
            st.pending.append(mv)
            st.pending_bytes += n
            self.buffered += n
            self._flush_stream(st)
        if st.pending_bytes > SEND_HIGH_WATER:
            st.send_paused = True
            return False
        if self.buffered > self.limits.max_buffered_per_connection:
            # Each stream's queue is bounded; so is their sum, or a peer that reads nothing
            # could make us hold a queue for each of its streams.
            st.send_paused = True
            self._budget_paused[sid] = None
            return False
        return True

    def end_stream(self, sid: int) -> None:
        """Half-close our direction once every queued byte has gone."""
        st = self.streams.get(sid)
        if st is None or st.local_closed or st.end_queued or self.closed:
            return
        st.end_queued = True
        self._flush_stream(st)

    def reset(self, sid: int, code: int = ErrorCode.CANCEL) -> None:
        st = self.streams.pop(sid, None)
        self._blocked.pop(sid, None)
        self._unanswered.pop(sid, None)
        if st is not None:
            self._unqueue(st)
            if not self.closed:
                self.out.append(rst_stream(sid, code))

    def _unqueue(self, st: _Stream) -> None:
        """A stream is gone: what it had queued no longer counts against the budget."""
        self.buffered -= st.pending_bytes
        self._budget_paused.pop(st.id, None)

    def ack(self, sid: int, n: int) -> None:
        """The consumer has passed `n` received bytes on: return that credit to the peer."""
        if self.closed or n <= 0:
            return
        self._recv_unacked += n
        if self._recv_unacked * 2 >= self._recv_window:
            self.out.append(window_update(0, self._recv_unacked))
            self._recv_window += self._recv_unacked
            self._recv_unacked = 0
        st = self.streams.get(sid)
        if st is None or st.remote_closed:
            return
        st.recv_unacked += n
        if st.recv_unacked >= STREAM_WINDOW // 2:
            self.out.append(window_update(sid, st.recv_unacked))
            st.recv_window += st.recv_unacked
            st.recv_unacked = 0

    def pending(self, sid: int) -> int:
        st = self.streams.get(sid)
        return st.pending_bytes if st is not None else 0

    def own_pending(self, sid: int) -> None:
        """Copy the stream's queued bytes that are views of someone else's buffer.

        A producer that reads into a reused buffer calls this when bytes stayed queued (no
        window yet): the copies free its buffer at once, instead of a few queued bytes
        holding a whole read buffer until the peer grants credit."""
        st = self.streams.get(sid)
        pending = st.pending if st is not None else None
        if not pending:
            return
        for i, chunk in enumerate(pending):
            if not isinstance(chunk.obj, bytes):
                pending[i] = memoryview(chunk.tobytes())

    def notify_when_drained(self, sid: int) -> None:
        """Ask for `on_send_ready` once the stream's queue is back below the low mark.

        A producer may pause for a reason of its own (the TLS write buffer) while the
        queue is between the marks; without this it would never hear that the queue
        drained, and the stream would stall for good.
        """
        st = self.streams.get(sid)
        if st is not None and st.pending_bytes > SEND_LOW_WATER:
            st.send_paused = True

    def send_ping(self, payload: bytes) -> None:
        if not self.closed:
            self.out.append(ping(payload))

    def drain(self, reason: str = "draining") -> None:
        """Graceful shutdown (RFC 9113 6.8): GOAWAY naming the last stream we accepted, so
        the peer stops opening streams here and retries newer ones elsewhere; streams
        already open keep flowing until they end. The owner closes the connection once
        `drained` (no streams left)."""
        if self.closed or self.draining:
            return
        self.draining = True
        self.out.append(goaway(self._last_peer_stream, ErrorCode.NO_ERROR, reason.encode()[:256]))

    @property
    def drained(self) -> bool:
        return self.draining and not self.streams

    def close(
        self, code: int = ErrorCode.NO_ERROR, reason: str = "closed locally", debug: str = ""
    ) -> None:
        """Send GOAWAY and end every stream. The GOAWAY's debug text is `debug`, else
        `reason`, cut to printable ASCII: never more than we mean to tell the peer."""
        if self.closed:
            return
        text = "".join(c for c in (debug or reason)[:128] if " " <= c <= "~")
        self.out.append(goaway(self._last_peer_stream, code, text.encode("ascii")))
        self._terminate(code, reason)

    def peer_caught_up(self) -> None:
        """The shell wrote everything queued: replies are no longer piling up."""
        self.peer_behind = False
        self.replies_queued = 0

    def _reply(self, frame: bytes) -> None:
        """Queue a frame the peer made us send (an ACK, a reset of its stream)."""
        self.out.append(frame)
        self.replies_queued += 1
        if self.peer_behind and self.replies_queued > self.limits.max_queued_replies:
            raise _over(
                "max_queued_replies",
                f"peer does not read: {self.replies_queued} replies queued",
            )

    # ---- receiving ---------------------------------------------------------------------

    def receive(self, data: bytes | memoryview) -> None:
        if self.closed:
            return
        try:
            self._receive(data)
        except ProtocolViolation as e:
            self.limit_hit = e.limit
            self.close(e.code, str(e))
        except (hpack.HPACKError, ValueError) as e:
            # The decoder's words stay in our log; the peer learns only what failed.
            self.close(ErrorCode.COMPRESSION_ERROR, f"bad header block: {e}", "bad header block")

    def _receive(self, data: bytes | memoryview) -> None:
        if self._buf:
            # Only frame headers and small control frames are ever buffered here: DATA
            # payloads stream through as they arrive, so this copy stays small.
            self._buf += data
            view = memoryview(bytes(self._buf))
            self._buf.clear()
        else:
            # Slicing a memoryview of the immutable bytes hands payloads on without a copy.
            view = memoryview(data)
        off = 0
        end = len(view)
        if self._preface_pending:
            if end < len(PREFACE):
                if PREFACE[:end] != view.tobytes():
                    raise ProtocolViolation(ErrorCode.PROTOCOL_ERROR, "bad client preface")
                self._buf += view
                return
            if view[: len(PREFACE)] != PREFACE:
                raise ProtocolViolation(ErrorCode.PROTOCOL_ERROR, "bad client preface")
            off = len(PREFACE)
            self._preface_pending = False
            self._expect_settings = True
        while off < end:
            if self._data_left:
                n = min(self._data_left, end - off)
                self._data_chunk(view[off : off + n])
                off += n
                self._data_left -= n
                if not self._data_left:
                    self._data_done()
                if self.closed:
                    return
                continue
            if end - off < FRAME_HEADER_LEN:
                break
            length, ftype, flags, sid = parse_header(view, off)
            if length > MAX_FRAME_SIZE:
                raise ProtocolViolation(
                    ErrorCode.FRAME_SIZE_ERROR, f"frame of {length} bytes exceeds our maximum"
                )
            if self._expect_settings and ftype != FrameType.SETTINGS:
                raise ProtocolViolation(ErrorCode.PROTOCOL_ERROR, "first frame is not SETTINGS")
            if ftype == FrameType.DATA and not flags & Flag.PADDED and not self._cont_sid:
                off += FRAME_HEADER_LEN
                self._data_begin(flags, sid, length)
                if not length:
                    self._data_done()
                if self.closed:
                    return
                continue
            if end - off - FRAME_HEADER_LEN < length:
                break
            self._expect_settings = False
            start = off + FRAME_HEADER_LEN
            off = start + length
            self._frame(ftype, flags, sid, view[start:off])
            if self.closed:
                return
        if off < end:
            self._buf += view[off:]

    def _data_begin(self, flags: int, sid: int, length: int) -> None:
        """A DATA frame starts; its payload follows in one or more `_data_chunk` calls."""
        if sid == 0:
            raise ProtocolViolation(ErrorCode.PROTOCOL_ERROR, "DATA on stream 0")
        if length or flags & Flag.END_STREAM:
            self._progress()
        else:
            self._empty("empty DATA frame")
        self._recv_window -= length
        if self._recv_window < 0:
            raise ProtocolViolation(ErrorCode.FLOW_CONTROL_ERROR, "connection window exceeded")
        self._data_left = length
        self._data_flags = flags
        st = self.streams.get(sid)
        if st is None or st.remote_closed:
            self._unknown_stream_frame(sid)
            st = None
        else:
            st.recv_window -= length
            if st.recv_window < 0:
                self._stream_error(st, ErrorCode.FLOW_CONTROL_ERROR)
                st = None
        self._data_stream = st

    def _data_chunk(self, chunk: memoryview) -> None:
        st = self._data_stream
        if st is not None and self.streams.get(st.id) is st and st.handler is not None:
            self.data_ends_stream = (
                bool(self._data_flags & Flag.END_STREAM) and len(chunk) == self._data_left
            )
            st.handler.on_data(chunk)
            self.data_ends_stream = False
        else:
            # Nobody will consume these bytes: return the connection credit at once.
            self._data_stream = None
            self.ack(0, len(chunk))

    def _data_done(self) -> None:
        st = self._data_stream
        self._data_stream = None
        if st is not None and self._data_flags & Flag.END_STREAM and self.streams.get(st.id) is st:
            self._remote_end(st)

    def _progress(self) -> None:
        """A frame that did some work: the flood counters start again."""
        self._empty_frames = 0
        self._control_frames = 0

    def _empty(self, what: str) -> None:
        self._empty_frames += 1
        if self._empty_frames > self.limits.max_empty_frames:
            raise _over(
                "max_empty_frames", f"{self._empty_frames} frames in a row carry nothing ({what})"
            )

    def _control(self, what: str) -> None:
        self._control_frames += 1
        if self._control_frames > self.limits.max_control_frames_without_progress:
            raise _over(
                "max_control_frames_without_progress",
                f"{self._control_frames} {what} frames without a stream making progress",
            )

    def _frame(self, ftype: int, flags: int, sid: int, payload: memoryview) -> None:
        if self._cont_sid and ftype != FrameType.CONTINUATION:
            raise ProtocolViolation(ErrorCode.PROTOCOL_ERROR, "expected CONTINUATION")
        if ftype == FrameType.DATA:
            self._on_padded_data(flags, sid, payload)
        elif ftype == FrameType.HEADERS:
            self._on_headers(flags, sid, payload)
        elif ftype == FrameType.CONTINUATION:
            self._on_continuation(flags, sid, payload)
        elif ftype == FrameType.WINDOW_UPDATE:
            self._on_window_update(sid, payload)
        elif ftype == FrameType.SETTINGS:
            self._on_settings(flags, sid, payload)
        elif ftype == FrameType.PING:
            self._on_ping(flags, sid, payload)
        elif ftype == FrameType.RST_STREAM:
            self._on_rst(sid, payload)
        elif ftype == FrameType.GOAWAY:
            self._on_goaway(sid, payload)
        elif ftype == FrameType.PRIORITY:
            self._on_priority(sid, payload)
        elif ftype == FrameType.PUSH_PROMISE:
            raise ProtocolViolation(ErrorCode.PROTOCOL_ERROR, "PUSH_PROMISE is disabled")
        else:
            # Unknown frame types are ignored (RFC 9113 section 4.1), but not for free.
            self._empty(f"unknown frame type {ftype}")

    def _on_priority(self, sid: int, payload: memoryview) -> None:
        # Priorities are advisory and we do not use them (RFC 9113 5.3.2).
        if sid == 0:
            raise ProtocolViolation(ErrorCode.PROTOCOL_ERROR, "PRIORITY on stream 0")
        self._empty("PRIORITY")
        if len(payload) != 5:
            st = self.streams.get(sid)
            if st is not None:
                self._stream_error(st, ErrorCode.FRAME_SIZE_ERROR)
            else:
                self._reply(rst_stream(sid, ErrorCode.FRAME_SIZE_ERROR))

    def _strip_padding(self, flags: int, payload: memoryview) -> tuple[memoryview, int]:
        if not flags & Flag.PADDED:
            return payload, 0
        if not payload:
            raise ProtocolViolation(ErrorCode.PROTOCOL_ERROR, "padded frame without pad length")
        pad = payload[0]
        if pad >= len(payload):
            raise ProtocolViolation(ErrorCode.PROTOCOL_ERROR, "padding exceeds frame")
        return payload[1 : len(payload) - pad], pad + 1

    def _on_padded_data(self, flags: int, sid: int, payload: memoryview) -> None:
        """A padded DATA frame (buffered whole): the same accounting as a streamed one."""
        self._data_begin(flags, sid, len(payload))
        self._data_left = 0
        body, overhead = self._strip_padding(flags, payload)
        if not body and not flags & Flag.END_STREAM:
            self._empty("DATA with only padding")
        self.ack(sid, overhead)  # padding is never handed to anyone: credit it now
        if body:
            self._data_chunk(body)
        self._data_done()

    def _unknown_stream_frame(self, sid: int) -> None:
        idle = sid >= (self._next_stream_id if self.client else self._last_peer_stream + 1)
        if self.client and sid % 2 == 0:
            idle = True
        if idle:
            raise ProtocolViolation(ErrorCode.PROTOCOL_ERROR, f"frame on idle stream {sid}")
        self._reply(rst_stream(sid, ErrorCode.STREAM_CLOSED))

    def _remote_end(self, st: _Stream) -> None:
        st.remote_closed = True
        if st.handler is not None:
            st.handler.on_end()
        self._maybe_forget(st)

    def _maybe_forget(self, st: _Stream) -> None:
        if st.local_closed and st.remote_closed:
            self.streams.pop(st.id, None)
            self._blocked.pop(st.id, None)

    def _on_headers(self, flags: int, sid: int, payload: memoryview) -> None:
        if sid == 0:
            raise ProtocolViolation(ErrorCode.PROTOCOL_ERROR, "HEADERS on stream 0")
        self._progress()
        block, _ = self._strip_padding(flags, payload)
        if flags & Flag.PRIORITY:
            if len(block) < 5:
                raise ProtocolViolation(ErrorCode.PROTOCOL_ERROR, "short priority fields")
            block = block[5:]
        end_stream = bool(flags & Flag.END_STREAM)
        if flags & Flag.END_HEADERS:
            self._header_block(sid, bytes(block), end_stream)
        else:
            self._cont_sid = sid
            self._cont_block = bytearray(block)
            self._cont_end_stream = end_stream

    def _on_continuation(self, flags: int, sid: int, payload: memoryview) -> None:
        if not self._cont_sid or sid != self._cont_sid:
            raise ProtocolViolation(ErrorCode.PROTOCOL_ERROR, "unexpected CONTINUATION")
        if not payload and not flags & Flag.END_HEADERS:
            self._empty("empty CONTINUATION")
        self._cont_block += payload
        if len(self._cont_block) > self.limits.max_header_block:
            raise _over("max_header_block", "header block too large")
        if flags & Flag.END_HEADERS:
            self._cont_sid = 0
            block, self._cont_block = bytes(self._cont_block), bytearray()
            self._header_block(sid, block, self._cont_end_stream)

    def _header_block(self, sid: int, block: bytes, end_stream: bool) -> None:
        if len(block) > self.limits.max_header_block:
            raise _over("max_header_block", "header block too large")
        # A block without dynamic-table references (every HBONE peer of ours writes those)
        # is read directly; any other goes through the full decoder, which must see it
        # even for streams we will refuse: HPACK state is shared.
        headers = hpacklit.decode_plain(block, self.limits.max_header_block)
        if headers is None:
            raw = self._decoder.decode(block, raw=True)
            headers = [(bytes(k).decode("latin-1"), bytes(v).decode("latin-1")) for k, v in raw]
        if self.client:
            self._client_headers(sid, headers, end_stream)
        else:
            self._server_headers(sid, headers, end_stream)

    def _client_headers(self, sid: int, headers: Headers, end_stream: bool) -> None:
        st = self.streams.get(sid)
        if st is None:
            self._unknown_stream_frame(sid)
            return
        status_values = [v for k, v in headers if k == ":status"]
        uppercase = any(not _UPPER.isdisjoint(k) for k, _ in headers)
        if uppercase or len(status_values) != 1 or not status_values[0].isdigit():
            self.reset(sid, ErrorCode.PROTOCOL_ERROR)
            if st.handler is not None:
                st.handler.on_reset(ErrorCode.PROTOCOL_ERROR)
            return
        status = int(status_values[0])
        if 100 <= status < 200 and not end_stream:
            return  # informational: the real response follows
        if st.handler is not None:
            st.handler.on_response(status, headers)
        if end_stream and sid in self.streams:
            self._remote_end(st)

    def _server_headers(self, sid: int, headers: Headers, end_stream: bool) -> None:
        if sid in self.streams:
            # Trailers on a CONNECT stream carry nothing we use; a well-behaved client
            # never sends them. Treat them as the end of the request body.
            if end_stream:
                self._remote_end(self.streams[sid])
            return
        if sid % 2 == 0 or sid <= self._last_peer_stream:
            raise ProtocolViolation(ErrorCode.PROTOCOL_ERROR, f"bad new stream id {sid}")
        self._last_peer_stream = sid
        self._peer_streams += 1
        if self.draining or len(self.streams) >= self.limits.max_concurrent_streams:
            # Draining: a stream the peer opened before it saw our GOAWAY. REFUSED_STREAM
            # tells it nothing was processed, so it may safely retry on a new connection.
            self._reply(rst_stream(sid, ErrorCode.REFUSED_STREAM))
            return
        why = malformed_request(headers)
        if why is not None:
            self._reply(rst_stream(sid, ErrorCode.PROTOCOL_ERROR))
            return
        st = _Stream(sid, None, self._peer_initial_window)
        st.remote_closed = end_stream
        self.streams[sid] = st
        self._unanswered[sid] = None
        self.handler.on_request(sid, headers)

    def _on_window_update(self, sid: int, payload: memoryview) -> None:
        if len(payload) != 4:
            raise ProtocolViolation(ErrorCode.FRAME_SIZE_ERROR, "WINDOW_UPDATE length")
        inc = u32(payload) & 0x7FFFFFFF
        if sid == 0:
            if inc == 0:
                raise ProtocolViolation(ErrorCode.PROTOCOL_ERROR, "zero window increment")
            self._send_window += inc
            if self._send_window > MAX_WINDOW:
                raise ProtocolViolation(ErrorCode.FLOW_CONTROL_ERROR, "window overflow")
            for bsid in list(self._blocked):
                bst = self.streams.get(bsid)
                self._blocked.pop(bsid, None)
                if bst is not None:
                    self._flush_stream(bst)
                if self._send_window <= 0:
                    break
            return
        st = self.streams.get(sid)
        if st is None:
            return
        if inc == 0:
            self._stream_error(st, ErrorCode.PROTOCOL_ERROR)
            return
        st.send_window += inc
        if st.send_window > MAX_WINDOW:
            self._stream_error(st, ErrorCode.FLOW_CONTROL_ERROR)
            return
        self._flush_stream(st)

    def _stream_error(self, st: _Stream, code: int) -> None:
        self.reset(st.id, code)
        if st.handler is not None:
            st.handler.on_reset(code)

    def _on_settings(self, flags: int, sid: int, payload: memoryview) -> None:
        if sid != 0:
            raise ProtocolViolation(ErrorCode.PROTOCOL_ERROR, "SETTINGS on a stream")
        self._control("SETTINGS")
        if flags & Flag.ACK:
            if payload:
                raise ProtocolViolation(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS ACK with payload")
            return
        if len(payload) % 6:
            raise ProtocolViolation(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS length")
        entries = len(payload) // 6
        self._settings_budget(entries)
        window: int | None = None
        for i in range(0, len(payload), 6):
            key = (payload[i] << 8) | payload[i + 1]
            value = u32(payload, i + 2)
            if key == Setting.INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise ProtocolViolation(
                        ErrorCode.FLOW_CONTROL_ERROR, "initial window too large"
                    )
                window = value  # applied once per frame: each change walks every stream
            else:
                self._apply_setting(key, value)
        if window is not None:
            self._set_initial_window(window)
        self._reply(settings_ack())

    def _settings_budget(self, entries: int) -> None:
        limits = self.limits
        if entries > limits.max_settings_entries:
            raise _over("max_settings_entries", f"SETTINGS frame with {entries} entries")
        now = self._clock()
        if now - self._settings_second >= 1.0:
            self._settings_second, self._settings_entries = now, 0
        self._settings_entries += entries
        if self._settings_entries > limits.max_settings_entries_per_second:
            raise _over(
                "max_settings_entries_per_second",
                f"{self._settings_entries} SETTINGS entries within a second",
            )

    def _set_initial_window(self, value: int) -> None:
        delta = value - self._peer_initial_window
        self._peer_initial_window = value
        for st in list(self.streams.values()):
            st.send_window += delta
            if delta > 0:
                self._flush_stream(st)

    def _apply_setting(self, key: int, value: int) -> None:
        if key == Setting.MAX_FRAME_SIZE:
            if not DEFAULT_MAX_FRAME <= value <= MAX_FRAME_LIMIT:
                raise ProtocolViolation(ErrorCode.PROTOCOL_ERROR, "bad SETTINGS_MAX_FRAME_SIZE")
            self._peer_max_frame = value
        elif key == Setting.MAX_CONCURRENT_STREAMS:
            self.peer_max_concurrent = value
        elif key == Setting.HEADER_TABLE_SIZE:
            # Acknowledged at the start of our next header block (RFC 7541 4.2): the table
            # we use is empty, so its size is 0 whatever the peer now allows.
            self._table_size_update = 0
        elif key == Setting.ENABLE_PUSH and value > 1:
            raise ProtocolViolation(ErrorCode.PROTOCOL_ERROR, "bad SETTINGS_ENABLE_PUSH")

    def _on_ping(self, flags: int, sid: int, payload: memoryview) -> None:
        if sid != 0:
            raise ProtocolViolation(ErrorCode.PROTOCOL_ERROR, "PING on a stream")
        if len(payload) != 8:
            raise ProtocolViolation(ErrorCode.FRAME_SIZE_ERROR, "PING length")
        self._control("PING")
        if flags & Flag.ACK:
            self.handler.on_ping_ack(bytes(payload))
        else:
            self._reply(ping(bytes(payload), ack=True))

    def _on_rst(self, sid: int, payload: memoryview) -> None:
        if sid == 0:
            raise ProtocolViolation(ErrorCode.PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if len(payload) != 4:
            raise ProtocolViolation(ErrorCode.FRAME_SIZE_ERROR, "RST_STREAM length")
        st = self.streams.pop(sid, None)
        self._blocked.pop(sid, None)
        if st is not None:
            self._unqueue(st)
        premature = sid in self._unanswered
        if premature:
            del self._unanswered[sid]
        # Its owner hears of the reset first: the stream has left `streams`, so the close
        # that a limit may now cause would not reach it (and its app connect would go on).
        if st is not None and st.handler is not None:
            st.handler.on_reset(u32(payload))
        if premature:
            self._premature_reset()
        elif st is None:
            self._empty("RST_STREAM of a closed stream")

    def _premature_reset(self) -> None:
        """The peer reset a stream before we answered it: cheap for it, not for us (the
        answer may be an app connect). Many of them, and most of its streams: rapid reset."""
        self._premature_resets += 1
        n = self._premature_resets
        if n > self.limits.max_premature_resets and 2 * n > self._peer_streams:
            raise _over(
                "max_premature_resets",
                f"rapid reset: {n} of {self._peer_streams} streams reset before an answer",
            )

    def _on_goaway(self, sid: int, payload: memoryview) -> None:
        if sid != 0 or len(payload) < 8:
            raise ProtocolViolation(ErrorCode.PROTOCOL_ERROR, "malformed GOAWAY")
        last = u32(payload) & 0x7FFFFFFF
        code = u32(payload, 4)
        self.goaway_received = True
        debug = bytes(payload[8:]).decode("utf-8", "replace")
        self.close_reason = f"peer sent GOAWAY ({error_name(code)}) {debug}".strip()
        # Streams the peer never processed are refused; the others may finish.
        for st in [s for s in self.streams.values() if s.id > last and self.client]:
            self.streams.pop(st.id, None)
            self._unqueue(st)
            if st.handler is not None:
                st.handler.on_reset(ErrorCode.REFUSED_STREAM)
        if code != ErrorCode.NO_ERROR or not self.streams:
            self._terminate(code, self.close_reason)

    # ---- sending ---------------------------------------------------------------------

    def _send_headers(self, sid: int, headers: Iterable[tuple[str, str]], end_stream: bool) -> None:
        # Static-table indexes and raw literals without indexing (hpacklit): Huffman
        # coding in Python cost 17 us to encode and 26 us to decode per CONNECT to save
        # about 16 bytes, and the dynamic table churned on every CONNECT.
        block = hpacklit.encode(list(headers), self._table_size_update)
        self._table_size_update = None
        limit = self._peer_max_frame
        first, rest = block[:limit], block[limit:]
        flags = Flag.END_STREAM if end_stream else 0
        if not rest:
            flags |= Flag.END_HEADERS
        self.out.append(frame_header(len(first), FrameType.HEADERS, flags, sid) + first)
        while rest:
            chunk, rest = rest[:limit], rest[limit:]
            cflags = 0 if rest else Flag.END_HEADERS
            self.out.append(frame_header(len(chunk), FrameType.CONTINUATION, cflags, sid) + chunk)

    def _flush_stream(self, st: _Stream) -> None:
        out = self.out
        pending = st.pending
        while pending:
            allowed = min(st.send_window, self._send_window, self._peer_max_frame)
            if allowed <= 0:
                if self._send_window <= 0:
                    self._blocked[st.id] = None
                return
            chunk = pending[0]
            if len(chunk) > allowed:
                pending[0] = chunk[allowed:]
                chunk = chunk[:allowed]
            else:
                pending.popleft()
            n = len(chunk)
            st.pending_bytes -= n
            self.buffered -= n
            self.data_out += n
            st.send_window -= n
            self._send_window -= n
            flags = Flag.END_STREAM if (st.end_queued and not pending) else 0
            header = frame_header(n, FrameType.DATA, flags, st.id)
            out.append(header)
            out.append(chunk)
            if flags:
                st.local_closed = True
            else:
                self._tail_header = header
        if pending is not None and not pending:
            st.pending = None
        if st.end_queued and not st.local_closed:
            tail = self._tail_header
            if len(out) >= 2 and out[-2] is tail and parse_header(tail, 0)[3] == st.id:
                # Its last DATA frame is still queued and the newest frame: the end rides
                # on it (one frame fewer, and the peer learns the end with the bytes, so
                # it can hand its app both at once).
                out[-2] = frame_header(len(out[-1]), FrameType.DATA, Flag.END_STREAM, st.id)
            else:
                out.append(frame_header(0, FrameType.DATA, Flag.END_STREAM, st.id))
            st.local_closed = True
        if (
            st.send_paused
            and st.pending_bytes <= SEND_LOW_WATER
            and st.id not in self._budget_paused
        ):
            st.send_paused = False
            if st.handler is not None:
                st.handler.on_send_ready()
        if self._budget_paused and self.buffered <= self.limits.max_buffered_per_connection // 2:
            self._resume_budget_paused()
        if st.local_closed:
            self._maybe_forget(st)

    def _resume_budget_paused(self) -> None:
        paused, self._budget_paused = self._budget_paused, {}
        for sid in paused:
            other = self.streams.get(sid)
            if other is not None and other.send_paused and other.pending_bytes <= SEND_LOW_WATER:
                other.send_paused = False
                if other.handler is not None:
                    other.handler.on_send_ready()

    def _terminate(self, code: int, reason: str) -> None:
        self.closed = True
        self.close_reason = reason
        streams = list(self.streams.values())
        self.streams.clear()
        self._blocked.clear()
        self._unanswered.clear()
        self._budget_paused.clear()
        self.buffered = 0
        for st in streams:
            if st.handler is not None:
                st.handler.on_reset(ErrorCode.CANCEL if code == ErrorCode.NO_ERROR else code)
        self.handler.on_terminated(code, reason)
