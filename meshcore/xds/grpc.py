"""One bidirectional gRPC call over HTTP/2 (+ TLS), on the `h2` library.

A proxy needs exactly one long-lived stream to the discovery server; grpcio would add its
C core and threads (tens of MB) to every tunnel for it. gRPC's framing is small: a POST with
`content-type: application/grpc` and `te: trailers`, each message prefixed by a compressed
flag (always 0 here) and a 4-byte length, and the status in the trailers (`grpc-status`).

`GrpcStream.open` connects, verifies the server (TLS 1.2+ with ALPN h2, the chain against the
given roots, and its SPIFFE identity), and starts the call; `send` and `recv` move whole
messages; `recv` raises `GrpcClosed` with the status when the call ends. A message larger
than `max_message` ends the call (it is never buffered whole first).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import ProtocolError

from meshcore.identity.spiffe import SpiffeId
from meshcore.tls import ALPN_H2, PeerVerificationError, peer_identity, verify_server

_WINDOW = 16 * 1024 * 1024  # a whole mesh snapshot can be several MB
_READ = 256 * 1024
_CLOSE_WAIT = 1.0


class GrpcClosed(Exception):
    """The call ended; `status` is gRPC's code (2 UNKNOWN when the transport failed)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"grpc status {status}: {message}" if message else f"grpc status {status}")
        self.status = status
        self.message = message


def client_context(roots_pem: bytes | None) -> ssl.SSLContext | None:
    """TLS to the discovery server: its chain checked against `roots_pem`, ALPN h2. The
    name is not checked (mesh certificates carry a SPIFFE URI only); the identity is, after
    the handshake. None for plaintext (loopback tests only)."""
    if roots_pem is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=roots_pem.decode("ascii"))
    ctx.set_alpn_protocols([ALPN_H2])
    return ctx


def _headers(pairs: object) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in pairs if isinstance(pairs, list | tuple) else ():
        key = name.decode("latin-1") if isinstance(name, bytes) else str(name)
        out[key] = value.decode("latin-1") if isinstance(value, bytes) else str(value)
    return out


