"""The HTTP/2 client shell (prior knowledge, on `h2`): many requests multiplexed on one
upstream byte stream.

A reader task owns the receive side: it turns `h2` events into response heads (resolving
each `send`'s future), body bytes (flow-controlled: credit returns as the caller reads),
trailers, and resets. Each request body is sent by its own task within the windows.
`available` says whether another stream may be opened (the connection is up, no GOAWAY
came, and the peer's concurrency limit is not reached).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import h2.errors
import h2.events
import h2.exceptions

from waypoint.http.h2base import (
    DEFAULT_H2_LIMITS,
    FlowBody,
    H2Shell,
    Http2Limits,
    content_length,
    decoded,
    framed,
    new_connection,
    split_pseudo,
    wire_headers,
)
from waypoint.http.message import Body, BodyError, Request, Response
from waypoint.http.stream import ByteStream

log = logging.getLogger(__name__)

READ_SIZE = 65536


class StreamError(Exception):
    """The upstream reset the stream or the connection ended before the response head."""


class _Exchange:
    __slots__ = ("body", "head", "method", "sender")

    def __init__(self, method: str) -> None:
        self.method = method
        self.head: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self.body: FlowBody | None = None
        self.sender: asyncio.Task[None] | None = None


class Http2Client:
    """HTTP/2 to one upstream over `stream`; call `aclose()` when done with it."""

    __slots__ = ("_exchanges", "_goaway", "_reader", "_shell")

    def __init__(self, stream: ByteStream, limits: Http2Limits = DEFAULT_H2_LIMITS) -> None:
        self._shell = H2Shell(stream, new_connection(True, limits), limits)
        self._shell.start()
        self._exchanges: dict[int, _Exchange] = {}
        self._goaway = False
        self._reader: asyncio.Task[None] = asyncio.create_task(
            self._read_loop(), name="http2-client-reader"
        )

    @property
    def available(self) -> bool:
        """Room for another stream on this connection."""
        shell = self._shell
        return (
            not shell.closed
            and not self._goaway
            and shell.conn.open_outbound_streams < shell.conn.remote_settings.max_concurrent_streams
        )

    @property
    def active(self) -> int:
        """Streams in flight."""
        return len(self._exchanges)

    async def send(self, request: Request) -> Response:
        """Open a stream for `request`; the response once its head arrived (its body and
        trailers stream). Raises StreamError if the upstream refuses or resets it first."""
        if not self.available:
            raise StreamError("no room for another stream on this connection")
        shell = self._shell
        conn = shell.conn
        stream_id = conn.get_next_available_stream_id()
        headers = [
            (b":method", request.method.encode("latin-1")),
            (b":scheme", request.scheme.encode("latin-1")),
            (b":authority", request.authority.encode("latin-1")),
            (b":path", request.path.encode("latin-1")),
            *framed(wire_headers(request.headers), request.body.length),
        ]
        body = request.body
        empty = body.length == 0 and not body.trailers
        exchange = _Exchange(request.method)
        self._exchanges[stream_id] = exchange
        try:
            conn.send_headers(stream_id, headers, end_stream=empty)
        except h2.exceptions.ProtocolError as e:
            del self._exchanges[stream_id]
            raise StreamError(f"request not sendable: {e}") from None
        shell.flush()
        if not empty:
            exchange.sender = asyncio.create_task(
                self._send_body(stream_id, body), name="http2-client-request-body"
            )
        try:
            return await exchange.head
        except asyncio.CancelledError:
            self._cancel(stream_id)
            raise

    async def _send_body(self, stream_id: int, body: Body) -> None:
        try:
            await self._shell.send_body(stream_id, body)
        except (h2.exceptions.StreamClosedError, BodyError):
            return
        except h2.exceptions.ProtocolError as e:
            log.debug("http2 client: request body on stream %d: %s", stream_id, e)
            self._shell.reset(stream_id, h2.errors.ErrorCodes.INTERNAL_ERROR)

    def _cancel(self, stream_id: int) -> None:
        """The caller gave up: reset the stream."""
        exchange = self._exchanges.pop(stream_id, None)
        if exchange is None:
            return
        if exchange.sender is not None:
            exchange.sender.cancel()
        if exchange.body is not None:
            exchange.body.fail("request cancelled")
        self._shell.reset(stream_id, h2.errors.ErrorCodes.CANCEL)

    async def _read_loop(self) -> None:
        shell = self._shell
        try:
            while data := await shell.stream.read(READ_SIZE):
                state = shell.conn.state_machine.state
                try:
                    events = shell.conn.receive_data(data)
                    for event in events:
                        if isinstance(event, h2.events.ConnectionTerminated):
                            shell.peer_goaway(event.error_code or 0, state)
                except h2.exceptions.ProtocolError as e:
                    log.debug("http2 client: protocol error: %s", e)
                    shell.flush()
                    return
                for event in events:
                    self._on_event(event)
                shell.flush()
                await shell.stream.drain()
        finally:
            self._end("connection closed")

    def _end(self, reason: str) -> None:
        shell = self._shell
        shell.closed = True
        shell.window_opened()
        for stream_id in list(self._exchanges):
            exchange = self._exchanges.pop(stream_id)
            if not exchange.head.done():
                exchange.head.set_exception(StreamError(reason))
            if exchange.body is not None:
                exchange.body.fail(reason)
            if exchange.sender is not None:
                exchange.sender.cancel()

    def _finish(self, stream_id: int, trailers: list[tuple[str, str]] | None = None) -> None:
        exchange = self._exchanges.get(stream_id)
        if exchange is None:
            return
        if exchange.body is not None:
            exchange.body.end(trailers)
        if exchange.sender is None or exchange.sender.done():
            del self._exchanges[stream_id]
        else:
            # The response is complete but our request body is still going (the server
            # answered early): keep the stream until the sender stops.
            exchange.sender.add_done_callback(lambda _t: self._exchanges.pop(stream_id, None))

    def _on_event(self, event: h2.events.Event) -> None:
        shell = self._shell
        if isinstance(event, h2.events.ResponseReceived):
            exchange = self._exchanges.get(event.stream_id)
            if exchange is None:
                return
            pseudo, headers = split_pseudo(decoded(event.headers))
            ended = event.stream_ended is not None
            status = int(pseudo.get(":status", "502"))
            no_body = ended or exchange.method == "HEAD" or status in (204, 304)
            body = FlowBody(
                0 if no_body else content_length(headers),
                shell.acker(event.stream_id),
            )
            exchange.body = body
            if not exchange.head.done():
                exchange.head.set_result(Response(status, headers, body))
        elif isinstance(event, h2.events.DataReceived):
            exchange = self._exchanges.get(event.stream_id)
            padding = event.flow_controlled_length - len(event.data)
            ack = shell.acker(event.stream_id)
            if padding:
                ack(padding)
            if exchange is not None and exchange.body is not None:
                exchange.body.feed(event.data)
            else:
                ack(len(event.data))
        elif isinstance(event, h2.events.TrailersReceived):
            self._finish(
                event.stream_id,
                [(k, v) for k, v in decoded(event.headers) if not k.startswith(":")],
            )
        elif isinstance(event, h2.events.StreamEnded):
            self._finish(event.stream_id)
        elif isinstance(event, h2.events.StreamReset):
            exchange = self._exchanges.pop(event.stream_id, None)
            if exchange is not None:
                reason = f"stream reset by the upstream ({event.error_code!r})"
                if not exchange.head.done():
                    exchange.head.set_exception(StreamError(reason))
                if exchange.body is not None and not exchange.body.ended:
                    exchange.body.fail(reason)  # an answer that already ended stands
                if exchange.sender is not None:
                    exchange.sender.cancel()
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            shell.window_opened()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._goaway = True
            last = event.last_stream_id or 0
            # Streams above the last one the server processed were not seen: fail them now
            # (a retry may resend them elsewhere); the others finish.
            for stream_id in [s for s in self._exchanges if s > last]:
                exchange = self._exchanges.pop(stream_id)
                if not exchange.head.done():
                    exchange.head.set_exception(StreamError("refused by GOAWAY"))
                if exchange.sender is not None:
                    exchange.sender.cancel()

    async def aclose(self) -> None:
        """GOAWAY, stop the reader and the senders, end our side of the stream."""
        shell = self._shell
        if not shell.closed:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                shell.conn.close_connection()
            shell.flush()
            await shell.stream.drain()
            shell.stream.write_eof()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        senders = [e.sender for e in self._exchanges.values() if e.sender is not None]
        self._end("client closed")
        for sender in senders:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sender
