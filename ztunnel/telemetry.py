"""The node's book of open connections, feeding the TCP metrics and the operator views.

Every proxied connection that got as far as moving bytes is `open`ed here with its metric
labels and `close`d once with its byte counts; one that was refused or failed before that is
`refused` (counted, never listed). While open, an entry can report live byte counts, and
inbound entries can be re-checked against the current policy and aborted when it no longer
allows them.

Byte directions follow Istio: "received" is what the client sent (the request direction),
"sent" is what went back to it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from ztunnel.metrics import TcpLabels, TcpMetrics

log = structlog.get_logger(__name__)


def _no_counts() -> tuple[int, int]:
    return (0, 0)


@dataclass(eq=False, slots=True)
class Tracked:
    direction: str  # outbound | inbound | inbound_plaintext | passthrough
    pod: str  # "namespace/name" of the enrolled pod the connection belongs to
    src: str
    dst: str
    labels: TcpLabels
    hbone: str | None = None
    src_identity: str | None = None
    dst_identity: str | None = None
    started_at: float = field(default_factory=time.time)
    # Live (request bytes, response bytes): client -> server, server -> client.
    counts: Callable[[], tuple[int, int]] = _no_counts
    abort: Callable[[str], None] | None = None
    # Inbound only: the denial reason under the current policy, or None while allowed.
    recheck: Callable[[], str | None] | None = None

    def to_json(self) -> dict[str, Any]:
        request, response = self.counts()
        return {
            "direction": self.direction,
            "pod": self.pod,
            "src": self.src,
            "dst": self.dst,
            "hbone": self.hbone,
            "srcIdentity": self.src_identity,
            "dstIdentity": self.dst_identity,
            # From the client's point of view, as the access log's bytes_sent/bytes_recv.
            "bytesSent": request,
            "bytesReceived": response,
            "startedAt": self.started_at,
        }


class Telemetry:
    def __init__(self, metrics: TcpMetrics | None = None) -> None:
        self.metrics = metrics if metrics is not None else TcpMetrics()
        self._open: set[Tracked] = set()

    def open(self, entry: Tracked) -> None:
        self._open.add(entry)
        self.metrics.opened(entry.labels)

    def close(self, entry: Tracked, *, request_bytes: int, response_bytes: int) -> None:
        if entry not in self._open:
            return  # closing twice must not count twice
        self._open.discard(entry)
        self.metrics.closed(entry.labels, received=request_bytes, sent=response_bytes)

    def refused(self, labels: TcpLabels) -> None:
        self.metrics.refused(labels)

    def connections(self) -> list[dict[str, Any]]:
        return [e.to_json() for e in sorted(self._open, key=lambda e: e.started_at)]

    def __len__(self) -> int:
        return len(self._open)

    def recheck(self) -> int:
        """Re-evaluate every open inbound connection; abort those now denied."""
        closed = 0
        for entry in list(self._open):
            if entry.recheck is None or entry.abort is None:
                continue
            reason = entry.recheck()
            if reason is not None:
                log.info(
                    "connection closed by policy change",
                    pod=entry.pod,
                    src=entry.src,
                    dst=entry.dst,
                    src_identity=entry.src_identity,
                    reason=reason,
                )
                entry.abort(f"policy now denies it: {reason}")
                closed += 1
        return closed
