"""OTLP/HTTP export of the waypoint's spans: protobuf `ExportTraceServiceRequest` POSTed to
`<endpoint>/v1/traces` (content-type application/x-protobuf) by one background task.

Never in a request's way: `submit` appends to a bounded queue and returns; when the queue
is full the span is dropped and counted (`dropped`), so a dead or slow collector costs at
most `max_queue` spans of memory. The task sends a batch when `batch_size` spans wait or
every `interval` seconds; a failed POST (connection error, timeout, 429, 502, 503, 504) is
retried with exponential backoff up to `max_retries` times, then the batch is dropped and
counted; other statuses drop it at once. `shutdown` flushes what is queued, within a
deadline. The POST is a plain asyncio HTTP/1.1 request (one connection per batch; batches
are seconds apart), so no HTTP client library is loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Status
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan

from waypoint.telemetry.tracing import AttrValue, Span

SCOPE = "waypoint"
CONTENT_TYPE = "application/x-protobuf"
_RETRYABLE = frozenset({429, 502, 503, 504})
_MAX_RESPONSE_HEAD = 16 * 1024
_MAX_RESPONSE_BODY = 64 * 1024


def _value(v: AttrValue) -> AnyValue:
    if isinstance(v, bool):
        return AnyValue(bool_value=v)
    if isinstance(v, int):
        return AnyValue(int_value=v)
    if isinstance(v, float):
        return AnyValue(double_value=v)
    return AnyValue(string_value=v)


def _attributes(pairs: Iterable[tuple[str, AttrValue]]) -> list[KeyValue]:
    return [KeyValue(key=k, value=_value(v)) for k, v in pairs]


def encode_spans(spans: Sequence[Span], service_name: str) -> bytes:
    """One ExportTraceServiceRequest holding `spans` under the waypoint's resource. Pure."""
    pb = [
        PbSpan(
            trace_id=s.trace_id,
            span_id=s.span_id,
            parent_span_id=s.parent_span_id or b"",
            trace_state=s.trace_state,
            name=s.name,
            kind=int(s.kind),  # type: ignore[arg-type]
            start_time_unix_nano=s.start_ns,
            end_time_unix_nano=s.end_ns,
            attributes=_attributes(s.attributes),
            status=Status(code=int(s.status), message=s.status_message),  # type: ignore[arg-type]
        )
        for s in spans
    ]
    request = ExportTraceServiceRequest(
        resource_spans=[
            ResourceSpans(
                resource=Resource(attributes=_attributes([("service.name", service_name)])),
                scope_spans=[ScopeSpans(scope=InstrumentationScope(name=SCOPE), spans=pb)],
            )
        ]
    )
    data: bytes = request.SerializeToString()
    return data


@dataclass(frozen=True, slots=True)
class ExportSettings:
    endpoint: str  # "http://collector:4318"; `/v1/traces` is appended
    service_name: str  # the waypoint's "name.namespace"
    max_queue: int = 2048
    batch_size: int = 512
    interval: float = 5.0
    timeout: float = 10.0  # per POST: connect, send and answer
    max_retries: int = 5
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    shutdown_timeout: float = 5.0


class ExportError(Exception):
    def __init__(self, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


class OtlpExporter:
    """The background exporter; `start` inside the running loop, `shutdown` to flush."""

    def __init__(self, settings: ExportSettings) -> None:
        parts = urlsplit(settings.endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"OTLP endpoint {settings.endpoint!r}: expected http(s)://host[:port]")
        if settings.max_queue < 1 or settings.batch_size < 1:
            raise ValueError("max_queue and batch_size must be at least 1")
        self.settings = settings
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._tls = parts.scheme == "https"
        self._path = parts.path.rstrip("/") + "/v1/traces"
        self._authority = parts.netloc
        self._queue: deque[Span] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.exported = 0  # spans the collector accepted
        self.dropped = 0  # spans lost: queue full, retries exhausted, refused
        self.failed_posts = 0

    @property
    def queued(self) -> int:
        return len(self._queue)

    def submit(self, span: Span) -> None:
        """Queue a span for export; never blocks, drops (and counts) when full."""
        if self._closing or len(self._queue) >= self.settings.max_queue:
            self.dropped += 1
            return
        self._queue.append(span)
        if len(self._queue) >= self.settings.batch_size:
            self._wake.set()

    def submit_all(self, spans: Iterable[Span]) -> None:
        for span in spans:
            self.submit(span)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="otlp-export")

    async def shutdown(self) -> None:
        """Stop taking spans, send what is queued (within `shutdown_timeout`), stop."""
        self._closing = True
        self._wake.set()
        task = self._task
        if task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), self.settings.shutdown_timeout)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self.dropped += len(self._queue)
            self._queue.clear()

    async def _run(self) -> None:
        s = self.settings
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), s.interval)
                continue
            if len(self._queue) < s.batch_size and not self._closing:
                # Fewer than a batch: wait for the interval (or a full batch) first.
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), s.interval)
            batch = [self._queue.popleft() for _ in range(min(s.batch_size, len(self._queue)))]
            await self._send(batch)

    async def _send(self, batch: list[Span]) -> None:
        s = self.settings
        body = encode_spans(batch, s.service_name)
        delay = s.backoff_initial
        for attempt in range(s.max_retries + 1):
            try:
                await asyncio.wait_for(self._post(body), s.timeout)
                self.exported += len(batch)
                return
            except (OSError, TimeoutError, asyncio.IncompleteReadError, ExportError) as exc:
                self.failed_posts += 1
                retryable = not isinstance(exc, ExportError) or exc.retryable
                if not retryable or attempt == s.max_retries or self._closing:
                    break
            await asyncio.sleep(delay)
            delay = min(delay * 2, s.backoff_max)
        self.dropped += len(batch)

    async def _post(self, body: bytes) -> None:
        ctx = ssl.create_default_context() if self._tls else None
        reader, writer = await asyncio.open_connection(self._host, self._port, ssl=ctx)
        try:
            head = (
                f"POST {self._path} HTTP/1.1\r\nHost: {self._authority}\r\n"
                f"Content-Type: {CONTENT_TYPE}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            )
            writer.write(head.encode("ascii") + body)
            await writer.drain()
            status_line = await reader.readline()
            parts = status_line.split(None, 2)
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
                raise ExportError(f"not an HTTP response: {status_line[:80]!r}", True)
            status = int(parts[1])
            length = 0
            seen = len(status_line)
            while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                seen += len(line)
                if seen > _MAX_RESPONSE_HEAD:
                    raise ExportError("response head too large", True)
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length" and value.strip().isdigit():
                    length = int(value.strip())
            if 0 < length <= _MAX_RESPONSE_BODY:
                await reader.readexactly(length)  # the ExportTraceServiceResponse
            if not 200 <= status < 300:
                raise ExportError(f"collector answered {status}", status in _RETRYABLE)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
