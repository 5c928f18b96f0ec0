"""Trace context (pure tables) and OTLP/HTTP export to a real receiver on loopback."""

from __future__ import annotations

import asyncio
import itertools
import socket
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from tests.support.aio import Loop, wait_until
from waypoint.http.message import Request, Wire
from waypoint.telemetry.export import CONTENT_TYPE, ExportSettings, OtlpExporter, encode_spans
from waypoint.telemetry.tracing import (
    Ids,
    Span,
    SpanKind,
    StatusCode,
    format_traceparent,
    parse_traceparent,
    propagate,
    start_request,
)

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
VALID = f"00-{TRACE}-{PARENT}-01"
TUNNEL_TRACE = "0af7651916cd43dd8448eb211c80319c"
TUNNEL = f"00-{TUNNEL_TRACE}-b7ad6b7169203331-00"


def fixed_ids() -> Ids:
    counter = itertools.count(1)
    clock = itertools.count(1_000_000_000, 1000)
    return Ids(
        trace_id=lambda: bytes.fromhex("11" * 16),
        span_id=lambda: next(counter).to_bytes(8, "big"),
        request_id=lambda: "generated-id",
        now_ns=lambda: next(clock),
    )


PARSE_CASES = [
    ("valid", VALID, (TRACE, PARENT, 1)),
    ("not sampled", f"00-{TRACE}-{PARENT}-00", (TRACE, PARENT, 0)),
    ("future version with more fields", f"01-{TRACE}-{PARENT}-01-xyz", (TRACE, PARENT, 1)),
    ("surrounding spaces", f"  {VALID} ", (TRACE, PARENT, 1)),
    ("version ff", f"ff-{TRACE}-{PARENT}-01", None),
    ("version 00 with more fields", f"{VALID}-x", None),
    ("zero trace id", f"00-{'0' * 32}-{PARENT}-01", None),
    ("zero span id", f"00-{TRACE}-{'0' * 16}-01", None),
    ("upper case hex", VALID.upper(), None),
    ("short trace id", f"00-{TRACE[:-2]}-{PARENT}-01", None),
    ("garbage", "hello", None),
    ("empty", "", None),
    ("absent", None, None),
]


@pytest.mark.parametrize(
    ("header", "expected"), [c[1:] for c in PARSE_CASES], ids=[c[0] for c in PARSE_CASES]
)
def test_parse_traceparent(header, expected):
    ctx = parse_traceparent(header)
    if expected is None:
        assert ctx is None
    else:
        assert ctx is not None
        assert (ctx.trace_id.hex(), ctx.span_id.hex(), ctx.flags) == expected


@given(st.text(max_size=80))
def test_parse_traceparent_never_crashes(text):
    ctx = parse_traceparent(text)
    if ctx is not None:
        assert format_traceparent(ctx.trace_id, ctx.span_id, ctx.flags)[3:] in text


def req(*headers: tuple[str, str]) -> Request:
    return Request("GET", "reviews.shop:9080", "/api/books?x=1", list(headers), wire=Wire.HTTP2)


PARENT_CASES = [
    ("request traceparent", [("traceparent", VALID)], TUNNEL, TRACE, PARENT),
    ("tunnel's when the request has none", [], TUNNEL, TUNNEL_TRACE, "b7ad6b7169203331"),
    (
        "tunnel's when the request's is invalid",
        [("traceparent", "junk")],
        TUNNEL,
        TUNNEL_TRACE,
        "b7ad6b7169203331",
    ),
    ("new trace with neither", [], None, "11" * 16, None),
    ("new trace when both invalid", [("traceparent", "junk")], "junk", "11" * 16, None),
]


