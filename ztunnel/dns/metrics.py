"""The DNS proxy's counters, under upstream ztunnel's names (its "unstable" DNS metrics):
`istio_dns_requests_total` (every query a pod asked), `istio_dns_upstream_requests_total`
(those forwarded), `istio_dns_upstream_failures_total` (forwards that got no answer), each
by `request_query_type` (a, aaaa, mx, ...: lower case), `request_protocol` (udp, tcp),
`source_canonical_service` and `source_canonical_revision`. One `DnsMetrics` per tunnel,
shared by its pods' proxies; rendered with the other families on 15020.
"""

from __future__ import annotations

from meshcore.observability.promtext import COUNTER, Family, render
from meshcore.state import Workload
from ztunnel.dns.message import RType

LABELS = (
    "request_query_type",
    "request_protocol",
    "source_canonical_service",
    "source_canonical_revision",
)
Key = tuple[str, str, str, str]
REQUESTS = "istio_dns_requests_total"
UPSTREAM_REQUESTS = "istio_dns_upstream_requests_total"
UPSTREAM_FAILURES = "istio_dns_upstream_failures_total"
# Queries refused by a limit (ztunnel/dns/limits.py), by `reason` (rate, size,
# tcp_connections) and protocol: an operator sees a flood and which limit met it.
REFUSED = "dns_queries_refused_total"
_HELP = {
    REQUESTS: "Total number of DNS requests (unstable)",
    UPSTREAM_REQUESTS: "Total number of DNS requests forwarded to upstream (unstable)",
    UPSTREAM_FAILURES: "Total number of DNS requests that failed to forward upstream (unstable)",
}
# Label sets are few (query types x protocols x the node's workloads), but a pod chooses the
# query types it sends: past this many sets a new one is counted under type "other", so no
# pod can grow the table without bound.
_MAX_KEYS = 10_000


def query_type(qtype: int) -> str:
    try:
        return RType(qtype).name.lower()
    except ValueError:
        return str(qtype)


class DnsMetrics:
    def __init__(self) -> None:
        self._counts: dict[str, dict[Key, int]] = {name: {} for name in _HELP}
        self._refused: dict[tuple[str, str], int] = {}

    def refuse(self, reason: str, tcp: bool) -> None:
        key = (reason, "tcp" if tcp else "udp")
        self._refused[key] = self._refused.get(key, 0) + 1

    def refused(self, reason: str, tcp: bool) -> int:
        return self._refused.get((reason, "tcp" if tcp else "udp"), 0)

    def key(self, qtype: int, tcp: bool, source: Workload | None) -> Key:
        return (
            query_type(qtype),
            "tcp" if tcp else "udp",
            source.canonical_name if source is not None else "unknown",
            source.canonical_revision if source is not None else "unknown",
        )

    def add(self, name: str, key: Key) -> None:
        counts = self._counts[name]
        if key not in counts and len(counts) >= _MAX_KEYS:
            key = ("other", *key[1:])
        counts[key] = counts.get(key, 0) + 1

    def count(self, name: str, key: Key) -> int:
        return self._counts[name].get(key, 0)

    def render(self) -> bytes:
        families = [
            Family(name, _HELP[name], COUNTER, LABELS, sorted(counts.items()))
            for name, counts in self._counts.items()
        ]
        families.append(
            Family(
                REFUSED,
                "DNS queries refused by a limit",
                COUNTER,
                ("reason", "request_protocol"),
                sorted(self._refused.items()),
            )
        )
        return render(families)
