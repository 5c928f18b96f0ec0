"""The local-trust decisions: which peer uid may connect, token buckets, quiet logging."""

from __future__ import annotations

import os
import socket

import pytest

from meshcore.localtrust import (
    PeerCred,
    RateLog,
    TokenBucket,
    default_uids,
    parse_uids,
    peer_cred,
    refusal,
)


def test_peer_cred_reads_the_kernel_credentials() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        cred = peer_cred(a)
    assert (cred.pid, cred.uid, cred.gid) == (os.getpid(), os.geteuid(), os.getegid())


def test_refusal_names_the_uid_and_what_is_allowed() -> None:
    assert refusal(PeerCred(1, 0, 0), {0}) is None
    why = refusal(PeerCred(42, 65534, 65534), {0, 1000})
    assert why is not None
    assert "65534" in why and "0,1000" in why and "pid 42" in why


def test_parse_uids() -> None:
    assert parse_uids("") == default_uids() == frozenset({os.geteuid()})
    assert parse_uids(" 0, 1000 ,") == frozenset({0, 1000})
    for bad in ("root", "-1", "1.5", "4294967295"):
        with pytest.raises(ValueError, match="not a uid"):
            parse_uids(bad)


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    bucket = TokenBucket(rate_per_s=2.0, burst=3)
    assert [bucket.allow(0.0) for _ in range(4)] == [True, True, True, False]
    assert not bucket.allow(0.4)  # 0.8 of a token so far
    assert bucket.allow(0.5)  # 1 token
    assert not bucket.allow(0.5)
    assert [bucket.allow(100.0) for _ in range(4)] == [True, True, True, False]  # capped


def test_token_bucket_survives_a_clock_stepping_back() -> None:
    bucket = TokenBucket(rate_per_s=1.0, burst=1)
    assert bucket.allow(10.0)
    assert not bucket.allow(5.0)  # no tokens from a negative interval
    assert bucket.allow(6.0)  # and time counts again from the step


def test_token_bucket_rejects_nonsense() -> None:
    for rate, burst in ((0.0, 1), (1.0, 0), (-1.0, 5)):
        with pytest.raises(ValueError, match="must be positive"):
            TokenBucket(rate, burst)


def test_rate_log_logs_once_per_interval_with_the_suppressed_count() -> None:
    rl = RateLog(interval=10.0)
    assert rl.due(0.0) == 0
    assert [rl.due(t) for t in (1.0, 2.0, 9.9)] == [None, None, None]
    assert rl.due(10.0) == 3
    assert rl.due(10.5) is None
    assert rl.due(25.0) == 1


def test_rate_log_with_a_burst_lets_that_many_through_per_interval() -> None:
    rl = RateLog(interval=1.0, burst=3)
    assert [rl.due(t) for t in (0.0, 0.1, 0.2, 0.3, 0.9)] == [0, 0, 0, None, None]
    # A new window: the first line carries the two left out, the next ones none.
    assert [rl.due(t) for t in (1.0, 1.1)] == [2, 0]