@pytest.mark.parametrize(
    ("headers", "connect", "trace_id", "parent"),
    [c[1:] for c in PARENT_CASES],
    ids=[c[0] for c in PARENT_CASES],
)
def test_parent_choice(headers, connect, trace_id, parent):
    # The CONNECT's header, parsed as the stream's Inbound does.
    trace = start_request(req(*headers), parse_traceparent(connect), fixed_ids())
    assert trace.trace_id.hex() == trace_id
    span = trace.finish(req(), status=200)
    assert span.trace_id.hex() == trace_id
    assert (span.parent_span_id.hex() if span.parent_span_id else None) == parent


def test_request_id_added_when_absent_and_kept_when_present():
    r = req()
    assert start_request(r, None, fixed_ids()).request_id == "generated-id"
    assert r.header("x-request-id") == "generated-id"
    r2 = req(("x-request-id", "mine"))
    assert start_request(r2, None, fixed_ids()).request_id == "mine"
    assert [v for k, v in r2.headers if k == "x-request-id"] == ["mine"]


def test_request_id_is_a_uuid4_by_default():
    import uuid

    ids = {start_request(req()).request_id for _ in range(1000)}
    assert len(ids) == 1000
    for text in ids:
        parsed = uuid.UUID(text)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
        assert str(parsed) == text


def test_a_forked_child_does_not_repeat_its_parents_ids():
    import os

    start_request(req())  # the parent holds random bytes not handed out yet
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, then out at once
        try:
            t = start_request(req())
            os.write(write, f"{t.request_id} {t.trace_id.hex()} {t.span_id.hex()}".encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        theirs = f.read().split()
    os.waitpid(pid, 0)
    t = start_request(req())
    ours = [t.request_id, t.trace_id.hex(), t.span_id.hex()]
    assert len(theirs) == 3
    assert not set(theirs) & set(ours)


def test_propagation_server_span_is_parent_of_upstream():
    incoming = req(("traceparent", VALID), ("tracestate", "vendor=1"))
    trace = start_request(incoming, parse_traceparent(TUNNEL), fixed_ids())
    attempt = trace.attempt()
    upstream = req(("traceparent", VALID), ("x-other", "1"))
    propagate(upstream, trace, attempt)
    assert upstream.header("traceparent") == format_traceparent(trace.trace_id, attempt.span_id, 1)
    assert upstream.header("tracestate") == "vendor=1"
    assert upstream.header("x-request-id") == trace.request_id
    assert [k for k, _ in upstream.headers].count("traceparent") == 1
    client = trace.end_attempt(
        attempt,
        method="GET",
        url="http://10.0.0.7:9080/api",
        peer="10.0.0.7",
        peer_port=9080,
        status=200,
    )
    assert client.parent_span_id == trace.span_id and client.kind is SpanKind.CLIENT
    # Without client spans, the server span itself is the upstream's parent.
    plain = req()
    propagate(plain, trace)
    assert plain.header("traceparent") == format_traceparent(trace.trace_id, trace.span_id, 1)


STATUS_CASES = [
    ("server 200", SpanKind.SERVER, 200, StatusCode.UNSET),
    ("server 404", SpanKind.SERVER, 404, StatusCode.UNSET),
    ("server 503", SpanKind.SERVER, 503, StatusCode.ERROR),
    ("server no response", SpanKind.SERVER, None, StatusCode.ERROR),
    ("client 200", SpanKind.CLIENT, 200, StatusCode.UNSET),
    ("client 404", SpanKind.CLIENT, 404, StatusCode.ERROR),
    ("client reset", SpanKind.CLIENT, None, StatusCode.ERROR),
]


@pytest.mark.parametrize(
    ("kind", "status", "expected"), [c[1:] for c in STATUS_CASES], ids=[c[0] for c in STATUS_CASES]
)
def test_span_status(kind, status, expected):
    trace = start_request(req(), None, fixed_ids())
    if kind is SpanKind.SERVER:
        span = trace.finish(req(), status=status, error=None if status else "downstream reset")
    else:
        span = trace.end_attempt(
            trace.attempt(), method="GET", url="u", peer="p", peer_port=1, status=status
        )
    assert span.status is expected


def test_server_span_attributes():
    r = req(("user-agent", "curl/8"))
    trace = start_request(r, None, fixed_ids())
    span = trace.finish(r, status=200, client="10.0.0.1", route="shop/reviews")
    attrs = dict(span.attributes)
    assert span.name == "GET shop/reviews"
    assert attrs["http.request.method"] == "GET" and attrs["url.path"] == "/api/books"
    assert attrs["url.query"] == "x=1" and attrs["server.address"] == "reviews.shop"
    assert attrs["server.port"] == 9080 and attrs["network.protocol.version"] == "2"
    assert attrs["http.response.status_code"] == 200 and attrs["client.address"] == "10.0.0.1"
    assert attrs["user_agent.original"] == "curl/8" and attrs["http.route"] == "shop/reviews"


# -- a real OTLP/HTTP receiver on loopback -----------------------------------------------------


@dataclass
class Receiver:
    """An asyncio HTTP/1.1 server decoding ExportTraceServiceRequest bodies."""

    fail_first: int = 0  # answer 503 to this many requests first
    requests: list[ExportTraceServiceRequest] = field(default_factory=list)
    heads: list[dict[str, str]] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    answered: int = 0
    server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            method, path, _ = (await reader.readline()).decode().split(" ", 2)
            head: dict[str, str] = {}
            while (line := await reader.readline()) not in (b"\r\n", b""):
                k, _, v = line.decode().partition(":")
                head[k.strip().lower()] = v.strip()
            body = await reader.readexactly(int(head["content-length"]))
            self.answered += 1
            if self.answered <= self.fail_first:
                writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
                return
            msg = ExportTraceServiceRequest()
            msg.ParseFromString(body)
            self.requests.append(msg)
            self.heads.append(head)
            self.paths.append(f"{method} {path}")
            answer = ExportTraceServiceResponse().SerializeToString()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\n"
                + f"Content-Length: {len(answer)}\r\n\r\n".encode()
                + answer
            )
        finally:
            await writer.drain()
            writer.close()

    def spans(self) -> list[Any]:
        return [
            s
            for r in self.requests
            for rs in r.resource_spans
            for ss in rs.scope_spans
            for s in ss.spans
        ]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def settings(endpoint: str, **kw: Any) -> ExportSettings:
    base: dict[str, Any] = dict(
        endpoint=endpoint,
        service_name="waypoint.shop",
        interval=0.05,
        backoff_initial=0.01,
        backoff_max=0.05,
        timeout=5.0,
    )
    base.update(kw)
    return ExportSettings(**base)


