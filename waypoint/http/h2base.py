"""What the HTTP/2 server and client shells share: the `h2` connection on a `ByteStream`,
bodies whose flow-control credit returns only when their reader took the bytes, and
sending a body within the peer's windows.

Flow control is the back-pressure: a request body the handler does not read stops
getting WINDOW_UPDATEs, so the peer stops sending on that stream, while the connection's
other streams go on. Received DATA is acknowledged (credit returned) as `read()` hands it
out, so what waits unread is bounded by the stream's window.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import h2.config
import h2.connection
import h2.errors
import h2.exceptions
import h2.settings

from waypoint.http.message import HOP_BY_HOP, Body, BodyError, Headers, StreamBody
from waypoint.http.stream import ByteStream

READ_SIZE = 65536


@dataclass(frozen=True, slots=True)
class Http2Limits:
    """What one HTTP/2 connection may cost (see the design's limits table)."""

    max_concurrent_streams: int = 100
    # Per stream and per connection: how much a peer may send before the reader took it.
    stream_window: int = 1 << 20
    connection_window: int = 4 << 20
    max_header_list_size: int = 64 * 1024  # Envoy: max_request_headers_kb 60 (431 / reset)
    max_headers: int = 100  # fields in one request's header block (Envoy: max_headers_count; 431)
    max_frame_size: int = 16384
    # Rapid reset (CVE-2023-44487): streams the peer resets before their response ended,
    # within `reset_window` seconds; past it GOAWAY (ENHANCE_YOUR_CALM). Envoy and hyper use
    # counts of the same order.
    max_rapid_resets: int = 200
    reset_window: float = 10.0
    # PING, SETTINGS and empty DATA frames per `reset_window`: each costs us work.
    max_control_frames: int = 1000
    idle_timeout: float = 300.0  # no stream open and nothing received


DEFAULT_H2_LIMITS = Http2Limits()


class FlowBody(StreamBody):
    """A received body: each `read()` returns its bytes' credit to the peer."""

    __slots__ = ("_ack",)

    def __init__(self, length: int | None, ack: Callable[[int], None]) -> None:
        super().__init__(length, high_water=1 << 62)  # the window bounds it, not this
        self._ack = ack

    async def read(self) -> bytes:
        data = await super().read()
        if data:
            self._ack(len(data))
        return data


def content_length(headers: Headers) -> int | None:
    for k, v in headers:
        if k == "content-length":
            # ASCII digits only: str.isdigit() also takes "²", which int() refuses (h2
            # refuses such a request first; this must not depend on it).
            return int(v) if v.isascii() and v.isdigit() and len(v) <= 18 else None
    return None


def wire_headers(pairs: Headers) -> list[tuple[bytes, bytes]]:
    """End-to-end fields as HTTP/2 sends them: lower-case names, no connection-specific
    fields (RFC 9113 8.2.2), `te` only as `trailers`, no `host` (it is :authority)."""
    out: list[tuple[bytes, bytes]] = []
    for k, v in pairs:
        name = k.lower()
        if name.startswith(":") or name == "host":
            continue
        if name in HOP_BY_HOP and not (name == "te" and v.strip().lower() == "trailers"):
            continue
        out.append((name.encode("latin-1"), v.encode("latin-1")))
    return out


def decoded(headers: Iterable[tuple[bytes | str, bytes | str]] | None) -> Headers:
    """Header pairs from an `h2` event as `str` (h2 decodes them with latin-1 already; the
    bytes case is for the typing, which allows either)."""
    out: Headers = []
    for k, v in headers or ():
        name = k.decode("latin-1") if isinstance(k, bytes) else k
        value = v.decode("latin-1") if isinstance(v, bytes) else v
        out.append((name, value))
    return out


def framed(headers: list[tuple[bytes, bytes]], length: int | None) -> list[tuple[bytes, bytes]]:
    """`headers` with a Content-Length field set from the body: a filter may have replaced
    the body, and HTTP/2 peers refuse a length the DATA does not match. None is added where
    there was none (the body is then streamed, and trailers can follow on any wire)."""
    if not any(k == b"content-length" for k, _ in headers):
        return headers
    out = [(k, v) for k, v in headers if k != b"content-length"]
    if length is not None:
        out.append((b"content-length", str(length).encode()))
    return out


def split_pseudo(headers: list[tuple[str, str]]) -> tuple[dict[str, str], Headers]:
    pseudo: dict[str, str] = {}
    regular: Headers = []
    for k, v in headers:
        if k.startswith(":"):
            pseudo[k] = v
        else:
            regular.append((k, v))
    return pseudo, regular


def new_connection(client_side: bool, limits: Http2Limits) -> h2.connection.H2Connection:
    config = h2.config.H2Configuration(
        client_side=client_side,
        header_encoding="latin-1",  # lossless: every byte is one character
        validate_inbound_headers=True,
        normalize_inbound_headers=True,
        validate_outbound_headers=True,
    )
    conn = h2.connection.H2Connection(config=config)
    conn.local_settings = h2.settings.Settings(
        client=client_side,
        initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: limits.max_concurrent_streams,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: limits.stream_window,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_list_size,
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
        },
    )
    # The decoder enforces the list size itself (hpack refuses a larger list before it is
    # built); h2 would only apply it once the peer acknowledged our SETTINGS.
    conn.decoder.max_header_list_size = limits.max_header_list_size
    return conn


