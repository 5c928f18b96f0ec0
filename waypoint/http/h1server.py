"""The HTTP/1.1 server shell: one inbound byte stream, requests handed to a `Handler` in
order, responses written back.

One request is served at a time (pipelined requests wait in the receive buffer and are
answered in order, as RFC 9112 requires). While a handler runs, a body task feeds the
request body from the socket into a bounded `StreamBody`, so a slow upstream slows the
client. The connection ends after a response that says `Connection: close` (the client
asked, it was HTTP/1.0 without keep-alive, the request body was not read to its end, the
proxy is draining), on a protocol error (answered 4xx first, then closed), on the idle or
head timeout, or when the client goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from waypoint.http import h1
from waypoint.http.h1 import (
    DEFAULT_LIMITS,
    Framing,
    Http1Limits,
    ProtocolError,
    RequestHead,
    RequestParser,
)
from waypoint.http.message import (
    BodyError,
    Handler,
    Request,
    Response,
    StreamBody,
    Wire,
    text_response,
)
from waypoint.http.stream import ByteStream

log = logging.getLogger(__name__)

READ_SIZE = 65536
LINGER_SECONDS = 2.0
LINGER_BYTES = 256 * 1024


class _RequestBody(StreamBody):
    """A request body that sends `100 Continue` when its reader first asks for bytes:
    the client then knows the handler wants the body (RFC 9110 10.1.1)."""

    __slots__ = ("_on_first_read",)

    def __init__(self, length: int | None, on_first_read: Callable[[], None] | None) -> None:
        super().__init__(length)
        self._on_first_read = on_first_read

    async def read(self) -> bytes:
        if self._on_first_read is not None:
            callback, self._on_first_read = self._on_first_read, None
            callback()
        return await super().read()


class _Connection:
    __slots__ = (
        "_body_error",
        "_continue_state",
        "_draining",
        "_handler",
        "_limits",
        "_parser",
        "_stream",
        "refused",
    )

    def __init__(
        self,
        stream: ByteStream,
        handler: Handler,
        limits: Http1Limits,
        draining: Callable[[], bool],
    ) -> None:
        self._stream = stream
        self._handler = handler
        self._limits = limits
        self._draining = draining
        self._parser = RequestParser(limits)
        self._body_error: ProtocolError | None = None
        self.refused = False  # an error answer was sent
        # For the request being served: "none" (no 100 expected), "wanted" (not sent yet),
        # "sent", or "too-late" (the final response head went first).
        self._continue_state = "none"

    async def _read(self, limit: float) -> bool:
        """Read once into the parser; False if nothing came within `limit` seconds."""
        try:
            async with asyncio.timeout(limit):
                data = await self._stream.read(READ_SIZE)
        except TimeoutError:
            return False
        self._parser.feed(data)
        return True

    async def _next_head(self) -> RequestHead | None:
        """The next request head; None when the connection should just end (the client
        closed or stayed idle). A protocol error or slow head is answered here."""
        loop = asyncio.get_running_loop()
        head_deadline: float | None = None
        parser = self._parser
        while True:
            try:
                head = parser.next_head()
            except ProtocolError as e:
                self._refuse(e)
                return None
            if head is not None:
                return head
            if parser.eof:
                return None
            if parser.head_started:
                if head_deadline is None:
                    head_deadline = loop.time() + self._limits.head_timeout
                timeout = head_deadline - loop.time()
                if timeout <= 0 or not await self._read(timeout):
                    self._refuse(ProtocolError(408, "request head not received in time"))
                    return None
            elif not await self._read(self._limits.idle_timeout):
                return None

    def _refuse(self, error: ProtocolError) -> None:
        log.debug("http1: refused: %d %s", error.status, error.reason)
        self.refused = True
        self._stream.write(h1.error_response(error.status, error.reason))

    def _take_buffered_body(self, body: StreamBody) -> bool:
        """Feed what of the current request's body is already buffered, while the body has
        room; True if nothing is left to feed (the body ended, or broke framing). A small
        request usually arrives whole with its head: then no pump task is needed at all."""
        parser = self._parser
        try:
            while body.writable:
                event = parser.next_body()
                if event is None:
                    return False
                if isinstance(event, h1.EndOfMessage):
                    body.end(event.trailers)
                    return True
                if self._continue_state == "wanted":
                    self._continue_state = "none"  # sent without waiting for 100 Continue
                body.feed(event.data)
            return False
        except ProtocolError as e:
            self._body_error = e
            body.fail(e.reason)
            return True

    async def _pump_body(self, body: StreamBody) -> None:
        """Feed the current request's body from the socket until its end."""
        while not self._take_buffered_body(body):
            if not body.writable:
                await body.wait_writable()
            elif not await self._read(self._limits.body_timeout):
                # Answered 408 and closed, like broken framing: the rest of the body may
                # still come and must not be read as a request.
                self._body_error = ProtocolError(408, "request body stalled")
                body.fail("request body stalled")
                return

    def _send_continue(self) -> None:
        if self._continue_state == "wanted":
            self._continue_state = "sent"
            self._stream.write(h1.CONTINUE)

    async def run(self) -> None:
        while True:
            head = await self._next_head()
            if head is None:
                return
            self._body_error = None
            self._continue_state = "wanted" if head.expect_continue else "none"
            # No body is a body of length 0 (not unknown): forwarded, it needs no framing.
            body = _RequestBody(
                None if head.framing is Framing.CHUNKED else head.length or 0,
                self._send_continue if head.expect_continue else None,
            )
            request = Request(
                method=head.method,
                authority=head.authority,
                path=head.path,
                headers=head.headers,
                body=body,
                wire=Wire.HTTP11,
                upgrade=head.upgrade,
            )
            pump: asyncio.Task[None] | None = None
            if head.framing is Framing.NONE:
                parser_event = self._parser.next_body()
                assert isinstance(parser_event, h1.EndOfMessage)
                body.end()
            elif not self._take_buffered_body(body):
                pump = asyncio.create_task(self._pump_body(body), name="http1-request-body")
            try:
                keep_going = await self._serve(head, request, pump)
            finally:
                if pump is not None and not pump.done():
                    pump.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await pump
            if not keep_going:
                return
            self._parser.next_request()

    async def _serve(
        self, head: RequestHead, request: Request, pump: asyncio.Task[None] | None
    ) -> bool:
        """Answer one request; True if the connection may carry another."""
        stream = self._stream
        try:
            response = await self._handler(request)
        except Exception:
            log.exception("http1: handler failed for %s %s", head.method, head.path)
            response = text_response(500, "internal error")
        if self._body_error is not None:
            # The request body broke framing: whatever the handler made of it, the client
            # gets the 400 and the connection ends (the next bytes cannot be trusted).
            self._refuse(self._body_error)
            return False
        if self._continue_state == "wanted":
            self._continue_state = "too-late"
        if (
            response.status == 101
            and head.upgrade is not None
            and response.upgraded is not None
            and (pump is None or pump.done())
        ):
            stream.write(
                h1.response_head(
                    101, response.headers, Framing.NONE, None, close=False, upgrade=head.upgrade
                )
            )
            await stream.drain()
            await response.upgraded(stream, self._parser.leftover())
            return False
        if response.status == 101 or (100 <= response.status < 200):
            response = text_response(502, "upstream answered with an unexpected 1xx")
        # A client that never got its 100 Continue may or may not send the body now; the
        # next request cannot be found without guessing, so this one is the last.
        complete = self._continue_state != "too-late"
        decision = h1.response_framing(
            method=head.method,
            version=head.version,
            status=response.status,
            body_length=response.body.length,
            keep_alive=head.keep_alive,
            request_complete=complete,
            draining=self._draining(),
        )
        try:
            stream.write(
                h1.response_head(
                    response.status,
                    response.headers,
                    decision.framing,
                    response.body.length,
                    close=decision.close,
                    version=head.version,
                )
            )
        except ValueError:
            log.warning("http1: response head for %s %s not writable", head.method, head.path)
            stream.write(h1.error_response(502, "upstream response head not writable"))
            return False
        if not await self._write_body(response, decision.framing):
            stream.abort("response body failed")
            return False
        await stream.drain()
        # The handler answered without reading the whole request body: what is left of it
        # would be read as the next request.
        return not decision.close and (pump is None or pump.done())

    async def _write_body(self, response: Response, framing: Framing) -> bool:
        """Stream the response body; False if it could not be written whole."""
        stream = self._stream
        body = response.body
        if framing is Framing.NONE:
            return True
        expected = body.length
        sent = 0
        try:
            while chunk := await body.read():
                sent += len(chunk)
                if framing is Framing.CHUNKED:
                    stream.write(h1.chunk(chunk))
                else:
                    if expected is not None and sent > expected:
                        log.warning("http1: response body longer than its length")
                        return False
                    stream.write(chunk)
                await stream.drain()
                if stream.closed:
                    return False
        except BodyError as e:
            log.debug("http1: response body ended early: %s", e)
            return False
        if framing is Framing.CHUNKED:
            stream.write(h1.last_chunk(body.trailers))
        elif framing is Framing.LENGTH and sent != expected:
            log.warning("http1: response body shorter than its length")
            return False
        return True


async def serve_http1(
    stream: ByteStream,
    handler: Handler,
    limits: Http1Limits = DEFAULT_LIMITS,
    draining: Callable[[], bool] = lambda: False,
) -> None:
    """Serve HTTP/1.1 on `stream` until the connection ends. Returns after our side is
    ended (`write_eof`) or the stream was aborted; the caller closes the stream."""
    conn = _Connection(stream, handler, limits, draining)
    try:
        await conn.run()
    finally:
        await stream.drain()
        stream.write_eof()
    if conn.refused:
        await _linger(stream)


async def _linger(stream: ByteStream) -> None:
    """After an error answer, read (and drop) what the client still sends, briefly: closing
    with unread bytes makes the kernel reset the connection, and a reset can destroy the
    answer before the client reads it (nginx's lingering close)."""
    left = LINGER_BYTES
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(LINGER_SECONDS):
            while left > 0 and (data := await stream.read(READ_SIZE)):
                left -= len(data)
