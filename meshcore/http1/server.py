"""The small HTTP/1.1 servers of the tunnel's node netns (admin, metrics, readiness).

A few routes answered from memory, so by default one request per connection (`Connection:
close`) and Content-Length bodies only. A server whose one client calls it all the time (the
control plane's admission webhook, called by the API server on pod status writes) keeps a
connection for up to `max_requests` requests, answered one after another, so that client
does not pay a TLS handshake per call. The parsing is `meshcore.http1.parse`'s; this module
is the asyncio shell around it.

Invariants (a slow, broken or hostile client must never crash, hang or exhaust it):
- the request line and headers together are at most `max_head` bytes (431 past that);
- a body is at most `max_body` bytes (413, answered before it is read);
- the whole request must arrive within `read_timeout` seconds (408), and the answer must
  be taken within the same time, so an idle or slow client cannot hold a connection; a
  kept connection waits at most `idle_timeout` for the first byte of its next request and
  is then closed without a word (as a client expects of an idle connection);
- at most `max_connections` connections are served at once. A new one past it takes the
  place of the oldest connection still sending its request (slow-loris connections must
  not lock out the scraper that sends its request at once; a kept connection waiting for
  its next request counts as one still sending); when none is, it gets a 503,
  and past `max_connections` such refusals in progress it is reset unanswered;
- every malformed request gets a 4xx/5xx that says what was wrong, then the connection
  closes; a handler that raises becomes a 500 (`failed`), never a dropped connection.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from meshcore.http1.parse import (
    REASONS,
    HttpError,
    format_response,
    keeps_alive,
    parse_request_head,
)

log = structlog.get_logger(__name__)

TEXT = "text/plain; charset=utf-8"
JSON = "application/json; charset=utf-8"

MAX_HEAD = 16 * 1024
MAX_BODY = 1024 * 1024
READ_TIMEOUT = 10.0
MAX_CONNECTIONS = 64
# After an error answer the rest of the request is read and dropped for at most this long:
# closing with unread input makes the kernel send a reset that can destroy the answer.
_LINGER_SECONDS = 1.0
_LINGER_BYTES = 256 * 1024


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str  # percent-decoded
    query: Mapping[str, str]  # the first value of each name
    headers: Mapping[str, str]  # names lower-cased
    body: bytes
    remote: str | None  # the peer's address
    keep_alive: bool = False  # the client lets the connection carry another request


@dataclass(frozen=True, slots=True)
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = TEXT
    headers: Mapping[str, str] = field(default_factory=dict)
    # Called once the whole answer has been handed to the socket, before it closes: for
    # actions (a shutdown) that must not cut off the answer to the request that asked.
    after: Callable[[], None] | None = None

    @classmethod
    def text(cls, text: str, status: int = 200) -> Response:
        return cls(status=status, body=text.encode())

    @classmethod
    def json(cls, doc: Any, status: int = 200, *, indent: int | None = None) -> Response:
        # default=str: addresses and other plain values a source may leave unconverted.
        text = json.dumps(doc, indent=indent, default=str)
        if indent is not None:
            text += "\n"
        return cls(status=status, body=text.encode(), content_type=JSON)


Handler = Callable[[Request], Awaitable[Response]]
# path -> method -> handler; a GET route answers HEAD too.
Routes = Mapping[str, Mapping[str, Handler]]


def status_text(status: int, detail: str = "") -> Response:
    """A plain-text error answer: `404: Not Found`, plus what was wrong when known."""
    text = f"{status}: {REASONS.get(status, 'Error')}"
    return Response.text(f"{text}\n{detail}\n" if detail else text, status)


class NodeHttpServer:
    """One HTTP/1.1 server on host:port; subclasses say what `routes()` serves."""

    def __init__(
        self,
        port: int,
        host: str,
        *,
        read_timeout: float = READ_TIMEOUT,
        max_head: int = MAX_HEAD,
        max_body: int = MAX_BODY,
        max_connections: int = MAX_CONNECTIONS,
        tls: ssl.SSLContext | None = None,
        max_requests: int = 1,
        idle_timeout: float = READ_TIMEOUT,
    ) -> None:
        if max_requests < 1:
            raise ValueError(f"max_requests must be at least 1, not {max_requests}")
        self._port = port
        # Requests one connection may carry (1: none after the first); `idle_timeout`: how
        # long a kept connection waits for the next one.
        self._max_requests = max_requests
        self._idle_timeout = idle_timeout
        # A server context: HTTPS (the control plane's admission webhook); the handshake
        # gets the same time bound as a request.
        self._tls = tls
        self._host = host
        self._read_timeout = read_timeout
        self._max_head = max_head
        self._max_body = max_body
        self._max_connections = max_connections
        self._server: asyncio.Server | None = None
        self._routes: Routes = {}
        # Strong references: asyncio keeps only weak ones to the connection tasks.
        self._conn_tasks: set[asyncio.Task[Any]] = set()
        self._serving = 0  # connections past the limit check (the rest only get a 503)
        self._refusing = 0  # connections being answered 503
        # The served connections still reading their request, oldest first (dict order).
        self._reading: dict[asyncio.Task[Any], None] = {}
        # What the limits did (tests, an operator's view): connections cut off to make
        # room, answered 503, reset unanswered; the most 503s in progress at once.
        self.evicted = 0
        self.refused = 0
        self.reset = 0
        self.refusing_peak = 0
        self.connections = 0  # connections served, and the requests answered on them
        self.requests = 0

    def routes(self) -> Routes:
        raise NotImplementedError

    async def admit(self, request: Request) -> Response | None:
        """A refusal to answer instead of routing the request, or None to route it."""
        return None

    async def not_found(self, request: Request) -> Response:
        """The answer for a path with no route."""
        return status_text(404)

    async def failed(self, request: Request, error: Exception) -> Response:
        """The answer when a handler raised."""
        log.exception("http request failed", path=request.path)
        return status_text(500, f"{type(error).__name__}: {error}")

    async def start(self) -> None:
        self._routes = self.routes()
        # SO_REUSEPORT: an upgraded tunnel can bind beside the old one.
        # limit: the stream reader refuses a head longer than max_head (LimitOverrunError).
        self._server = await asyncio.start_server(
            self._on_connection,
            self._host,
            self._port,
            reuse_port=True,
            limit=self._max_head,
            ssl=self._tls,
            ssl_handshake_timeout=self._read_timeout if self._tls is not None else None,
        )

    @property
    def port(self) -> int:
        """The bound port (useful when started with port 0)."""
        if self._server is not None:
            for sock in self._server.sockets:
                return int(sock.getsockname()[1])
        return self._port

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        tasks = list(self._conn_tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()

    stop = close

    # -- one connection ---------------------------------------------------------------------

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None  # start_server runs each connection in a task
        self._conn_tasks.add(task)
        try:
            if self._serving >= self._max_connections:
                if not self._reading:
                    await self._refuse_connection(reader, writer)
                    return
                # Its slot is freed when its task ends, just after: until then the count
                # is over by the evictions not yet finished (each ends at its next step).
                self._evict_oldest_reader()
            self._serving += 1
            self.connections += 1
            try:
                await self._serve(reader, writer, task)
            finally:
                self._serving -= 1
                self._reading.pop(task, None)
        except (ConnectionError, TimeoutError):
            pass  # the client went away or would not take the answer: nothing to tell it
        finally:
            self._conn_tasks.discard(task)
            writer.close()

    def _evict_oldest_reader(self) -> None:
        """Cut off the connection that has been sending its request the longest: a client
        that sends its request at once is never the oldest for long."""
        oldest = next(iter(self._reading))
        del self._reading[oldest]
        self.evicted += 1
        oldest.cancel(msg="evicted")
        log.debug("http connection evicted", port=self._port)

    async def _refuse_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if self._refusing >= self._max_connections:
            # A flood: even the 503 and its linger cost a task each; reset instead.
            self.reset += 1
            writer.transport.abort()
            return
        self.refused += 1
        self._refusing += 1
        self.refusing_peak = max(self.refusing_peak, self._refusing)
        try:
            await self._answer_error(reader, writer, status_text(503, "too many connections"))
        finally:
            self._refusing -= 1

    async def _serve(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        task: asyncio.Task[Any],
    ) -> None:
        for served in range(self._max_requests):
            # Waiting for a request, the first or the next: the connection may be evicted.
            self._reading[task] = None
            try:
                request = await self._read_request(reader, writer, kept=served > 0)
            except HttpError as e:
                self._reading.pop(task, None)
                log.debug("bad http request", status=e.status, error=str(e))
                await self._answer_error(reader, writer, status_text(e.status, str(e)))
                return
            self._reading.pop(task, None)
            if request is None:
                return  # closed (or left idle) before sending anything
            self.requests += 1
            response = await self.admit(request) or await self._dispatch(request)
            # The last request the connection may carry, or one whose client or handler
            # ends the connection (an action after the answer), says so and closes.
            keep = (
                request.keep_alive
                and served + 1 < self._max_requests
                and response.after is None
                and self._server is not None
            )
            writer.write(
                format_response(
                    response.status,
                    response.body,
                    response.content_type,
                    response.headers,
                    head_only=request.method == "HEAD",
                    keep_alive=keep,
                )
            )
            async with asyncio.timeout(self._read_timeout):
                await writer.drain()
            if response.after is not None:
                response.after()
            if not keep:
                return

    async def _read_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, kept: bool = False
    ) -> Request | None:
        """The next request, or None when the client closed (or, on a `kept` connection,
        sent nothing within `idle_timeout`) before its first byte."""
        first = b""
        if kept:
            try:
                async with asyncio.timeout(self._idle_timeout):
                    first = await reader.read(1)
            except TimeoutError:
                return None
            if not first:
                return None
        try:
            async with asyncio.timeout(self._read_timeout):
                try:
                    raw = first + await reader.readuntil(b"\r\n\r\n")
                except asyncio.LimitOverrunError:
                    raise HttpError(
                        431, f"request line and headers exceed {self._max_head} bytes"
                    ) from None
                except asyncio.IncompleteReadError as e:
                    if not e.partial and not first:
                        return None
                    raise HttpError(400, "connection closed inside the request head") from None
                head = parse_request_head(raw[:-4])
                if head.content_length > self._max_body:
                    raise HttpError(
                        413,
                        f"request body of {head.content_length} bytes exceeds "
                        f"{self._max_body} bytes",
                    )
                try:
                    body = await reader.readexactly(head.content_length)
                except asyncio.IncompleteReadError:
                    raise HttpError(400, "body shorter than its Content-Length") from None
        except TimeoutError:
            raise HttpError(
                408, f"request not received within {self._read_timeout:g} seconds"
            ) from None
        peer = writer.get_extra_info("peername")
        return Request(
            method=head.method,
            path=head.path,
            query=head.query,
            headers=head.headers,
            body=body,
            remote=str(peer[0]) if isinstance(peer, tuple) and peer else None,
            keep_alive=keeps_alive(head),
        )

    async def _dispatch(self, request: Request) -> Response:
        methods = self._routes.get(request.path)
        try:
            if methods is None:
                return await self.not_found(request)
            handler = methods.get(request.method)
            if handler is None and request.method == "HEAD":
                handler = methods.get("GET")
            if handler is None:
                allowed = sorted({*methods, *(["HEAD"] if "GET" in methods else [])})
                answer = status_text(405)
                return Response(
                    status=405,
                    body=answer.body,
                    content_type=answer.content_type,
                    headers={"Allow": ", ".join(allowed)},
                )
            return await handler(request)
        except Exception as e:
            return await self.failed(request, e)

    async def _answer_error(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, response: Response
    ) -> None:
        """Write an error answer, then close gently: stop sending, and read (and drop) what
        the client is still sending for a moment so the close does not reset the answer."""
        try:
            async with asyncio.timeout(min(self._read_timeout, _LINGER_SECONDS)):
                writer.write(format_response(response.status, response.body, response.content_type))
                await writer.drain()
                if writer.can_write_eof():
                    writer.write_eof()
                dropped = 0
                while dropped < _LINGER_BYTES:
                    chunk = await reader.read(65536)
                    if not chunk:
                        break
                    dropped += len(chunk)
        except (ConnectionError, TimeoutError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()