def test_spans_reach_the_collector_with_links(aio: Loop):
    async def main() -> None:
        receiver = Receiver()
        endpoint = await receiver.start()
        aio.defer(receiver.close)
        exporter = OtlpExporter(settings(endpoint))
        exporter.start()
        aio.defer(exporter.shutdown)

        incoming = req(("traceparent", VALID))
        trace = start_request(incoming)
        first, second = trace.attempt(), trace.attempt()
        trace.end_attempt(
            first,
            method="GET",
            url="http://10.0.0.7:9080/api",
            peer="10.0.0.7",
            peer_port=9080,
            status=None,
            error="connect refused",
        )
        trace.end_attempt(
            second,
            method="GET",
            url="http://10.0.0.8:9080/api",
            peer="10.0.0.8",
            peer_port=9080,
            status=200,
        )
        trace.finish(incoming, status=200)
        exporter.submit_all(trace.spans)
        # The collector keeps the spans before the exporter reads its answer: wait for both.
        await wait_until(lambda: exporter.exported == 3, "three spans exported")

        assert receiver.paths == ["POST /v1/traces"]
        assert receiver.heads[0]["content-type"] == CONTENT_TYPE
        (resource_spans,) = receiver.requests[0].resource_spans
        resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
        assert resource == {"service.name": "waypoint.shop"}
        by_kind: dict[int, list[Any]] = {}
        for s in receiver.spans():
            by_kind.setdefault(s.kind, []).append(s)
        (server,) = by_kind[SpanKind.SERVER]
        clients = by_kind[SpanKind.CLIENT]
        assert {s.trace_id.hex() for s in receiver.spans()} == {TRACE}
        assert server.parent_span_id.hex() == PARENT
        assert [c.parent_span_id for c in clients] == [server.span_id] * 2
        assert len({c.span_id for c in clients} | {server.span_id}) == 3
        assert [c.status.code for c in clients] == [StatusCode.ERROR, StatusCode.UNSET]
        retry = {a.key: a.value.int_value for a in clients[1].attributes}
        assert retry["http.request.resend_count"] == 1
        assert server.start_time_unix_nano <= server.end_time_unix_nano
        assert exporter.exported == 3 and exporter.dropped == 0

    aio.run(main)


