"""W3C trace context at the waypoint: parse, continue, propagate. Pure: ids and clock are
passed in (`Ids`), nothing is sent from here (`waypoint.telemetry.export` does that).

Per request (`start_request`):
- the parent is the request's `traceparent` if valid, else the tunnel's CONNECT
  `traceparent` (so the tunnel's hop and the request share one trace), else none (a new
  trace). An invalid header starts a new trace rather than failing the request;
  `tracestate` is kept only with the request's own valid `traceparent`;
- `x-request-id` is added when absent (a uuid4), and kept when present;
- one server span for the request; one client span per upstream attempt (`attempt`), child
  of the server span, whose context is what the upstream request carries (`traceparent`,
  `tracestate`), so the upstream's spans hang under the waypoint's.

Attributes follow OpenTelemetry's HTTP semantic conventions (stable names); a server span is
an error for 5xx or no response, a client span for 4xx and 5xx too.
"""

from __future__ import annotations

import enum
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from waypoint.http.message import Headers, Request, Wire

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
REQUEST_ID = "x-request-id"
SAMPLED = 0x01

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_MAX_TRACESTATE = 512  # W3C: a vendor may drop tracestate it cannot keep whole

AttrValue = str | int | float | bool


class SpanKind(enum.IntEnum):
    """OTLP's Span.SpanKind numbers."""

    SERVER = 2
    CLIENT = 3


class StatusCode(enum.IntEnum):
    """OTLP's Status.StatusCode numbers."""

    UNSET = 0
    OK = 1
    ERROR = 2


@dataclass(frozen=True, slots=True)
class TraceContext:
    trace_id: bytes  # 16 bytes, not all zero
    span_id: bytes  # 8 bytes, not all zero: the parent's span
    flags: int
    tracestate: str = ""


def parse_traceparent(value: str | None, tracestate: str | None = None) -> TraceContext | None:
    """A valid W3C `traceparent` (version 00, or a later one read as 00), else None."""
    if value is None:
        return None
    m = _TRACEPARENT.fullmatch(value.strip())
    if m is None:
        return None
    version, trace_hex, span_hex, flags_hex, rest = m.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    trace_id, span_id = bytes.fromhex(trace_hex), bytes.fromhex(span_hex)
    if not any(trace_id) or not any(span_id):
        return None
    state = (tracestate or "").strip()
    return TraceContext(
        trace_id, span_id, int(flags_hex, 16), state if len(state) <= _MAX_TRACESTATE else ""
    )


def format_traceparent(trace_id: bytes, span_id: bytes, flags: int) -> str:
    return f"00-{trace_id.hex()}-{span_id.hex()}-{flags & 0xFF:02x}"


class _Entropy:
    """The kernel's random bytes (os.urandom), fetched a page at a time and handed out in
    slices: a request takes up to 48 of them (trace, server span, attempt span, request id),
    four system calls each time otherwise. A forked child starts with none of its parent's (it
    would repeat its ids)."""

    __slots__ = ("_buf", "_pos")

    PAGE = 4096

    def __init__(self) -> None:
        self._buf = b""
        self._pos = 0

    def take(self, n: int) -> bytes:
        pos = self._pos
        if pos + n > len(self._buf):
            self._buf, pos = os.urandom(max(self.PAGE, n)), 0
        self._pos = pos + n
        return self._buf[pos : pos + n]

    def forget(self) -> None:
        self._buf, self._pos = b"", 0


_entropy = _Entropy()
os.register_at_fork(after_in_child=_entropy.forget)


def _nonzero(n: int) -> bytes:
    while True:
        b = _entropy.take(n)
        if any(b):
            return b


def uuid4_text() -> str:
    """A random (version 4) UUID as text, as str(uuid.uuid4()) makes it."""
    b = bytearray(_entropy.take(16))
    b[6] = (b[6] & 0x0F) | 0x40  # version 4
    b[8] = (b[8] & 0x3F) | 0x80  # the RFC 4122 variant
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


@dataclass(frozen=True, slots=True)
class Ids:
    """Where ids and time come from (random and the wall clock; fixed in tests)."""

    trace_id: Callable[[], bytes] = lambda: _nonzero(16)
    span_id: Callable[[], bytes] = lambda: _nonzero(8)
    request_id: Callable[[], str] = uuid4_text
    now_ns: Callable[[], int] = time.time_ns


_RANDOM_IDS = Ids()


@dataclass(frozen=True, slots=True)
class Span:
    """A finished span, ready to export."""

    trace_id: bytes
    span_id: bytes
    parent_span_id: bytes | None
    name: str
    kind: SpanKind
    start_ns: int
    end_ns: int
    attributes: tuple[tuple[str, AttrValue], ...]
    status: StatusCode
    status_message: str = ""
    trace_state: str = ""


@dataclass(slots=True)
class Attempt:
    """One upstream attempt (a client span in progress)."""

    span_id: bytes
    start_ns: int
    number: int  # 0 for the first try
    attributes: list[tuple[str, AttrValue]] = field(default_factory=list)


