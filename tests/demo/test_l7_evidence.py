"""The L7 act's evidence decisions (ambientctl.demo_evidence): pure, table-tested."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ambientctl import demo_evidence as ev
from waypoint.telemetry.export import encode_spans
from waypoint.telemetry.tracing import Span, SpanKind, StatusCode


@pytest.mark.parametrize(
    ("n", "p", "sigmas", "bounds"),
    [
        (200, 0.1, 4.0, (4, 36)),
        (200, 0.5, 2.0, (86, 114)),
        (10, 0.0, 4.0, (0, 0)),
        (10, 1.0, 4.0, (10, 10)),
        (0, 0.3, 4.0, (0, 0)),
        (5, 0.5, 10.0, (0, 5)),  # clipped to [0, n]
    ],
    ids=["canary-200-at-10pct", "fair-coin-2-sigma", "never", "always", "no-trials", "clipped"],
)
def test_binomial_bounds(n: int, p: float, sigmas: float, bounds: tuple[int, int]) -> None:
    assert ev.binomial_bounds(n, p, sigmas) == bounds


@pytest.mark.parametrize(
    ("k", "inside"),
    [(20, True), (4, True), (36, True), (3, False), (37, False), (0, False), (200, False)],
    ids=["mean", "low-edge", "high-edge", "below", "above", "none-to-v2", "all-to-v2"],
)
def test_within_binomial_for_the_canary(k: int, inside: bool) -> None:
    assert ev.within_binomial(200, k, 0.1) is inside


@pytest.mark.parametrize(
    ("n", "p", "sigmas"),
    [(-1, 0.5, 4.0), (10, 1.5, 4.0), (10, -0.1, 4.0), (10, 0.5, -1.0)],
    ids=["negative-n", "p-above-1", "p-below-0", "negative-sigmas"],
)
def test_binomial_bounds_refuses_nonsense(n: int, p: float, sigmas: float) -> None:
    with pytest.raises(ValueError, match="out of range"):
        ev.binomial_bounds(n, p, sigmas)


def test_answers_and_their_counts() -> None:
    text = "\n".join(
        [
            json.dumps({"status": 200, "served_by": "flights-0", "error": None}),
            json.dumps({"status": None, "served_by": None, "error": "GET x failed: reset"}),
            "not json",
            json.dumps([1, 2]),
            json.dumps({"status": 503, "served_by": 7, "error": None}),
        ]
    )
    answers = ev.parse_answers(text)
    assert answers == [
        ev.Answer(200, "flights-0", None),
        ev.Answer(None, None, "GET x failed: reset"),
        ev.Answer(503, None, None),
    ]
    assert ev.status_counts(answers) == {"200": 1, "503": 1, "failed": 1}


@given(st.text())
def test_parse_answers_never_raises(text: str) -> None:
    for a in ev.parse_answers(text):
        assert a.status is None or isinstance(a.status, int)


def test_access_lines_keep_only_request_complete_lines() -> None:
    done = {"event": "request complete", "status": 503, "response_flags": "UC",
            "dst.service": "pricing.travel.svc.cluster.local"}  # fmt: skip
    ok = {"event": "request complete", "status": 200, "dst.service": "flights.x"}
    text = "\n".join(
        [json.dumps(done), "garbage", json.dumps({"event": "route config"}), json.dumps(ok)]
    )
    lines = ev.access_lines(text)
    assert lines == [done, ok]
    assert ev.for_service(lines, "pricing.travel.svc.cluster.local") == [done]
    assert ev.flag_counts(lines) == {"-": 1, "UC": 1}


METRICS = """\
# HELP istio_requests_total Total requests.
# TYPE istio_requests_total counter
istio_requests_total{reporter="waypoint",source_workload="frontend",response_code="200"} 181
istio_requests_total{reporter="waypoint",source_workload="frontend",response_code="504",\
response_flags="UT"} 1
istio_requests_total{reporter="destination",source_workload="frontend",response_code="200"} 9
istio_request_duration_milliseconds_bucket{reporter="waypoint",le="5"} 3
istio_requests_total{reporter="waypoint",source_workload="a \\"quoted\\" name"} 2.0
istio_requests_total{reporter="waypoint"} notanumber
"""


@pytest.mark.parametrize(
    ("where", "values"),
    [
        ({"reporter": "waypoint"}, [181.0, 1.0, 2.0]),
        ({"reporter": "waypoint", "response_flags": "UT"}, [1.0]),
        ({"reporter": "destination"}, [9.0]),
        ({"reporter": "gateway"}, []),
        (None, [181.0, 1.0, 9.0, 2.0]),
    ],
    ids=["waypoint", "waypoint-UT", "destination", "no-such-reporter", "all"],
)
def test_parse_samples(where: dict[str, str] | None, values: list[float]) -> None:
    samples = ev.parse_samples(METRICS, "istio_requests_total", where)
    assert [s.value for s in samples] == values


def test_label_values_are_unescaped_and_tabled() -> None:
    samples = ev.parse_samples(METRICS, "istio_requests_total", {"reporter": "waypoint"})
    assert samples[2].labels["source_workload"] == 'a "quoted" name'
    lines = ev.requests_table(samples[:2], ["source_workload", "response_code"])
    assert lines == [
        "source_workload  response_code  requests",
        "frontend         200            181",
        "frontend         504            1",
    ]


@given(st.text())
def test_parse_samples_never_raises(text: str) -> None:
    ev.parse_samples(text, "istio_requests_total", {"reporter": "waypoint"})


TRACE = bytes(range(1, 17))


def span(sid: int, parent: int | None, kind: SpanKind, start: int, **attrs: str | int) -> Span:
    return Span(
        TRACE,
        bytes([sid]) * 8,
        bytes([parent]) * 8 if parent is not None else None,
        "GET" if kind is SpanKind.CLIENT else "GET VirtualService travel/pricing[0]",
        kind,
        start * 1_000_000,
        (start + 2) * 1_000_000,
        tuple(attrs.items()),
        StatusCode.ERROR if "error.type" in attrs else StatusCode.UNSET,
    )


def test_a_retried_request_decodes_to_a_server_span_over_its_attempts() -> None:
    spans = [
        span(2, 1, SpanKind.CLIENT, 11, **{"error.type": "reset"}),
        span(1, 9, SpanKind.SERVER, 10, **{"http.response.status_code": 200}),
        span(3, 1, SpanKind.CLIENT, 14, **{"http.request.resend_count": 1}),
        Span(
            b"\x07" * 16,
            b"\x05" * 8,
            None,
            "other trace",
            SpanKind.SERVER,
            0,
            1,
            (),
            StatusCode.UNSET,
        ),
    ]
    views = ev.decode_export(encode_spans(spans, "waypoint.travel"))
    assert len(views) == 4
    lines = ev.span_tree(views, TRACE.hex())
    assert lines == [
        "server 'GET VirtualService travel/pricing[0]' 2.0 ms  http.response.status_code=200",
        "  client 'GET' 2.0 ms ERROR  error.type=reset",
        "  client 'GET' 2.0 ms  http.request.resend_count=1",
    ]


def test_a_span_that_is_its_own_ancestor_cannot_loop() -> None:
    views = [
        ev.SpanView("t", "a", "b", "A", "server", 0, 1, {}, False),
        ev.SpanView("t", "b", "a", "B", "client", 0, 1, {}, False),
    ]
    assert ev.span_tree(views, "t") == []  # no root: nothing printed, and it returns


@pytest.mark.parametrize("body", [b"\xff\xff\xff", b"\x0a\x05abc"], ids=["garbage", "truncated"])
def test_decode_export_refuses_what_is_not_otlp(body: bytes) -> None:
    with pytest.raises(ValueError, match="not an ExportTraceServiceRequest"):
        ev.decode_export(body)
