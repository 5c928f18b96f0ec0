"""What one pod may make its DNS proxy hold and do (pure: the limits and the query rate).

Every field is a tunnel setting: the environment variable `DNS_PROXY_<FIELD IN CAPITALS>`
(ztunnel/config.py). The proxy serves one pod, so the rate is the pod's: a flooding pod
spends its own budget, never another pod's.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class DnsLimits:
    # Queries being forwarded at once (UDP and TCP together); past it a UDP query is
    # dropped (the client retries) and a TCP one answered SERVFAIL.
    max_in_flight: int = 256
    attempt_timeout: float = 2.0  # per upstream
    forward_timeout: float = 5.0  # in all, then SERVFAIL
    max_tcp_connections: int = 64  # the excess is closed at once
    tcp_idle_timeout: float = 5.0  # upstream ztunnel's DEFAULT_TCP_REQUEST_TIMEOUT
    # A query over TCP: a question and an OPT record fit in far less. Past it the
    # connection is closed (its 2-byte length prefix would let it ask for 64 KiB).
    max_tcp_query_bytes: int = 4096
    # Queries a second, and the burst above that rate (a token bucket). Past it a UDP
    # query is dropped before it is parsed (the cheapest refusal) and a TCP one answered
    # REFUSED. CoreDNS-style resolvers serve tens of thousands a second; one pod's
    # well-behaved resolver asks a few per connection it makes.
    max_queries_per_second: int = 500
    max_query_burst: int = 1000
