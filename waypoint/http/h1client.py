"""The HTTP/1.1 client shell: one upstream byte stream, one request at a time.

`send` writes the head, streams the request body in the background (chunked when its
length is unknown) and returns as soon as the response head arrives; the response body
streams through a bounded `StreamBody`. After the exchange the connection is `reusable`
only if both messages were complete and neither side asked to close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from waypoint.http import h1
from waypoint.http.h1 import DEFAULT_LIMITS, Framing, Http1Limits, ProtocolError
from waypoint.http.message import Body, BodyError, BufferedBody, Request, Response, StreamBody
from waypoint.http.splice import splice
from waypoint.http.stream import ByteStream

log = logging.getLogger(__name__)

READ_SIZE = 65536
# Methods whose requests carry no body unless one is given: no Content-Length: 0 for them.
_BODYLESS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS", "TRACE", "CONNECT"})


class UpstreamError(Exception):
    """The upstream broke HTTP/1.1 or closed before its response head (a 502)."""


class Http1Client:
    """HTTP/1.1 over one upstream `ByteStream` (one exchange at a time).

    A connection that is not `reusable` after an exchange must be closed with `aclose()`:
    it may still be sending a request body the upstream stopped reading (it answered
    early), and that task ends only there."""

    __slots__ = (
        "_broken",
        "_buf",
        "_busy",
        "_continue_timeout",
        "_eof",
        "_limits",
        "_req_done",
        "_resp_done",
        "_stream",
        "_tasks",
        "_upgraded",
    )

    def __init__(
        self,
        stream: ByteStream,
        limits: Http1Limits = DEFAULT_LIMITS,
        continue_timeout: float = 1.0,
    ) -> None:
        self._stream = stream
        self._limits = limits
        # How long to wait for 100 Continue before sending the body anyway (RFC 9110 10.1.1).
        self._continue_timeout = continue_timeout
        self._buf = bytearray()
        self._eof = False
        self._busy = False
        self._broken = False
        self._upgraded = False
        self._req_done = True
        self._resp_done = True
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def reusable(self) -> bool:
        """Another request may be sent on this connection now."""
        return (
            not self._busy
            and not self._broken
            and not self._upgraded
            and self._req_done
            and self._resp_done
            and not self._eof
            and not self._stream.closed
        )

    def _spawn(self, coro: object, name: str) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        """Stop what still runs for this connection and abort it."""
        self._broken = True
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._stream.abort("client closed")

    async def _fill(self) -> None:
        data = await self._stream.read(READ_SIZE)
        if data:
            self._buf += data
        else:
            self._eof = True

    async def _read_head(self, method: str) -> h1.ResponseHead:
        while True:
            head = h1.take_head(self._buf, self._limits)
            if head is not None:
                return h1.parse_response_head(head, method, self._limits)
            if self._eof:
                raise ProtocolError(502, "upstream closed before its response head")
            await self._fill()

    async def send(self, request: Request) -> Response:
        """Send `request`; the response as soon as its head arrived. Raises
        UpstreamError when the upstream breaks the protocol or goes away first."""
        if not self.reusable:
            raise RuntimeError("connection is busy or not reusable")
        self._busy = True
        self._req_done = self._resp_done = False
        try:
            return await self._send(request)
        except ProtocolError as e:
            self._broken = True
            raise UpstreamError(e.reason) from None
        except BaseException:
            self._broken = True
            raise
        finally:
            self._busy = False

    async def _send(self, request: Request) -> Response:
        body = request.body
        length = body.length
        if length is None:
            framing = Framing.CHUNKED
        elif length == 0 and request.method in _BODYLESS:
            framing = Framing.NONE
        else:
            framing = Framing.LENGTH
        expect = (
            framing is not Framing.NONE
            and (request.header("expect") or "").lower() == "100-continue"
        )
        try:
            head = h1.request_head(
                request.method,
                request.authority,
                request.path,
                request.headers,
                framing,
                length,
                upgrade=request.upgrade,
                expect_continue=expect,
            )
        except ValueError as e:
            raise ProtocolError(400, str(e)) from None
        method = request.method
        whole = (
            body.take()
            if framing is Framing.LENGTH and not expect and isinstance(body, BufferedBody)
            else None
        )
        # A body held whole (the router keeps small ones for retries) leaves with its head
        # in one write: no task streaming it, and one TLS record upstream. (Its length is
        # the one the head declares: `length` is read from it.)
        self._stream.write(head + whole if whole else head)
        await self._stream.drain()
        if whole is not None or framing is Framing.NONE:
            self._req_done = True
            response = await self._read_head(method)
        elif expect:
            response = await self._await_continue(method, body, framing)
        else:
            self._spawn(self._write_body(body, framing), "http1-client-request-body")
            response = await self._read_head(method)
        while 100 <= response.status < 200 and response.status != 101:
            response = await self._read_head(method)
        return self._response(request, response)

    async def _await_continue(self, method: str, body: Body, framing: Framing) -> h1.ResponseHead:
        """Wait for 100 Continue (or a timeout) before sending the body; a final answer
        that comes first means the body is not sent and the connection is not reused."""
        try:
            async with asyncio.timeout(self._continue_timeout):
                response = await self._read_head(method)
        except TimeoutError:
            self._spawn(self._write_body(body, framing), "http1-client-request-body")
            return await self._read_head(method)
        if response.status == 100:
            self._spawn(self._write_body(body, framing), "http1-client-request-body")
            return await self._read_head(method)
        self._broken = True  # the server may or may not still expect the body
        return response

    async def _write_body(self, body: Body, framing: Framing) -> None:
        stream = self._stream
        sent = 0
        try:
            while data := await body.read():
                sent += len(data)
                stream.write(h1.chunk(data) if framing is Framing.CHUNKED else data)
                await stream.drain()
            if framing is Framing.CHUNKED:
                stream.write(h1.last_chunk(body.trailers))
            elif sent != body.length:
                raise BodyError("request body length differs from its Content-Length")
            await stream.drain()
            self._req_done = True
        except BodyError as e:
            # The downstream went away mid-body: the upstream must not see a complete one.
            log.debug("http1 client: request body failed: %s", e)
            self._broken = True
            stream.abort("request body failed")

    def _response(self, request: Request, head: h1.ResponseHead) -> Response:
        if head.status == 101:
            if request.upgrade is None:
                raise ProtocolError(502, "101 to a request that asked for no upgrade")
            self._upgraded = True
            self._resp_done = True
            upstream, leftover = self._stream, bytes(self._buf)
            self._buf.clear()

            async def upgraded(downstream: ByteStream, downstream_leftover: bytes) -> None:
                await splice(downstream, upstream, from_a=downstream_leftover, from_b=leftover)

            return Response(101, head.headers, upgraded=upgraded)
        if not head.keep_alive:
            self._broken = True  # after this response the upstream closes
        body = StreamBody(head.length if head.framing is Framing.LENGTH else None)
        if head.framing is Framing.NONE:
            body.end()
            self._resp_done = True
        else:
            reader = h1.BodyReader(head.framing, head.length, self._limits)
            if not self._take_buffered_body(reader, body):
                self._spawn(self._read_body(reader, body), "http1-client-response-body")
        return Response(head.status, head.headers, body)

    def _take_buffered_body(self, reader: h1.BodyReader, body: StreamBody) -> bool:
        """Pass on what of the response body is already read, while the body has room;
        True if nothing is left to pass (it ended, or broke framing). A small answer
        usually arrives whole with its head: then no reading task is needed at all."""
        try:
            while body.writable:
                event = reader.next(self._buf, self._eof)
                if event is None:
                    return False
                if isinstance(event, h1.EndOfMessage):
                    body.end(event.trailers)
                    self._resp_done = True
                    if self._buf:
                        self._broken = True  # bytes nobody asked for
                    return True
                body.feed(event.data)
            return False
        except ProtocolError as e:
            self._broken = True
            body.fail(f"upstream response body: {e.reason}")
            return True

    async def _read_body(self, reader: h1.BodyReader, body: StreamBody) -> None:
        try:
            while not self._take_buffered_body(reader, body):
                if body.writable:
                    await self._fill()
                else:
                    await body.wait_writable()
        except asyncio.CancelledError:
            body.fail("connection closed")
            raise
