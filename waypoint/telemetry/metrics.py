"""Istio's request metrics for the waypoint, `reporter="waypoint"`, in the Prometheus text
format (written with `meshcore.observability.promtext`).

Families: `istio_requests_total`, `istio_request_duration_milliseconds`,
`istio_request_bytes`, `istio_response_bytes` (histograms), and for gRPC
`istio_request_messages_total` / `istio_response_messages_total`. Labels are Istio's full set
(see `RequestLabels`); workload labels come from `meshcore.state.Workload` and `Service` as
the tunnel's `istio_tcp_*` do (`meshcore.observability.metrics`): `app`/`version` are the
canonical name/revision, an absent value is `unknown`, the source principal only when the
hop was mTLS.

A label set is built once per distinct (workloads, identities, service, protocol, code, gRPC
status, flags, mTLS) and shared by every request that has it; the cache holds the objects it
was keyed by (by identity), so an id is never reused while cached.
"""

from __future__ import annotations

import bisect
import enum
from dataclasses import dataclass, fields

from meshcore.identity.spiffe import SpiffeId
from meshcore.observability import promtext
from meshcore.state import Service, Workload
from waypoint.telemetry.flags import NONE

UNKNOWN = "unknown"
REPORTER = "waypoint"

REQUESTS = "istio_requests_total"
DURATION = "istio_request_duration_milliseconds"
REQUEST_BYTES = "istio_request_bytes"
RESPONSE_BYTES = "istio_response_bytes"
REQUEST_MESSAGES = "istio_request_messages_total"
RESPONSE_MESSAGES = "istio_response_messages_total"

# Envoy's default histogram buckets, which Istio's duration histogram uses.
DURATION_BUCKETS_MS: tuple[float, ...] = (
    0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000,
    600000, 1800000, 3600000,
)  # fmt: skip
# Istio's size buckets (its Prometheus metric spec: exponential, 1 byte to 10 MB, x10).
BYTE_BUCKETS: tuple[float, ...] = (1, 10, 100, 1000, 10000, 100000, 1000000, 10000000)

HISTOGRAM = "histogram"
_HELP = {
    REQUESTS: "Total number of requests",
    DURATION: "Request duration in milliseconds",
    REQUEST_BYTES: "Request body size in bytes",
    RESPONSE_BYTES: "Response body size in bytes",
    REQUEST_MESSAGES: "Total number of gRPC messages received from the client",
    RESPONSE_MESSAGES: "Total number of gRPC messages sent to the client",
}


class RequestProtocol(enum.StrEnum):
    HTTP = "http"
    GRPC = "grpc"


@dataclass(frozen=True, slots=True)
class RequestLabels:
    """One label set of the request metrics; every value a plain string."""

    reporter: str
    source_workload: str
    source_canonical_service: str
    source_canonical_revision: str
    source_workload_namespace: str
    source_principal: str
    source_app: str
    source_version: str
    source_cluster: str
    destination_workload: str
    destination_canonical_service: str
    destination_canonical_revision: str
    destination_workload_namespace: str
    destination_principal: str
    destination_app: str
    destination_version: str
    destination_cluster: str
    destination_service: str
    destination_service_name: str
    destination_service_namespace: str
    request_protocol: str
    response_code: str
    grpc_response_status: str
    response_flags: str
    connection_security_policy: str

    def values(self) -> tuple[str, ...]:
        return tuple(getattr(self, name) for name in LABEL_NAMES)


LABEL_NAMES: tuple[str, ...] = tuple(f.name for f in fields(RequestLabels))


def _or_unknown(value: object) -> str:
    return str(value) if value else UNKNOWN


_LABELS_MAX = 4096
_LABELS: dict[tuple[object, ...], tuple[RequestLabels, object, object, object]] = {}


def request_labels(
    *,
    source: Workload | None,
    source_identity: SpiffeId | None,
    destination: Workload | None,
    service: Service | None,
    protocol: RequestProtocol,
    response_code: int,
    grpc_status: int | None = None,
    response_flags: str = NONE,
    mtls: bool = True,
) -> RequestLabels:
    """The label set of one request. `source_identity`: what the client proved on its HBONE
    connection; `destination`: the endpoint the waypoint sent it to (None if it never left);
    `response_code` 0 when no response was sent (Envoy reports 0); `grpc_status` None when
    the response carried none."""
    key = (
        id(source), source_identity, id(destination), id(service), protocol, response_code,
        grpc_status, response_flags, mtls,
    )  # fmt: skip
    hit = _LABELS.get(key)
    if hit is not None:
        return hit[0]
    src, dst = source, destination
    dst_identity = dst.identity if dst is not None else None
    labels = RequestLabels(
        reporter=REPORTER,
        source_workload=_or_unknown(src.workload_name if src else None),
        source_canonical_service=_or_unknown(src.canonical_name if src else None),
        source_canonical_revision=_or_unknown(src.canonical_revision if src else None),
        source_workload_namespace=_or_unknown(src.namespace if src else None),
        source_principal=_or_unknown(source_identity if mtls and source_identity else None),
        source_app=_or_unknown(src.canonical_name if src else None),
        source_version=_or_unknown(src.canonical_revision if src else None),
        source_cluster=_or_unknown(src.cluster_id if src else None),
        destination_workload=_or_unknown(dst.workload_name if dst else None),
        destination_canonical_service=_or_unknown(dst.canonical_name if dst else None),
        destination_canonical_revision=_or_unknown(dst.canonical_revision if dst else None),
        destination_workload_namespace=_or_unknown(dst.namespace if dst else None),
        destination_principal=_or_unknown(dst_identity),
        destination_app=_or_unknown(dst.canonical_name if dst else None),
        destination_version=_or_unknown(dst.canonical_revision if dst else None),
        destination_cluster=_or_unknown(dst.cluster_id if dst else None),
        destination_service=_or_unknown(service.hostname if service else None),
        destination_service_name=_or_unknown(service.name if service else None),
        destination_service_namespace=_or_unknown(service.namespace if service else None),
        request_protocol=str(protocol),
        response_code=str(response_code),
        grpc_response_status=str(grpc_status) if grpc_status is not None else "",
        response_flags=response_flags or NONE,
        connection_security_policy="mutual_tls" if mtls else UNKNOWN,
    )
    if len(_LABELS) >= _LABELS_MAX:
        _LABELS.clear()  # config changes leave stale entries behind: start over
    _LABELS[key] = (labels, source, destination, service)
    return labels


