"""Istio's TCP metrics for the tunnel, exposed in the Prometheus text format.

Names and labels are Istio's standard TCP metrics as ztunnel reports them:
`istio_tcp_connections_opened_total`, `istio_tcp_connections_closed_total`,
`istio_tcp_received_bytes_total`, `istio_tcp_sent_bytes_total`, plus the gauge
`istio_tcp_sockets_open` that protocols.md asks for (not an upstream ztunnel series; it is
opened minus closed for one label set).

Byte directions follow Istio and do not depend on the reporter:
- `received` = bytes received during the *request*: what the client sent toward the server;
- `sent` = bytes sent during the *response*: what the server sent back to the client.
ztunnel counts its downstream->upstream copy as "recv" and upstream->downstream as "send" on
both sides (outbound: app -> HBONE is the request; inbound: HBONE -> app is the request), so
the metric means the same thing whichever tunnel reports it. Only its access log flips them to
the reporting workload's own point of view (istio/istio#32399).

Upstream records a connection's open and its byte counters under the labels known when it
opened (response_flags `-`) and sets the response flag only when it records the close. So
here, too, `opened`, the byte counters and the gauge use the labels with response_flags `-`,
and only `istio_tcp_connections_closed_total` carries the flag the caller passes.

Everything lives in one `TcpMetrics`: no process-global state, so two tunnels (or tests) in
one process never share counters. Updates are plain dict arithmetic on the event loop's
thread; a scrape copies the dicts before rendering (with `meshcore.observability.promtext`).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from meshcore.identity.spiffe import SpiffeId
from meshcore.observability import promtext
from meshcore.state import Service, Workload

UNKNOWN = "unknown"

OPENED = "istio_tcp_connections_opened"
CLOSED = "istio_tcp_connections_closed"
RECEIVED_BYTES = "istio_tcp_received_bytes"
SENT_BYTES = "istio_tcp_sent_bytes"
SOCKETS_OPEN = "istio_tcp_sockets_open"
# Not upstream's: HBONE connections we ended because the peer broke the protocol or hit a
# limit (H2Limits), and TLS handshakes we refused, by reason. An attack shows here.
HBONE_REFUSED = "hbone_connections_refused"
HBONE_REFUSED_LABELS = ("direction", "reason")

_HELP = {
    OPENED: "The total number of TCP connections opened",
    CLOSED: "The total number of TCP connections closed",
    RECEIVED_BYTES: "The size of total bytes received during request in case of a TCP connection",
    SENT_BYTES: "The size of total bytes sent during response in case of a TCP connection",
    SOCKETS_OPEN: "The number of TCP connections currently open",
}


class ResponseFlags(enum.StrEnum):
    """Why a connection ended the way it did (Envoy-style flags, as ztunnel reports them)."""

    NONE = "-"
    DENY = "DENY"  # denied by authorization policy
    CONNECT = "CONNECT"  # the upstream connection could not be established
    TLS_FAILURE = "TLS_FAILURE"  # the mTLS handshake failed


class Reporter(enum.StrEnum):
    SOURCE = "source"  # the client's tunnel (outbound)
    DESTINATION = "destination"  # the server's tunnel (inbound)


class SecurityPolicy(enum.StrEnum):
    MUTUAL_TLS = "mutual_tls"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class TcpLabels:
    """One label set of the TCP metrics; every value is a plain string, `unknown` if missing."""

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
    response_flags: str
    connection_security_policy: str
    # The hash, computed once: every connection keys four counters by its label set at
    # open and four at close, and hashing 23 strings each time cost more than the
    # counting (a dataclass's generated __hash__ builds the tuple again per call).
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash(self.values()))

    def __hash__(self) -> int:
        return self._hash

    def values(self) -> tuple[str, ...]:
        """The values in `LABEL_NAMES` order."""
        return tuple(getattr(self, name) for name in LABEL_NAMES)


LABEL_NAMES: tuple[str, ...] = tuple(f.name for f in fields(TcpLabels) if f.init)


def _or_unknown(value: str | None) -> str:
    # As upstream's DefaultedUnknown: an absent or empty value is reported as "unknown".
    return str(value) if value else UNKNOWN


def tcp_labels(
    *,
    reporter: str,
    source: Workload | None,
    source_identity: SpiffeId | None,
    destination: Workload | None,
    destination_identity: SpiffeId | None,
    service: Service | None,
    response_flags: str = ResponseFlags.NONE,
    mtls: bool,
) -> TcpLabels:
    """The label set of one connection, as ztunnel derives it.

    - workload: the workload name (its Deployment etc.), canonical service/revision, namespace,
      cluster; `app`/`version` are the canonical name/revision, as upstream.
    - source_principal: the identity the client proved over mTLS, so `source_identity` only
      when `mtls` (a plaintext client proves nothing; upstream sets it only from the TLS
      identity, never from the source workload).
    - destination_principal: `destination_identity`, else the destination workload's identity
      (upstream reports the workload's identity whether or not the hop was mTLS).
    - destination_service*: the service's hostname, name and namespace.
    - connection_security_policy: `mutual_tls` when the hop is mTLS (HBONE), else `unknown`.

    Raises ValueError for a reporter other than "source" or "destination".
    """
    if reporter not in (Reporter.SOURCE, Reporter.DESTINATION):
        raise ValueError(f"reporter must be 'source' or 'destination', not {reporter!r}")
    # Thousands of connections share a handful of label sets: build each once and share
    # it (memory per open connection, and time per connection). The key holds the
    # objects by identity (hashing a whole Workload per connection would cost more than
    # building the labels); the cached value keeps them alive so no id is reused meanwhile.
    key = (
        reporter,
        id(source),
        source_identity,
        id(destination),
        destination_identity,
        id(service),
        response_flags,
        mtls,
    )
    hit = _LABELS.get(key)
    if hit is not None:
        return hit[0]
    labels = _build_labels(
        reporter, source, source_identity, destination, destination_identity, service,
        response_flags, mtls,
    )  # fmt: skip
    if len(_LABELS) >= _LABELS_MAX:
        _LABELS.clear()  # config changes leave stale entries behind: start over
    _LABELS[key] = (labels, source, destination, service)
    return labels


_LABELS_MAX = 4096
_LABELS: dict[tuple[object, ...], tuple[TcpLabels, object, object, object]] = {}


def _build_labels(
    reporter: str,
    source: Workload | None,
    source_identity: SpiffeId | None,
    destination: Workload | None,
    destination_identity: SpiffeId | None,
    service: Service | None,
    response_flags: str,
    mtls: bool,
) -> TcpLabels:
    src = source
    dst = destination
    dst_principal: SpiffeId | None = destination_identity
    if dst_principal is None and dst is not None:
        dst_principal = dst.identity
    return TcpLabels(
        reporter=str(reporter),
        source_workload=_or_unknown(src.workload_name if src else None),
        source_canonical_service=_or_unknown(src.canonical_name if src else None),
        source_canonical_revision=_or_unknown(src.canonical_revision if src else None),
        source_workload_namespace=_or_unknown(src.namespace if src else None),
        source_principal=_or_unknown(str(source_identity) if mtls and source_identity else None),
        source_app=_or_unknown(src.canonical_name if src else None),
        source_version=_or_unknown(src.canonical_revision if src else None),
        source_cluster=_or_unknown(src.cluster_id if src else None),
        destination_workload=_or_unknown(dst.workload_name if dst else None),
        destination_canonical_service=_or_unknown(dst.canonical_name if dst else None),
        destination_canonical_revision=_or_unknown(dst.canonical_revision if dst else None),
        destination_workload_namespace=_or_unknown(dst.namespace if dst else None),
        destination_principal=_or_unknown(str(dst_principal) if dst_principal else None),
        destination_app=_or_unknown(dst.canonical_name if dst else None),
        destination_version=_or_unknown(dst.canonical_revision if dst else None),
        destination_cluster=_or_unknown(dst.cluster_id if dst else None),
        destination_service=_or_unknown(service.hostname if service else None),
        destination_service_name=_or_unknown(service.name if service else None),
        destination_service_namespace=_or_unknown(service.namespace if service else None),
        request_protocol="tcp",
        response_flags=str(response_flags) or str(ResponseFlags.NONE),
        connection_security_policy=str(
            SecurityPolicy.MUTUAL_TLS if mtls else SecurityPolicy.UNKNOWN
        ),
    )


def _at_open(labels: TcpLabels) -> TcpLabels:
    """The labels as they were when the connection opened: no response flag yet."""
    if labels.response_flags == ResponseFlags.NONE:
        return labels
    return replace(labels, response_flags=str(ResponseFlags.NONE))


class TcpMetrics:
    """The tunnel's TCP counters. One instance per tunnel process."""

    # The classic text format (what `render` produces and every Prometheus version parses).
    CONTENT_TYPE: str = promtext.CONTENT_TYPE

    def __init__(self) -> None:
        self._opened: dict[TcpLabels, int] = {}
        self._closed: dict[TcpLabels, int] = {}
        self._received: dict[TcpLabels, int] = {}
        self._sent: dict[TcpLabels, int] = {}
        self._open: dict[TcpLabels, int] = {}
        self._hbone_refused: dict[tuple[str, str], int] = {}

    def hbone_refused(self, direction: str, reason: str) -> None:
        """An HBONE connection ended by us for the peer's misbehaviour (`reason`: the limit,
        the HTTP/2 error, or why its TLS handshake was refused). `direction`: inbound when
        the peer is a client of our listener, outbound when it is a server we dialled."""
        key = (direction, reason)
        self._hbone_refused[key] = self._hbone_refused.get(key, 0) + 1

    def hbone_refused_count(self, direction: str, reason: str) -> int:
        return self._hbone_refused.get((direction, reason), 0)

    def opened(self, labels: TcpLabels) -> None:
        """A connection was accepted and is being proxied."""
        key = _at_open(labels)
        self._opened[key] = self._opened.get(key, 0) + 1
        self._open[key] = self._open.get(key, 0) + 1
        # Upstream creates the byte series when the connection opens, so they exist (at 0)
        # for every label set that has connections, which keeps rate() queries continuous.
        self._received.setdefault(key, 0)
        self._sent.setdefault(key, 0)

    def transferred(self, labels: TcpLabels, *, received: int, sent: int) -> None:
        """Bytes moved on a connection that is still open (for live counters).

        `received` is request bytes (client -> server), `sent` response bytes (server ->
        client). Bytes reported here must not be reported again to `closed`.
        """
        _check_bytes(received, sent)
        key = _at_open(labels)
        if received:
            self._received[key] = self._received.get(key, 0) + received
        if sent:
            self._sent[key] = self._sent.get(key, 0) + sent

    def closed(self, labels: TcpLabels, *, received: int, sent: int) -> None:
        """A connection opened with `opened(labels)` ended.

        `received`: bytes the client sent toward the server (request direction);
        `sent`: bytes the server sent back to the client (response direction); both those not
        already given to `transferred`. `labels.response_flags` lands on the closed counter.
        """
        _check_bytes(received, sent)
        key = _at_open(labels)
        self._closed[labels] = self._closed.get(labels, 0) + 1
        self._received[key] = self._received.get(key, 0) + received
        self._sent[key] = self._sent.get(key, 0) + sent
        self._open[key] = max(0, self._open.get(key, 0) - 1)

    def refused(self, labels: TcpLabels) -> None:
        """A connection denied (DENY) or failed (CONNECT, TLS_FAILURE) before any byte moved.

        Counted as upstream counts it: opened (no flag) and closed (with the flag), no bytes.
        """
        self.opened(labels)
        self.closed(labels, received=0, sent=0)

    def _series(self) -> list[tuple[str, dict[tuple[str, ...], int]]]:
        """Every family's series keyed by their label values (a copy: a scrape renders it
        while connections go on)."""
        out: list[tuple[str, dict[tuple[str, ...], int]]] = [
            (name, {labels.values(): value for labels, value in list(series.items())})
            for name, series in (
                (OPENED, self._opened),
                (CLOSED, self._closed),
                (RECEIVED_BYTES, self._received),
                (SENT_BYTES, self._sent),
                (SOCKETS_OPEN, self._open),
            )
        ]
        out.append((HBONE_REFUSED, dict(list(self._hbone_refused.items()))))
        return out

    def export(self) -> dict[str, list[list[str | int]]]:
        """Every series as JSON rows `[*label values, value]`, by family: what a tunnel's
        worker process sends to its owner, which serves the sums (`render(others=...)`)."""
        return {
            name: [[*key, value] for key, value in series.items()]
            for name, series in self._series()
        }

    def render(self, others: Iterable[Mapping[str, Any]] = ()) -> bytes:
        """The Prometheus text exposition of every series: ours plus, summed into the same
        series, those of `others` (`export()`s of other processes of this tunnel), so each
        series appears once. ValueError names a row of `others` that is not one."""
        merged = dict(self._series())
        for i, other in enumerate(others):
            _add_export(merged, other, f"export {i}")
        families = [
            promtext.Family(
                f"{name}_total", _HELP[name], promtext.COUNTER, LABEL_NAMES,
                list(merged[name].items()),
            )
            for name in (OPENED, CLOSED, RECEIVED_BYTES, SENT_BYTES)
        ]  # fmt: skip
        families.append(
            promtext.Family(
                SOCKETS_OPEN, _HELP[SOCKETS_OPEN], promtext.GAUGE, LABEL_NAMES,
                list(merged[SOCKETS_OPEN].items()),
            )
        )  # fmt: skip
        families.append(
            promtext.Family(
                f"{HBONE_REFUSED}_total",
                "HBONE connections and TLS handshakes refused for the peer's misbehaviour",
                promtext.COUNTER,
                HBONE_REFUSED_LABELS,
                list(merged[HBONE_REFUSED].items()),
            )
        )
        return promtext.render(families)


_ARITY = {HBONE_REFUSED: len(HBONE_REFUSED_LABELS)}


def _add_export(
    merged: dict[str, dict[tuple[str, ...], int]], other: Mapping[str, Any], what: str
) -> None:
    """Add the rows of one `export()` into `merged`, checked first: nothing of a bad export
    is added."""
    rows: list[tuple[str, tuple[str, ...], int]] = []
    for name, family in other.items():
        if name not in merged or not isinstance(family, list):
            raise ValueError(f"{what}: {name!r} is not a family of the tunnel's metrics")
        arity = _ARITY.get(name, len(LABEL_NAMES))
        for j, row in enumerate(family):
            ok = (
                isinstance(row, list)
                and len(row) == arity + 1
                and all(isinstance(v, str) for v in row[:-1])
                and isinstance(row[-1], int)
                and not isinstance(row[-1], bool)
                and row[-1] >= 0
            )
            if not ok:
                raise ValueError(f"{what}: {name}[{j}] is not {arity} label values and a count")
            rows.append((name, tuple(row[:-1]), row[-1]))
    for name, key, value in rows:
        series = merged[name]
        series[key] = series.get(key, 0) + value


def _check_bytes(received: int, sent: int) -> None:
    if received < 0 or sent < 0:
        raise ValueError(f"byte counts must not be negative (received={received}, sent={sent})")