class H2Shell:
    """The `h2` connection on a byte stream: flushing, and waiting for send windows."""

    __slots__ = ("_window", "closed", "conn", "limits", "stream")

    def __init__(self, stream: ByteStream, conn: h2.connection.H2Connection, limits: Http2Limits):
        self.stream = stream
        self.conn = conn
        self.limits = limits
        self.closed = False
        self._window = asyncio.Event()

    def start(self) -> None:
        self.conn.initiate_connection()
        extra = self.limits.connection_window - 65535
        if extra > 0:
            self.conn.increment_flow_control_window(extra)
        self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.stream.write(data)

    def window_opened(self) -> None:
        """Wake every sender waiting for a window (after WINDOW_UPDATE or SETTINGS)."""
        self._window.set()
        self._window = asyncio.Event()

    def acker(self, stream_id: int) -> Callable[[int], None]:
        def ack(n: int) -> None:
            if self.closed:
                return
            try:
                self.conn.acknowledge_received_data(n, stream_id)
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                return
            self.flush()

        return ack

    async def send_data(self, stream_id: int, data: bytes) -> None:
        """Send `data` on a stream within the windows. StreamClosedError if it ended."""
        view = memoryview(data)
        while view:
            if self.closed:
                raise h2.exceptions.StreamClosedError(stream_id)
            window = self.conn.local_flow_control_window(stream_id)
            if window <= 0:
                await self._window.wait()
                continue
            n = min(window, self.conn.max_outbound_frame_size, len(view))
            self.conn.send_data(stream_id, view[:n].tobytes())
            view = view[n:]
            self.flush()
            await self.stream.drain()

    async def send_body(self, stream_id: int, body: Body) -> None:
        """A whole body, then its trailers (or END_STREAM). BodyError: the source broke;
        the stream is reset (the peer must not see a truncated body as complete)."""
        try:
            while data := await body.read():
                await self.send_data(stream_id, data)
        except BodyError:
            self.reset(stream_id, h2.errors.ErrorCodes.INTERNAL_ERROR)
            raise
        trailers = wire_headers(body.trailers)
        if trailers:
            self.conn.send_headers(stream_id, trailers, end_stream=True)
        else:
            self.conn.end_stream(stream_id)
        self.flush()

    def goaway(self, code: int, last_stream_id: int) -> None:
        """Send GOAWAY. With NO_ERROR it is the graceful kind (RFC 9113 6.8): streams up
        to `last_stream_id` go on. `h2` closes its state machine on any GOAWAY, so for the
        graceful kind the state is put back; the shells refuse new streams themselves."""
        machine = self.conn.state_machine
        state = machine.state
        self.conn.close_connection(code, last_stream_id=last_stream_id)
        if code == h2.errors.ErrorCodes.NO_ERROR:
            machine.state = state
        self.flush()

    def peer_goaway(self, code: int, state: h2.connection.ConnectionState) -> None:
        """After a peer's graceful GOAWAY, let the open streams finish (see `goaway`)."""
        if code == h2.errors.ErrorCodes.NO_ERROR:
            self.conn.state_machine.state = state

    def reset(self, stream_id: int, code: int) -> None:
        try:
            self.conn.reset_stream(stream_id, code)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return
        self.flush()


__all__ = [
    "DEFAULT_H2_LIMITS",
    "FlowBody",
    "H2Shell",
    "Http2Limits",
    "content_length",
    "decoded",
    "framed",
    "new_connection",
    "split_pseudo",
    "wire_headers",
]