class _Histogram:
    """Per-bucket counts (not cumulative until rendered), sum and count."""

    __slots__ = ("count", "counts", "sum")

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * (buckets + 1)  # the last is +Inf
        self.sum = 0.0
        self.count = 0


class RequestMetrics:
    """The waypoint's request counters; one per waypoint process, no global state."""

    CONTENT_TYPE: str = promtext.CONTENT_TYPE

    def __init__(self) -> None:
        self._requests: dict[RequestLabels, int] = {}
        self._duration: dict[RequestLabels, _Histogram] = {}
        self._request_bytes: dict[RequestLabels, _Histogram] = {}
        self._response_bytes: dict[RequestLabels, _Histogram] = {}
        self._request_messages: dict[RequestLabels, int] = {}
        self._response_messages: dict[RequestLabels, int] = {}

    def record(
        self,
        labels: RequestLabels,
        *,
        duration_ms: float,
        request_bytes: int,
        response_bytes: int,
        request_messages: int = 0,
        response_messages: int = 0,
    ) -> None:
        """One finished request (bytes: the bodies, as Istio counts them)."""
        if min(duration_ms, request_bytes, response_bytes, request_messages, response_messages) < 0:
            raise ValueError("request metrics must not be negative")
        self._requests[labels] = self._requests.get(labels, 0) + 1
        _observe(self._duration, labels, DURATION_BUCKETS_MS, duration_ms)
        _observe(self._request_bytes, labels, BYTE_BUCKETS, request_bytes)
        _observe(self._response_bytes, labels, BYTE_BUCKETS, response_bytes)
        if labels.request_protocol == RequestProtocol.GRPC:
            self._request_messages[labels] = (
                self._request_messages.get(labels, 0) + request_messages
            )
            self._response_messages[labels] = (
                self._response_messages.get(labels, 0) + response_messages
            )

    def render(self) -> bytes:
        out = [
            _counter(REQUESTS, self._requests),
            _histogram(DURATION, DURATION_BUCKETS_MS, self._duration),
            _histogram(REQUEST_BYTES, BYTE_BUCKETS, self._request_bytes),
            _histogram(RESPONSE_BYTES, BYTE_BUCKETS, self._response_bytes),
            _counter(REQUEST_MESSAGES, self._request_messages),
            _counter(RESPONSE_MESSAGES, self._response_messages),
        ]
        return b"".join(out)


def _observe(
    series: dict[RequestLabels, _Histogram],
    labels: RequestLabels,
    buckets: tuple[float, ...],
    value: float,
) -> None:
    h = series.get(labels)
    if h is None:
        h = series[labels] = _Histogram(len(buckets))
    # `le` is inclusive: the first bucket whose bound is >= value.
    h.counts[bisect.bisect_left(buckets, value)] += 1
    h.sum += value
    h.count += 1


def _counter(name: str, series: dict[RequestLabels, int]) -> bytes:
    return promtext.render(
        [
            promtext.Family(
                name,
                _HELP[name],
                promtext.COUNTER,
                LABEL_NAMES,
                [(labels.values(), value) for labels, value in list(series.items())],
            )
        ]
    )


def _histogram(
    name: str, buckets: tuple[float, ...], series: dict[RequestLabels, _Histogram]
) -> bytes:
    # promtext writes HELP and TYPE; the samples of a histogram carry suffixes and the `le`
    # label (last, as prometheus_client writes it), so they are written here, with its
    # escaping and number format.
    lines = [promtext.render([promtext.Family(name, _HELP[name], HISTOGRAM)]).decode()]
    bounds = [promtext.format_value(b) for b in buckets] + ["+Inf"]
    for labels, h in list(series.items()):
        pairs = sorted(zip(LABEL_NAMES, labels.values(), strict=True))
        body = ",".join(f'{k}="{promtext.escape_label_value(v)}"' for k, v in pairs)
        total = 0
        for bound, n in zip(bounds, h.counts, strict=True):
            total += n
            lines.append(f'{name}_bucket{{{body},le="{bound}"}} {promtext.format_value(total)}\n')
        lines.append(f"{name}_count{{{body}}} {promtext.format_value(h.count)}\n")
        lines.append(f"{name}_sum{{{body}}} {promtext.format_value(h.sum)}\n")
    return "".join(lines).encode()