class GrpcStream:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        conn: H2Connection,
        max_message: int,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._conn = conn
        self._max = max_message
        self._stream_id = 1
        self._buffer = bytearray()
        self._messages: asyncio.Queue[bytes | GrpcClosed] = asyncio.Queue()
        self._window_open = asyncio.Event()
        self._closed: GrpcClosed | None = None
        self._headers_ok = False
        self._pump: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        path: str,
        *,
        ssl_context: ssl.SSLContext | None,
        expected: SpiffeId | None,
        connect_limit: float,
        max_message: int,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> GrpcStream:
        if host.startswith("unix:"):
            # TLS over a unix socket: no host name to send or check (the SPIFFE identity is).
            opened = asyncio.open_unix_connection(
                host[len("unix:") :],
                ssl=ssl_context,
                server_hostname="" if ssl_context is not None else None,
                limit=_READ,
            )
            host, port = "localhost", 15012
        else:
            opened = asyncio.open_connection(host, port, ssl=ssl_context, limit=_READ)
        reader, writer = await asyncio.wait_for(opened, connect_limit)
        try:
            if ssl_context is not None:
                sslobj = writer.get_extra_info("ssl_object")
                if sslobj is None or sslobj.selected_alpn_protocol() != ALPN_H2:
                    raise PeerVerificationError("discovery server did not negotiate ALPN h2")
                if expected is not None:
                    verify_server(peer_identity(sslobj), frozenset({expected}))
            conn = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
            conn.initiate_connection()
            scheme = "https" if ssl_context is not None else "http"
            conn.send_headers(
                1,
                [
                    (":method", "POST"),
                    (":scheme", scheme),
                    (":path", path),
                    (":authority", f"{host}:{port}"),
                    ("content-type", "application/grpc"),
                    ("te", "trailers"),
                    ("user-agent", "ambient-mesh-xds"),
                    # The caller's credential (a bearer token), checked before anything
                    # is sent back.
                    *metadata,
                ],
            )
            # Credit up front, then each frame's size back as it arrives: explicit
            # WINDOW_UPDATEs, since a grpc-core server keeps a stream opened before our
            # SETTINGS at 64 KiB whatever initial window the SETTINGS announce.
            conn.increment_flow_control_window(_WINDOW)
            conn.increment_flow_control_window(_WINDOW, stream_id=1)
            writer.write(conn.data_to_send())
            await writer.drain()
        except BaseException:
            writer.close()
            raise
        stream = cls(reader, writer, conn, max_message)
        stream._pump = asyncio.create_task(stream._read_loop(), name="xds-grpc-reader")
        return stream

    async def send(self, message: bytes) -> None:
        if self._closed is not None:
            raise self._closed
        data = struct.pack(">BI", 0, len(message)) + message
        view = memoryview(data)
        while view:
            window = min(
                self._conn.local_flow_control_window(self._stream_id),
                self._conn.max_outbound_frame_size,
            )
            if window <= 0:
                self._window_open.clear()
                await self._window_open.wait()
                if self._closed is not None:
                    raise self._closed
                continue
            chunk, view = view[:window], view[window:]
            self._conn.send_data(self._stream_id, bytes(chunk))
            self._writer.write(self._conn.data_to_send())
        await self._writer.drain()

    async def recv(self) -> bytes:
        item = await self._messages.get()
        if isinstance(item, GrpcClosed):
            self._messages.put_nowait(item)  # every later recv sees the end too
            raise item
        return item

    async def close(self) -> None:
        self._finish(GrpcClosed(1, "cancelled"))
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
        with contextlib.suppress(Exception):
            self._conn.close_connection()
            self._writer.write(self._conn.data_to_send())
        self._writer.close()
        # A TLS peer that never answers our close_notify must not hold the caller: after a
        # moment the socket is dropped.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._writer.wait_closed(), _CLOSE_WAIT)
        transport = self._writer.transport
        try:
            transport.abort()
        except AttributeError:
            # asyncio's TLS transport before CPython 3.11.3 (Debian 12 has 3.11.2) fails its
            # abort() once the connection is gone (its protocol already cleared): nothing
            # is left to drop then. Anything else is a bug and goes on.
            if not transport.is_closing():
                raise

    # -- reading --------------------------------------------------------------------------

    def _finish(self, end: GrpcClosed) -> None:
        if self._closed is None:
            self._closed = end
            self._messages.put_nowait(end)
            self._window_open.set()

    async def _read_loop(self) -> None:
        try:
            while self._closed is None:
                data = await self._reader.read(_READ)
                if not data:
                    self._finish(GrpcClosed(14, "connection closed by the server"))
                    return
                for event in self._conn.receive_data(data):
                    self._on_event(event)
                out = self._conn.data_to_send()
                if out:
                    self._writer.write(out)
        except (OSError, ProtocolError, ValueError) as exc:
            self._finish(GrpcClosed(14, f"transport error: {exc}"))

    def _on_event(self, event: object) -> None:
        if isinstance(event, ResponseReceived):
            headers = _headers(event.headers)
            if headers.get(":status") != "200":
                self._finish(GrpcClosed(2, f"HTTP status {headers.get(':status')}"))
            elif "grpc-status" in headers:  # a trailers-only answer
                self._trailers(headers)
            else:
                self._headers_ok = True
        elif isinstance(event, DataReceived):
            if event.flow_controlled_length:
                self._conn.increment_flow_control_window(event.flow_controlled_length)
                if not event.stream_ended:
                    self._conn.increment_flow_control_window(
                        event.flow_controlled_length, stream_id=event.stream_id
                    )
            if not self._headers_ok:
                self._finish(GrpcClosed(2, "data before response headers"))
                return
            self._buffer += event.data
            self._split()
        elif isinstance(event, TrailersReceived):
            self._trailers(_headers(event.headers))
        elif isinstance(event, StreamEnded):
            self._finish(GrpcClosed(2, "stream ended without a status"))
        elif isinstance(event, StreamReset):
            self._finish(GrpcClosed(14, f"stream reset (HTTP/2 error {event.error_code})"))
        elif isinstance(event, ConnectionTerminated):
            self._finish(GrpcClosed(14, f"connection closed (GOAWAY {event.error_code})"))
        elif isinstance(event, WindowUpdated):
            self._window_open.set()

    def _trailers(self, headers: dict[str, str]) -> None:
        try:
            status = int(headers.get("grpc-status", "2"))
        except ValueError:
            status = 2
        self._finish(GrpcClosed(status, headers.get("grpc-message", "")))

    def _split(self) -> None:
        buf = self._buffer
        while len(buf) >= 5:
            flag, length = struct.unpack_from(">BI", buf)
            if flag != 0:
                self._finish(GrpcClosed(12, "compressed messages are not supported"))
                return
            if length > self._max:
                self._finish(GrpcClosed(8, f"message of {length} bytes over {self._max}"))
                return
            if len(buf) < 5 + length:
                return
            self._messages.put_nowait(bytes(buf[5 : 5 + length]))
            del buf[: 5 + length]