class RequestTrace:
    """The trace of one request at the waypoint: the server span and its attempts."""

    __slots__ = ("_ids", "attempts", "attributes", "context", "parent", "recording",
                 "request_id", "span_id", "spans", "start_ns", "trace_id")  # fmt: skip

    def __init__(
        self, parent: TraceContext | None, request_id: str, ids: Ids, recording: bool = True
    ) -> None:
        self._ids = ids
        # Whether its spans go anywhere (an exporter): without one the context is still
        # continued and propagated, but no span is made.
        self.recording = recording
        self.parent = parent
        self.trace_id = parent.trace_id if parent is not None else ids.trace_id()
        self.span_id = ids.span_id()
        self.request_id = request_id
        self.start_ns = ids.now_ns()
        self.attributes: list[tuple[str, AttrValue]] = []
        self.attempts = 0
        self.spans: list[Span] = []  # finished client spans, then the server span

    @property
    def flags(self) -> int:
        # The waypoint records every request it traces, so what it sends on is sampled.
        return (self.parent.flags if self.parent is not None else 0) | SAMPLED

    @property
    def tracestate(self) -> str:
        return self.parent.tracestate if self.parent is not None else ""

    @property
    def trace_id_hex(self) -> str:
        return self.trace_id.hex()

    def attempt(self) -> Attempt:
        """Start a client span for the next upstream attempt."""
        a = Attempt(self._ids.span_id(), self._ids.now_ns(), self.attempts)
        self.attempts += 1
        return a

    def upstream_headers(self, attempt: Attempt | None = None) -> Headers:
        """The trace headers of the upstream request: the attempt's span (or, without
        client spans, the server span) is its parent."""
        span_id = attempt.span_id if attempt is not None else self.span_id
        out = [(TRACEPARENT, format_traceparent(self.trace_id, span_id, self.flags))]
        if self.tracestate:
            out.append((TRACESTATE, self.tracestate))
        out.append((REQUEST_ID, self.request_id))
        return out

    def end_attempt(
        self,
        attempt: Attempt,
        *,
        method: str,
        url: str,
        peer: str,
        peer_port: int,
        status: int | None,
        error: str | None = None,
    ) -> Span:
        """Finish a client span: `status` None when no response came back (`error` says
        why)."""
        attrs: list[tuple[str, AttrValue]] = [
            ("http.request.method", method),
            ("url.full", url),
            ("server.address", peer),
            ("server.port", peer_port),
            ("network.peer.address", peer),
        ]
        if attempt.number:
            attrs.append(("http.request.resend_count", attempt.number))
        if status is not None:
            attrs.append(("http.response.status_code", status))
        if error is not None:
            attrs.append(("error.type", error))
        failed = status is None or status >= 400
        span = Span(
            self.trace_id,
            attempt.span_id,
            self.span_id,
            method,
            SpanKind.CLIENT,
            attempt.start_ns,
            max(self._ids.now_ns(), attempt.start_ns),
            tuple(attrs + attempt.attributes),
            StatusCode.ERROR if failed else StatusCode.UNSET,
            error or "",
            self.tracestate,
        )
        self.spans.append(span)
        return span

    def finish(
        self,
        request: Request,
        *,
        status: int | None,
        client: str | None = None,
        route: str | None = None,
        error: str | None = None,
    ) -> Span:
        """Finish the server span (`status` None when no response was sent)."""
        path, _, query = request.path.partition("?")
        host, _, port = request.authority.rpartition(":")
        if not host or not port.isdigit():
            host, port = request.authority, ""
        attrs: list[tuple[str, AttrValue]] = [
            ("http.request.method", request.method),
            ("url.path", path),
            ("url.scheme", request.scheme),
            ("server.address", host),
            ("network.protocol.version", "2" if request.wire is Wire.HTTP2 else "1.1"),
        ]
        if port:
            attrs.append(("server.port", int(port)))
        if query:
            attrs.append(("url.query", query))
        if client is not None:
            attrs.append(("client.address", client))
        agent = request.header("user-agent")
        if agent is not None:
            attrs.append(("user_agent.original", agent))
        if route is not None:
            attrs.append(("http.route", route))
        if status is not None:
            attrs.append(("http.response.status_code", status))
        if error is not None:
            attrs.append(("error.type", error))
        # Envoy's tag for the request id, so traces and access-log lines join on it.
        attrs.append(("guid:x-request-id", self.request_id))
        failed = status is None or status >= 500
        span = Span(
            self.trace_id,
            self.span_id,
            self.parent.span_id if self.parent is not None else None,
            f"{request.method} {route}" if route else request.method,
            SpanKind.SERVER,
            self.start_ns,
            max(self._ids.now_ns(), self.start_ns),
            tuple(attrs + self.attributes),
            StatusCode.ERROR if failed else StatusCode.UNSET,
            error or "",
            self.tracestate,
        )
        self.spans.append(span)
        return span


def _first(headers: Sequence[tuple[str, str]], name: str) -> str | None:
    for k, v in headers:
        if k == name:
            return v
    return None


def start_request(
    request: Request,
    connect_traceparent: TraceContext | None = None,
    ids: Ids | None = None,
    recording: bool = True,
) -> RequestTrace:
    """Begin the trace of `request`; adds `x-request-id` to it when absent.
    `connect_traceparent`: the CONNECT's trace context, parsed once per stream
    (`Inbound.trace_parent`). `recording`: spans will be exported (see
    `RequestTrace.recording`)."""
    ids = ids or _RANDOM_IDS
    parent = parse_traceparent(
        _first(request.headers, TRACEPARENT), _first(request.headers, TRACESTATE)
    )
    if parent is None:
        # The tunnel's CONNECT carries no tracestate for the request: only its context.
        parent = connect_traceparent
    request_id = _first(request.headers, REQUEST_ID)
    if not request_id:
        request_id = ids.request_id()
        request.headers.append((REQUEST_ID, request_id))
    return RequestTrace(parent, request_id, ids, recording)


def propagate(request: Request, trace: RequestTrace, attempt: Attempt | None = None) -> None:
    """Set the trace headers on the upstream `request` (replacing the client's)."""
    drop = {TRACEPARENT, TRACESTATE, REQUEST_ID}
    request.headers[:] = [(k, v) for k, v in request.headers if k not in drop]
    request.headers.extend(trace.upstream_headers(attempt))
