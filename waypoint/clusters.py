"""Per-destination upstream state, as Envoy keeps a cluster: the balancer, outlier
detection, circuit-breaker counts, and the HTTP/1.1 connections (HBONE streams to an
endpoint's tunnel carrying keep-alive HTTP/1.1) that are idle and may be reused.

The decisions (which endpoint, eject or not, admit or overflow) are the pure modules'
(`lb`, `outlier`, `routes.pool`); this module only holds their state between requests.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

from waypoint.endpoints import Endpoint
from waypoint.http.h1client import Http1Client
from waypoint.http.h2client import Http2Client
from waypoint.lb import Balancer, balancer
from waypoint.outlier import OutlierDetector
from waypoint.routes.destinationrule import TrafficPolicy

# Idle upstream HTTP/1.1 connections kept per endpoint (each holds one HBONE stream).
MAX_IDLE_PER_ENDPOINT = 32

_closing: set[asyncio.Task[None]] = set()


def discard_h2(client: Http2Client) -> None:
    """Close an HTTP/2 upstream in the background (GOAWAY; its streams end)."""
    task = asyncio.get_running_loop().create_task(client.aclose())
    _closing.add(task)
    task.add_done_callback(_closing.discard)


def discard(client: Http1Client) -> None:
    """Close an upstream connection in the background (its stream is reset)."""
    task = asyncio.get_running_loop().create_task(client.aclose())
    _closing.add(task)
    task.add_done_callback(_closing.discard)


@dataclass(slots=True)
class Cluster:
    """One destination (service and port, or subset) seen from this waypoint."""

    policy: TrafficPolicy
    endpoints: tuple[Endpoint, ...] = ()
    # The endpoints' addresses in their order, and each endpoint by its address: made by
    # `refresh`, so that a request's pick costs the same for 2 endpoints as for 200.
    addresses: tuple[str, ...] = ()
    _by_address: dict[str, Endpoint] = field(default_factory=dict)
    balancer: Balancer | None = None
    outlier: OutlierDetector | None = None
    active_requests: int = 0
    pending: int = 0
    active_retries: int = 0
    connections: int = 0  # upstream HTTP/1.1 connections open (busy or idle)
    in_flight: dict[str, int] = field(default_factory=dict)  # by endpoint address
    idle: dict[str, list[Http1Client]] = field(default_factory=dict)
    # HTTP/2 upstreams: one multiplexed connection (an HBONE stream) per endpoint.
    h2: dict[str, Http2Client] = field(default_factory=dict)
    served: dict[int, int] = field(default_factory=dict)  # requests per connection (by id)

    def refresh(self, policy: TrafficPolicy, endpoints: Sequence[Endpoint]) -> None:
        """New config or endpoints: rebuild what depends on them, keep the counts."""
        endpoints = tuple(endpoints)
        if policy == self.policy and endpoints == self.endpoints and self.balancer is not None:
            return
        self.policy = policy
        self.endpoints = endpoints
        self.addresses = addresses = tuple(e.address for e in endpoints)
        self._by_address = {e.address: e for e in endpoints}
        self.balancer = balancer(policy.lb, addresses)
        if policy.outlier is None:
            self.outlier = None
        elif self.outlier is None:
            self.outlier = OutlierDetector(policy.outlier, addresses)
        else:
            self.outlier.set_endpoints(addresses)
        kept = self._by_address.keys()
        for address in self.h2.keys() - kept:
            discard_h2(self.h2.pop(address))
        for address in self.idle.keys() - kept:
            for client in self.idle.pop(address):
                discard(client)
                self.connections -= 1

    def by_address(self, address: str) -> Endpoint | None:
        return self._by_address.get(address)

    def take_idle(self, address: str) -> Http1Client | None:
        idle = self.idle.get(address)
        while idle:
            client = idle.pop()
            if client.reusable:
                return client
            discard(client)
            self.connections -= 1
        return None

    def put_idle(self, address: str, client: Http1Client) -> bool:
        idle = self.idle.setdefault(address, [])
        if len(idle) >= MAX_IDLE_PER_ENDPOINT or not client.reusable:
            return False
        idle.append(client)
        return True

    @property
    def idle_count(self) -> int:
        return sum(len(v) for v in self.idle.values())
