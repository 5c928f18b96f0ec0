# The case tables read best one case per line.
# ruff: noqa: E501
"""Load balancers: injected random numbers, exclusion on retry, least request, the ring."""

from __future__ import annotations

import pytest

from tests.waypoint.routes.support import facts
from waypoint.lb import HashRing, LeastRequest, PickContext, Random, RoundRobin, hash_key
from waypoint.routes.destinationrule import HashOn, LbKind, LoadBalancer

EPS = ["a", "b", "c", "d"]


def test_round_robin_cycles_and_skips_excluded():
    rr = RoundRobin()
    assert [rr.pick(EPS, PickContext()) for _ in range(5)] == ["a", "b", "c", "d", "a"]
    assert rr.pick(EPS, PickContext(exclude=frozenset({"b"}))) == "c"


@pytest.mark.parametrize(
    ("rnd", "exclude", "expected"),
    [(0.0, frozenset(), "a"), (0.99, frozenset(), "d"), (0.0, frozenset({"a"}), "b"), (0.5, frozenset(EPS), "c")],
    ids=["first", "last", "previous host avoided", "all excluded: still one"],
)  # fmt: skip
def test_random(rnd, exclude, expected):
    assert Random().pick(EPS, PickContext(rnd=(rnd, 0.0), exclude=exclude)) == expected


@pytest.mark.parametrize(
    ("rnd", "in_flight", "expected"),
    [
        ((0.0, 0.3), {"a": 5, "b": 1}, "b"),
        ((0.0, 0.3), {"a": 1, "b": 5}, "a"),
        ((0.0, 0.3), {}, "a"),
    ],
    ids=["fewer in flight wins", "first has fewer", "tie: first"],
)
def test_least_request(rnd, in_flight, expected):
    assert LeastRequest().pick(EPS, PickContext(rnd=rnd, in_flight=in_flight)) == expected


def test_ring_is_stable_when_an_endpoint_leaves():
    eps = [f"10.0.0.{i}:80" for i in range(8)]
    before = HashRing(eps)
    after = HashRing(eps[:-1])
    moved = 0
    for i in range(2000):
        ctx = PickContext(hash_key=f"user-{i}")
        old, new = before.pick(eps, ctx), after.pick(eps[:-1], ctx)
        if old != eps[-1]:
            assert old == new  # only the leaving endpoint's keys move
        else:
            moved += 1
    assert 0 < moved < 2000


def test_ring_same_key_same_endpoint_and_exclusion():
    ring = HashRing(EPS)
    ctx = PickContext(hash_key="k")
    first = ring.pick(EPS, ctx)
    assert first is not None
    assert ring.pick(EPS, ctx) == first
    assert ring.pick(EPS, PickContext(hash_key="k", exclude=frozenset({first}))) != first


@pytest.mark.parametrize(
    ("hash_on", "name", "f", "expected"),
    [
        (HashOn.HEADER, "x-user", facts(headers={"x-user": "u1"}), "u1"),
        (HashOn.COOKIE, "session", facts(headers={"cookie": "a=1; session=s9"}), "s9"),
        (HashOn.QUERY, "id", facts("/p?id=7"), "7"),
        (HashOn.SOURCE_IP, "", facts(source_ip="10.1.1.1"), "10.1.1.1"),
        (HashOn.HEADER, "x-user", facts(), None),
    ],
    ids=["header", "cookie", "query", "source ip", "absent"],
)
def test_hash_key(hash_on, name, f, expected):
    assert hash_key(LoadBalancer(LbKind.CONSISTENT_HASH, hash_on, name), f) == expected