def test_failed_posts_are_retried(aio: Loop):
    async def main() -> None:
        receiver = Receiver(fail_first=2)
        endpoint = await receiver.start()
        aio.defer(receiver.close)
        exporter = OtlpExporter(settings(endpoint))
        exporter.start()
        aio.defer(exporter.shutdown)
        trace = start_request(req())
        exporter.submit(trace.finish(req(), status=200))
        await wait_until(lambda: exporter.exported == 1, "the span exported after two 503s")
        assert len(receiver.spans()) == 1
        assert receiver.answered == 3 and exporter.failed_posts == 2 and exporter.dropped == 0

    aio.run(main)


def test_shutdown_flushes_the_queue(aio: Loop):
    async def main() -> None:
        receiver = Receiver()
        endpoint = await receiver.start()
        aio.defer(receiver.close)
        # An interval far longer than the test: only the shutdown sends.
        exporter = OtlpExporter(settings(endpoint, interval=3600.0, batch_size=100))
        exporter.start()
        for i in range(250):
            exporter.submit(_span(i))
        await exporter.shutdown()
        assert len(receiver.spans()) == 250 and exporter.exported == 250
        exporter.submit(_span(999))
        assert exporter.dropped == 1 and exporter.queued == 0

    aio.run(main)


def _span(i: int) -> Span:
    return Span(
        b"\x01" * 16,
        (i + 1).to_bytes(8, "big"),
        None,
        "GET",
        SpanKind.SERVER,
        1,
        2,
        (("n", i),),
        StatusCode.UNSET,
    )


def _dead_endpoint() -> str:
    # A port that was just free: nothing listens there.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_dead_collector_never_blocks_nor_grows(aio: Loop):
    async def main() -> None:
        exporter = OtlpExporter(
            settings(_dead_endpoint(), max_queue=100, batch_size=10, max_retries=2)
        )
        exporter.start()
        aio.defer(exporter.shutdown)
        for i in range(5000):
            exporter.submit(_span(i))  # returns at once whatever the collector does
            assert exporter.queued <= 100
        await wait_until(lambda: exporter.failed_posts >= 3, "failed posts to the dead collector")
        assert exporter.exported == 0
        assert exporter.dropped >= 4900
        await exporter.shutdown()
        assert exporter.queued == 0
        assert exporter.dropped == 5000

    aio.run(main)


def test_encode_spans_round_trips():
    data = encode_spans([_span(0)], "wp.ns")
    msg = ExportTraceServiceRequest()
    msg.ParseFromString(data)
    (span,) = msg.resource_spans[0].scope_spans[0].spans
    assert span.span_id == (1).to_bytes(8, "big") and span.parent_span_id == b""
    assert span.attributes[0].value.int_value == 0


@pytest.mark.parametrize(
    "endpoint", ["ftp://x", "collector:4318", "http://"], ids=["scheme", "no scheme", "no host"]
)
def test_bad_endpoint_is_refused(endpoint):
    with pytest.raises(ValueError, match="OTLP endpoint"):
        OtlpExporter(ExportSettings(endpoint, "wp.ns"))
