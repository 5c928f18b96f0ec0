"""Load balancing over a service's endpoints, as DestinationRule's loadBalancer asks: pure.

Random numbers, the endpoints to avoid (the previous host on a retry), the requests in
flight per endpoint and the hash key are arguments. Endpoints are opaque hashable strings
("10.0.0.5:8080"). Every balancer returns None when no endpoint is left to choose.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from waypoint.routes.destinationrule import HashOn, LbKind, LoadBalancer
from waypoint.routes.facts import RequestFacts


@dataclass(frozen=True, slots=True)
class PickContext:
    """What one pick may use. `rnd` are uniform numbers in [0, 1) (two for power of two
    choices); `exclude` the endpoints not to pick unless nothing else is left."""

    rnd: tuple[float, float] = (0.0, 0.0)
    exclude: frozenset[str] = frozenset()
    in_flight: Mapping[str, int] = field(default_factory=dict)
    hash_key: str | None = None


def _candidates(endpoints: Sequence[str], exclude: frozenset[str]) -> Sequence[str]:
    if not exclude:
        return endpoints
    left = [e for e in endpoints if e not in exclude]
    return left or endpoints  # a retry to the same host beats no retry at all


def _index(rnd: float, n: int) -> int:
    return min(int(max(rnd, 0.0) * n), n - 1)


class RoundRobin:
    """Each endpoint in turn. The cursor is the balancer's only state."""

    __slots__ = ("_next",)

    def __init__(self) -> None:
        self._next = 0

    def pick(self, endpoints: Sequence[str], ctx: PickContext) -> str | None:
        for _ in range(len(endpoints)):
            endpoint = endpoints[self._next % len(endpoints)]
            self._next += 1
            if endpoint not in ctx.exclude:
                return endpoint
        return endpoints[0] if endpoints else None


class Random:
    __slots__ = ()

    def pick(self, endpoints: Sequence[str], ctx: PickContext) -> str | None:
        candidates = _candidates(endpoints, ctx.exclude)
        return candidates[_index(ctx.rnd[0], len(candidates))] if candidates else None


class LeastRequest:
    """Envoy's LEAST_REQUEST: two endpoints drawn at random, the one with fewer requests in
    flight wins (the first on a tie)."""

    __slots__ = ()

    def pick(self, endpoints: Sequence[str], ctx: PickContext) -> str | None:
        candidates = _candidates(endpoints, ctx.exclude)
        if not candidates:
            return None
        a = candidates[_index(ctx.rnd[0], len(candidates))]
        b = candidates[_index(ctx.rnd[1], len(candidates))]
        return b if ctx.in_flight.get(b, 0) < ctx.in_flight.get(a, 0) else a


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class HashRing:
    """A consistent-hash ring (ketama style): each endpoint owns the same number of points,
    fixed by the policy's ring size and not by how many endpoints there are, so when one
    leaves only the keys it owned move; every other key keeps its endpoint."""

    __slots__ = ("_owners", "_points")

    def __init__(self, endpoints: Sequence[str], size: int = 1024) -> None:
        per = max(16, min(size // 8, 1024))
        ring = sorted((_hash(f"{e}_{i}"), e) for e in sorted(set(endpoints)) for i in range(per))
        self._points = [p for p, _ in ring]
        self._owners = [e for _, e in ring]

    def pick(self, endpoints: Sequence[str], ctx: PickContext) -> str | None:
        if not self._points:
            return None
        if ctx.hash_key is None:  # nothing to hash on: Envoy picks at random
            return Random().pick(endpoints, ctx)
        start = bisect.bisect_left(self._points, _hash(ctx.hash_key)) % len(self._points)
        allowed = set(endpoints)
        fallback = None
        for step in range(len(self._points)):
            owner = self._owners[(start + step) % len(self._points)]
            if owner in allowed:
                if owner not in ctx.exclude:
                    return owner
                fallback = fallback or owner
        return fallback


Balancer = RoundRobin | Random | LeastRequest | HashRing


def balancer(policy: LoadBalancer, endpoints: Sequence[str]) -> Balancer:
    """A balancer for a DestinationRule's policy (a ring is built for its endpoints)."""
    if policy.kind is LbKind.ROUND_ROBIN:
        return RoundRobin()
    if policy.kind is LbKind.RANDOM:
        return Random()
    if policy.kind is LbKind.CONSISTENT_HASH:
        return HashRing(endpoints, policy.ring_size)
    return LeastRequest()


def pick(balancer_: Balancer, endpoints: Sequence[str], ctx: PickContext) -> str | None:
    return balancer_.pick(endpoints, ctx)


def hash_key(policy: LoadBalancer, facts: RequestFacts) -> str | None:
    """The value a consistent-hash policy hashes for this request, or None if it is absent."""
    if policy.hash_on is HashOn.HEADER:
        return facts.header(policy.hash_name)
    if policy.hash_on is HashOn.QUERY:
        return facts.query_param(policy.hash_name)
    if policy.hash_on is HashOn.SOURCE_IP:
        return facts.source_ip
    if policy.hash_on is HashOn.COOKIE:
        for part in (facts.header("cookie") or "").replace(",", ";").split(";"):
            name, _, value = part.strip().partition("=")
            if name == policy.hash_name:
                return value
    return None
