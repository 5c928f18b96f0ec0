"""The demo's L7 evidence, read from what the running system wrote (pure: text in, facts out).

The act (`ambientctl.demo_l7`) gathers raw material — a fetch's JSON lines, the waypoint's
access log, its /metrics text, the OTLP request bodies it exported — and these functions
turn it into the numbers and lines the demo prints and checks. Nothing here opens a file
or a socket, so each decision has a table test.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

# A split check that fails by chance about once in 16,000 runs of a fair canary.
DEFAULT_SIGMAS = 4.0


# ---- fetch --count output ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Answer:
    """One request `travel/fetch.py --count` sent: status None when the call failed."""

    status: int | None
    served_by: str | None
    error: str | None


def parse_answers(text: str) -> list[Answer]:
    """fetch.py's JSON lines; a line that is not one is skipped (it is not an answer)."""
    out = []
    for raw in text.splitlines():
        try:
            doc = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(doc, dict):
            continue
        status = doc.get("status")
        served_by = doc.get("served_by")
        error = doc.get("error")
        out.append(
            Answer(
                status if isinstance(status, int) else None,
                served_by if isinstance(served_by, str) else None,
                error if isinstance(error, str) else None,
            )
        )
    return out


def status_counts(answers: Iterable[Answer]) -> dict[str, int]:
    """{"200": 27, "503": 3, "failed": 0 ...}: how the calls ended, by status."""
    counts = Counter("failed" if a.status is None else str(a.status) for a in answers)
    return dict(sorted(counts.items()))


# ---- the canary split ----------------------------------------------------------------------


def binomial_bounds(n: int, p: float, sigmas: float = DEFAULT_SIGMAS) -> tuple[int, int]:
    """The counts of `n` Bernoulli(`p`) trials within `sigmas` standard deviations of the
    mean, as whole numbers [low, high] clipped to [0, n]."""
    if n < 0 or not 0.0 <= p <= 1.0 or sigmas < 0:
        raise ValueError(f"binomial_bounds(n={n}, p={p}, sigmas={sigmas}): out of range")
    mean = n * p
    spread = sigmas * math.sqrt(n * p * (1 - p))
    return max(0, math.ceil(mean - spread)), min(n, math.floor(mean + spread))


def within_binomial(n: int, k: int, p: float, sigmas: float = DEFAULT_SIGMAS) -> bool:
    low, high = binomial_bounds(n, p, sigmas)
    return low <= k <= high


# ---- the waypoint's access log -------------------------------------------------------------


def access_lines(text: str) -> list[dict[str, Any]]:
    """The waypoint's `request complete` JSON lines, in order; other lines are skipped."""
    out = []
    for raw in text.splitlines():
        try:
            doc = json.loads(raw)
        except ValueError:
            continue
        if isinstance(doc, dict) and doc.get("event") == "request complete":
            out.append(doc)
    return out


def for_service(lines: Iterable[Mapping[str, Any]], hostname: str) -> list[Mapping[str, Any]]:
    return [line for line in lines if line.get("dst.service") == hostname]


def flag_counts(lines: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """{"-": 27, "UC": 3}: the response flags of the lines (Envoy prints "-" for none)."""
    counts = Counter(str(line.get("response_flags") or "-") for line in lines)
    return dict(sorted(counts.items()))


# ---- the waypoint's /metrics ---------------------------------------------------------------

_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?P<labels>.*)\})?\s+(?P<value>\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True, slots=True)
class Sample:
    name: str
    labels: Mapping[str, str]
    value: float


def parse_samples(text: str, name: str, where: Mapping[str, str] | None = None) -> list[Sample]:
    """The samples of metric `name` (Prometheus text format) whose labels include `where`."""
    out = []
    for raw in text.splitlines():
        m = _SAMPLE.match(raw)
        if m is None or m.group("name") != name:
            continue
        labels = {k: v.replace('\\"', '"').replace("\\\\", "\\") for k, v in
                  _LABEL.findall(m.group("labels") or "")}  # fmt: skip
        if where and any(labels.get(k) != v for k, v in where.items()):
            continue
        try:
            value = float(m.group("value"))
        except ValueError:
            continue
        out.append(Sample(name, labels, value))
    return out


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> list[str]:
    """Rows as aligned text columns under `header`."""
    widths = [len(h) for h in header]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    fmt = "  ".join(f"{{:{w}}}" for w in widths)
    return [fmt.format(*header).rstrip()] + [fmt.format(*row).rstrip() for row in rows]


def requests_table(samples: Iterable[Sample], columns: Sequence[str]) -> list[str]:
    """istio_requests_total samples as a table: the `columns` labels and the count."""
    rows = sorted(
        ([s.labels.get(c, "") for c in columns] + [f"{s.value:g}"] for s in samples),
        key=lambda r: r,
    )
    return table(rows, [*columns, "requests"])


# ---- OTLP spans ----------------------------------------------------------------------------

_KINDS = {1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}


@dataclass(frozen=True, slots=True)
class SpanView:
    """A span as the demo prints it; ids are hex."""

    trace_id: str
    span_id: str
    parent_id: str
    name: str
    kind: str
    start_ns: int
    end_ns: int
    attributes: Mapping[str, str]
    error: bool


def _text(v: AnyValue) -> str:
    which = v.WhichOneof("value")
    return "" if which is None else str(getattr(v, which))


def decode_export(body: bytes) -> list[SpanView]:
    """Every span of one OTLP/HTTP ExportTraceServiceRequest body. Raises ValueError when
    the body is not one."""
    req = ExportTraceServiceRequest()
    try:
        req.ParseFromString(body)
    except Exception as e:  # protobuf's DecodeError, and whatever its C parser raises
        raise ValueError(f"not an ExportTraceServiceRequest: {e}") from None
    out = []
    for rs in req.resource_spans:
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append(
                    SpanView(
                        s.trace_id.hex(),
                        s.span_id.hex(),
                        s.parent_span_id.hex(),
                        s.name,
                        _KINDS.get(int(s.kind), "unspecified"),
                        int(s.start_time_unix_nano),
                        int(s.end_time_unix_nano),
                        {kv.key: _text(kv.value) for kv in s.attributes},
                        int(s.status.code) == 2,  # STATUS_CODE_ERROR
                    )
                )
    return out


SPAN_DETAILS = (
    "http.route",
    "server.address",
    "network.peer.address",
    "http.request.resend_count",
    "http.response.status_code",
    "error.type",
)


def span_tree(spans: Iterable[SpanView], trace_id: str) -> list[str]:
    """The spans of `trace_id` as lines indented by parent, children in start order; a span
    whose parent was not exported (the caller's, outside the waypoint) is a root."""
    mine = sorted((s for s in spans if s.trace_id == trace_id), key=lambda s: s.start_ns)
    ids = {s.span_id for s in mine}
    children: dict[str, list[SpanView]] = {}
    for s in mine:
        parent = s.parent_id if s.parent_id in ids else ""
        children.setdefault(parent, []).append(s)
    lines: list[str] = []

    def walk(parent: str, depth: int) -> None:
        for s in children.get(parent, []):
            ms = max(0, s.end_ns - s.start_ns) / 1e6
            details = " ".join(f"{k}={s.attributes[k]}" for k in SPAN_DETAILS if k in s.attributes)
            lines.append(
                f"{'  ' * depth}{s.kind} {s.name!r} {ms:.1f} ms"
                + (" ERROR" if s.error else "")
                + (f"  {details}" if details else "")
            )
            if depth < 32:  # ids are unique; the bound only guards a malformed export
                walk(s.span_id, depth + 1)

    walk("", 0)
    return lines
