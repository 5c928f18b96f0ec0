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
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from meshcore.observability.accesslog import ConnectionLog, Direction
from meshcore.observability.metrics import TcpLabels, TcpMetrics

if TYPE_CHECKING:
    from meshcore.policy.verdict import Verdict
    from meshcore.state import Workload

log = structlog.get_logger(__name__)


class Relay(Protocol):
    """What a table entry reads live and can stop: the relay moving the connection's bytes.
    `sent` is toward the destination."""

    @property
    def sent(self) -> int: ...

    @property
    def received(self) -> int: ...

    def when_done(self, callback: Callable[[Any], None]) -> None: ...

    def abort(self, reason: str) -> None: ...


class RelayOwner(Protocol):
    """The proxy a relay runs for: it knows its open relays (to stop them), whether it is
    stopping (then every connection it ends is logged as stopped), and the table it books
    them in."""

    stopping: bool
    relays: dict[Any, None]
    connection_table: ConnectionTable


# The access-log error of connections ended because the tunnel stopped serving the pod.
STOPPED = "tunnel stopped serving the pod"


class Tracked(ConnectionLog):
    """One proxied connection from its accept to its end: its access-log line (the
    `ConnectionLog` part, made at the accept whatever path the connection then takes) and,
    once its relay runs, its entry in the node's table. One object for both, holding
    references and rendering strings only when shown: a tunnel keeps one per open
    connection, and a second object with the same addresses and identities cost about 150
    bytes more per connection in each tunnel."""

    # Set by `ConnectionTable.follow` when the relay starts; nothing reads them before
    # (only the table's entries are counted, shown, re-checked or ended).
    __slots__ = ("labels", "owner", "recheck", "relay", "request_is_received")
    labels: TcpLabels
    relay: Relay
    owner: RelayOwner
    # Whether the request direction (client -> server) is the relay's `received`: so for
    # the server end of an HBONE stream, whose `sent` goes back into the tunnel.
    request_is_received: bool
    # Inbound only: the connection's verdict under the current policy.
    recheck: Callable[[Tracked], Verdict] | None

    @property
    def pod(self) -> Workload:
        """The enrolled pod the connection belongs to: the source's outbound, else the
        destination's."""
        pod = self.src_workload if self.direction is Direction.OUTBOUND else self.dst_workload
        assert pod is not None, "a tracked connection names its pod"
        return pod

    @property
    def started_at(self) -> float:
        """When the connection was accepted (Unix time)."""
        return time.time() - (time.monotonic() - self.start)

    def __call__(self, result: Any) -> None:
        self.ended(result)

    def ended(self, result: Any) -> None:
        """The relay ended: close the entry, count it, write its access-log line."""
        owner = self.owner
        owner.relays.pop(self.relay, None)
        request, response = self.counts()  # the relay's counters are final now
        owner.connection_table.close(self, request_bytes=request, response_bytes=response)
        error = STOPPED if owner.stopping else result.error
        self.finish(request, response, error)

    def counts(self) -> tuple[int, int]:
        """Live (request bytes, response bytes): client -> server, server -> client."""
        r = self.relay
        return (r.received, r.sent) if self.request_is_received else (r.sent, r.received)

    def abort(self, reason: str) -> None:
        self.relay.abort(reason)

    def to_json(self) -> dict[str, Any]:
        request, response = self.counts()
        # The table names the pod's identity as a plaintext connection's destination (the
        # access log leaves it out: nothing on that connection proved it).
        dst_identity = (
            self.pod.identity
            if self.direction is Direction.INBOUND_PLAINTEXT
            else self.dst_identity
        )
        return {
            "direction": self.direction.value,
            "pod": f"{self.pod.namespace}/{self.pod.name}",
            "src": str(self.src),
            "dst": str(self.dst),
            "hbone": None if self.hbone is None else str(self.hbone),
            "srcIdentity": None if self.src_identity is None else str(self.src_identity),
            "dstIdentity": None if dst_identity is None else str(dst_identity),
            # From the client's point of view, as the access log's bytes_sent/bytes_recv.
            "bytesSent": request,
            "bytesReceived": response,
            "startedAt": self.started_at,
        }


class ConnectionTable:
    """The node's open connections: each proxy books what it relays here, and the metrics,
    `/connections`, the policy re-check and drain all read this one table."""

    def __init__(self, metrics: TcpMetrics | None = None) -> None:
        self.metrics = metrics if metrics is not None else TcpMetrics()
        # Dicts as ordered sets: at thousands of entries a set's table costs about twice
        # a dict's per entry, and a tunnel keeps one entry per open connection.
        self._open: dict[Tracked, None] = {}
        self.opened_total = 0  # running totals: activity, for whoever watches for quiet
        self.closed_total = 0

    def open(self, entry: Tracked) -> None:
        self._open[entry] = None
        self.opened_total += 1
        self.metrics.opened(entry.labels)

    def close(self, entry: Tracked, *, request_bytes: int, response_bytes: int) -> None:
        if entry not in self._open:
            return  # closing twice must not count twice
        del self._open[entry]
        self.closed_total += 1
        self.metrics.closed(entry.labels, received=request_bytes, sent=response_bytes)

    def follow(
        self,
        entry: Tracked,
        owner: RelayOwner,
        relay: Relay,
        labels: TcpLabels,
        *,
        recheck: Callable[[Tracked], Verdict] | None = None,
        request_is_received: bool = False,
    ) -> None:
        """Book a started relay: open in the table and metrics now; closed, counted and
        logged (exactly once) when its `done` resolves. No task waits for it: a coroutine
        chain parked for a connection's whole life would cost more memory than the
        connection's own state."""
        assert owner.connection_table is self
        entry.relay, entry.labels, entry.owner = relay, labels, owner
        entry.recheck, entry.request_is_received = recheck, request_is_received
        owner.relays[relay] = None
        self.open(entry)
        # The entry itself is the callback (`__call__`): a bound method per connection
        # would cost 64 bytes more, in each tunnel.
        relay.when_done(entry)

    def refused(self, labels: TcpLabels) -> None:
        self.metrics.refused(labels)

    def connections(self) -> list[dict[str, Any]]:
        return [e.to_json() for e in sorted(self._open, key=lambda e: e.start)]

    def __len__(self) -> int:
        return len(self._open)

    def recheck(self) -> int:
        """Re-evaluate every open inbound connection; abort those now denied."""
        closed = 0
        for entry in list(self._open):
            if entry.recheck is None:
                continue
            verdict = entry.recheck(entry)
            if not verdict.allowed:
                log.info(
                    "connection closed by policy change",
                    pod=f"{entry.pod.namespace}/{entry.pod.name}",
                    src=str(entry.src),
                    dst=str(entry.dst),
                    src_identity=str(entry.src_identity) if entry.src_identity else None,
                    policy=verdict.policy,
                    rule=verdict.rule,
                    reason=verdict.reason,
                )
                entry.abort(f"policy now denies it: {verdict.reason}")
                closed += 1
        return closed
