"""The connection-pool gate: may a request go upstream now, wait for a connection, or
overflow (the caller answers 503 with response flag `UO`)? Pure: counts are arguments."""

from __future__ import annotations

import enum

from waypoint.routes.destinationrule import ConnectionPool

OVERFLOW_STATUS = 503
OVERFLOW_FLAG = "UO"


class PoolVerdict(enum.Enum):
    PROCEED = "proceed"  # send now
    QUEUE = "queue"  # HTTP/1.1: wait for a connection (counts as pending)
    OVERFLOW = "overflow"  # refuse: 503, flag UO


def admit_request(
    pool: ConnectionPool, *, http2: bool, active_requests: int, pending: int, connections: int,
    idle_connections: int = 0,
) -> PoolVerdict:  # fmt: skip
    """Envoy's circuit breakers for one cluster.

    HTTP/2 multiplexes: only the active requests count (http2MaxRequests). HTTP/1.1 needs a
    connection per request: a free one is used, a new one is opened below maxConnections,
    else the request waits as pending below http1MaxPendingRequests, else it overflows.
    """
    if http2:
        if active_requests >= pool.http2_max_requests:
            return PoolVerdict.OVERFLOW
        return PoolVerdict.PROCEED
    if idle_connections > 0 or connections < pool.max_connections:
        return PoolVerdict.PROCEED
    if pending < pool.http1_max_pending_requests:
        return PoolVerdict.QUEUE
    return PoolVerdict.OVERFLOW


def admit_retry(pool: ConnectionPool, active_retries: int) -> bool:
    """A retry is allowed while fewer than maxRetries are in flight for the cluster."""
    return active_retries < pool.max_retries


def connection_spent(pool: ConnectionPool, requests_served: int) -> bool:
    """Whether a connection has served its maxRequestsPerConnection (0: no limit)."""
    return (
        pool.max_requests_per_connection > 0 and requests_served >= pool.max_requests_per_connection
    )
