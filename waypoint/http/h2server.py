"""The HTTP/2 server shell (prior knowledge, on `h2`): one inbound byte stream, each
stream's request handed to the `Handler` in its own task, responses (with trailers, or
trailers-only) written back within the peer's windows.

One loop reads the connection and turns `h2` events into request bodies, resets and
window wake-ups; each stream's task runs the handler and sends its response. The
connection ends on EOF, on a GOAWAY from the peer, on a protocol error (GOAWAY with the
error), on abuse (rapid resets, control-frame floods: GOAWAY ENHANCE_YOUR_CALM), when idle,
or after a drain (GOAWAY, then the open streams finish).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
from collections.abc import Callable

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
from waypoint.http.message import BodyError, Handler, Request, Wire, text_response
from waypoint.http.stream import ByteStream

log = logging.getLogger(__name__)

READ_SIZE = 65536


class _Server:
    __slots__ = (
        "_bodies",
        "_control",
        "_drain",
        "_draining",
        "_goaway_sent",
        "_handler",
        "_last_stream",
        "_quiet",
        "_resets",
        "_shell",
        "_tasks",
    )

    def __init__(
        self,
        stream: ByteStream,
        handler: Handler,
        limits: Http2Limits,
        draining: Callable[[], bool],
        drain: asyncio.Event | None,
    ) -> None:
        self._shell = H2Shell(stream, new_connection(False, limits), limits)
        self._handler = handler
        self._draining = draining
        self._drain = drain
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._bodies: dict[int, FlowBody] = {}
        self._resets: collections.deque[float] = collections.deque()
        self._control: collections.deque[float] = collections.deque()
        self._goaway_sent = False
        self._last_stream = 0
        self._quiet = asyncio.Event()

    async def run(self) -> None:
        shell = self._shell
        shell.start()
        drain_waiter: asyncio.Task[bool] | None = None
        if self._drain is not None:
            drain_waiter = asyncio.create_task(self._drain.wait(), name="http2-drain-signal")
        try:
            await self._loop(drain_waiter)
        finally:
            shell.closed = True
            if drain_waiter is not None:
                drain_waiter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await drain_waiter
            for body in self._bodies.values():
                body.fail("connection closed")
            tasks = list(self._tasks.values())
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            shell.flush()
            await shell.stream.drain()
            shell.stream.write_eof()

    async def _loop(self, drain_waiter: asyncio.Task[bool] | None) -> None:
        shell = self._shell
        stream = shell.stream
        limits = shell.limits
        read: asyncio.Future[bytes] | None = None
        quiet = asyncio.ensure_future(self._quiet.wait())
        try:
            while True:
                if self._goaway_sent and not self._tasks:
                    return
                if drain_waiter is not None and drain_waiter.done() and not self._goaway_sent:
                    self._goaway(h2.errors.ErrorCodes.NO_ERROR)
                    continue
                if read is None:
                    read = asyncio.ensure_future(stream.read(READ_SIZE))
                if quiet.done():
                    self._quiet.clear()
                    quiet = asyncio.ensure_future(self._quiet.wait())
                waiters: set[asyncio.Future[object]] = {read, quiet}  # type: ignore[arg-type]
                if drain_waiter is not None and not drain_waiter.done():
                    waiters.add(drain_waiter)  # type: ignore[arg-type]
                idle = None if self._tasks else limits.idle_timeout
                done, _ = await asyncio.wait(
                    waiters, timeout=idle, return_when=asyncio.FIRST_COMPLETED
                )
                if not done:  # idle
                    self._goaway(h2.errors.ErrorCodes.NO_ERROR)
                    return
                if read not in done:
                    continue
                data = read.result()
                read = None
                if not data:
                    return
                try:
                    events = shell.conn.receive_data(data)
                except h2.exceptions.ProtocolError as e:
                    log.debug("http2: protocol error: %s", e)
                    shell.flush()  # h2 queued the GOAWAY
                    return
                for event in events:
                    if not self._on_event(event):
                        shell.flush()
                        return
                shell.flush()
                await stream.drain()  # a peer that does not read stops being read
        finally:
            for future in (read, quiet):
                if future is not None and not future.done():
                    future.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await future

    def _goaway(self, code: int) -> None:
        shell = self._shell
        if not self._goaway_sent:
            self._goaway_sent = True
            shell.goaway(code, self._last_stream)

    def _too_many(self, times: collections.deque[float], cap: int) -> bool:
        now = asyncio.get_running_loop().time()
        times.append(now)
        while times and times[0] < now - self._shell.limits.reset_window:
            times.popleft()
        return len(times) > cap

    def _on_event(self, event: h2.events.Event) -> bool:
        """Handle one event; False when the connection must end now."""
        shell = self._shell
        if isinstance(event, h2.events.RequestReceived):
            self._on_request(event)
        elif isinstance(event, h2.events.DataReceived):
            if (
                not event.data
                and event.stream_ended is None
                and self._too_many(self._control, shell.limits.max_control_frames)
            ):
                # Empty DATA frames cost the sender nothing and us an event each.
                log.warning("http2: empty DATA flood: closing the connection")
                self._goaway(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
                return False
            body = self._bodies.get(event.stream_id)
            padding = event.flow_controlled_length - len(event.data)
            if padding:
                shell.acker(event.stream_id)(padding)
            if body is not None:
                body.feed(event.data)
            else:
                shell.acker(event.stream_id)(len(event.data))
        elif isinstance(event, h2.events.TrailersReceived):
            body = self._bodies.get(event.stream_id)
            if body is not None:
                body.end([(k, v) for k, v in decoded(event.headers) if not k.startswith(":")])
                del self._bodies[event.stream_id]
        elif isinstance(event, h2.events.StreamEnded):
            body = self._bodies.pop(event.stream_id, None)
            if body is not None:
                body.end()
        elif isinstance(event, h2.events.StreamReset):
            body = self._bodies.pop(event.stream_id, None)
            if body is not None:
                body.fail("stream reset by the client")
            task = self._tasks.pop(event.stream_id, None)
            if task is not None:
                task.cancel()
                if self._too_many(self._resets, shell.limits.max_rapid_resets):
                    log.warning("http2: rapid resets: closing the connection")
                    self._goaway(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
                    return False
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            shell.window_opened()
            if isinstance(event, h2.events.RemoteSettingsChanged) and self._too_many(
                self._control, shell.limits.max_control_frames
            ):
                self._goaway(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
                return False
        elif isinstance(event, h2.events.PingReceived):
            if self._too_many(self._control, shell.limits.max_control_frames):
                log.warning("http2: PING flood: closing the connection")
                self._goaway(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
                return False
        elif isinstance(event, h2.events.ConnectionTerminated):
            return False
        return True

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        shell = self._shell
        stream_id = event.stream_id
        self._last_stream = max(self._last_stream, stream_id)
        if self._goaway_sent:
            shell.reset(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        if len(event.headers) > shell.limits.max_headers:
            # Envoy answers 431 (max_headers_count): the client learns why, and many small
            # fields cost us per field what one large one would not.
            log.debug("http2: %d header fields on stream %d", len(event.headers), stream_id)
            shell.conn.send_headers(stream_id, [(b":status", b"431")], end_stream=True)
            if event.stream_ended is None:
                shell.reset(stream_id, h2.errors.ErrorCodes.NO_ERROR)
            return
        pseudo, headers = split_pseudo(decoded(event.headers))
        method = pseudo.get(":method", "")
        if method == "CONNECT":
            shell.reset(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        ended = event.stream_ended is not None
        body = FlowBody(0 if ended else content_length(headers), shell.acker(stream_id))
        if ended:
            body.end()
        else:
            self._bodies[stream_id] = body
        request = Request(
            method=method,
            authority=pseudo.get(":authority") or _host(headers),
            path=pseudo.get(":path", ""),
            headers=[(k, v) for k, v in headers if k != "host"],
            body=body,
            scheme=pseudo.get(":scheme", "http"),
            wire=Wire.HTTP2,
        )
        task = asyncio.create_task(self._respond(stream_id, request), name="http2-stream")
        self._tasks[stream_id] = task
        task.add_done_callback(functools.partial(self._done, stream_id))
        if self._draining():
            self._goaway(h2.errors.ErrorCodes.NO_ERROR)

    def _done(self, stream_id: int, _task: asyncio.Task[None]) -> None:
        self._tasks.pop(stream_id, None)
        self._bodies.pop(stream_id, None)
        if not self._tasks:
            self._quiet.set()  # after a GOAWAY, the loop may end now

    async def _respond(self, stream_id: int, request: Request) -> None:
        shell = self._shell
        answered = False
        try:
            await self._answer(stream_id, request)
            answered = True
        finally:
            if not answered and not shell.closed:
                # Cancelled (the client reset the stream: then this is a no-op) or failed
                # midway: a stream must never stay open without an answer.
                shell.reset(stream_id, h2.errors.ErrorCodes.INTERNAL_ERROR)
            if self._draining() and not self._goaway_sent and not shell.closed:
                self._goaway(h2.errors.ErrorCodes.NO_ERROR)

    async def _answer(self, stream_id: int, request: Request) -> None:
        shell = self._shell
        try:
            response = await self._handler(request)
        except Exception:
            log.exception("http2: handler failed for %s %s", request.method, request.path)
            response = text_response(500, "internal error")
        status = 502 if response.status < 200 else response.status
        body = response.body
        fields = wire_headers(response.headers)
        if request.method != "HEAD" and status not in (204, 304):
            # (a HEAD or 304 answer's Content-Length describes the resource: kept as given)
            fields = framed(fields, body.length)
        headers = [(b":status", str(status).encode()), *fields]
        try:
            if body.length == 0 and not _has_trailers(body):
                # Trailers-only (gRPC errors) and empty answers: one HEADERS, END_STREAM.
                await body.read()
                trailers = wire_headers(body.trailers)
                shell.conn.send_headers(stream_id, headers + trailers, end_stream=True)
                shell.flush()
            else:
                shell.conn.send_headers(stream_id, headers)
                shell.flush()
                if request.method == "HEAD" or status in (204, 304):
                    shell.conn.end_stream(stream_id)
                    shell.flush()
                else:
                    await shell.send_body(stream_id, body)
            if stream_id in self._bodies:
                # Answered before the request body ended: tell the client to stop sending
                # it (RFC 9113 8.1), or its sender would wait for credit forever.
                self._bodies.pop(stream_id).fail("answered before the request body ended")
                shell.reset(stream_id, h2.errors.ErrorCodes.NO_ERROR)
            await shell.stream.drain()
        except (h2.exceptions.StreamClosedError, BodyError):
            return
        except h2.exceptions.ProtocolError as e:
            log.debug("http2: response on stream %d not sent: %s", stream_id, e)
            shell.reset(stream_id, h2.errors.ErrorCodes.INTERNAL_ERROR)


def _host(headers: list[tuple[str, str]]) -> str:
    for k, v in headers:
        if k == "host":
            return v
    return ""


def _has_trailers(body: object) -> bool:
    return bool(getattr(body, "trailers", None))


async def serve_http2(
    stream: ByteStream,
    handler: Handler,
    limits: Http2Limits = DEFAULT_H2_LIMITS,
    draining: Callable[[], bool] = lambda: False,
    drain: asyncio.Event | None = None,
) -> None:
    """Serve HTTP/2 (prior knowledge: the client preface first) on `stream` until the
    connection ends. `draining()` is looked at as streams open and close; setting `drain`
    sends GOAWAY at once, even on an idle connection. Returns after our side is ended."""
    await _Server(stream, handler, limits, draining, drain).run()
