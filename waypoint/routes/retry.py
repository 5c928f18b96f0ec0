"""Retry decisions, as Envoy makes them for Istio: which outcome is retried, how many times,
and how long to wait between tries. Pure: the random number is an argument.

An outcome is an HTTP status (`int`), a gRPC status (`GrpcStatus`), or a `Failure` (no
response at all). Istio's default when a route sets no retries: 2 retries on
connect-failure, refused-stream, unavailable, cancelled and retriable-status-codes with no
code listed, so a 503 answer is not retried; another host is chosen for each retry, up to 5
host selections.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

# Envoy's retry back-off: 25 ms base, full jitter, capped at ten times the base.
DEFAULT_BACKOFF_BASE = 0.025
DEFAULT_HOST_SELECTION_ATTEMPTS = 5


class Failure(enum.Enum):
    """A try that produced no response."""

    CONNECT_FAILURE = "connect-failure"
    RESET = "reset"  # the upstream closed or reset the stream before answering
    REFUSED_STREAM = "refused-stream"  # HTTP/2 REFUSED_STREAM: never processed, safe to retry
    TIMEOUT = "timeout"  # the per-try timeout expired


@dataclass(frozen=True, slots=True)
class GrpcStatus:
    code: int


Outcome = int | GrpcStatus | Failure

# gRPC status codes by the names retryOn uses.
GRPC_CODES = {
    "cancelled": 1,
    "deadline-exceeded": 4,
    "resource-exhausted": 8,
    "internal": 13,
    "unavailable": 14,
}

# The conditions of Envoy's x-envoy-retry-on and x-envoy-retry-grpc-on that the waypoint
# understands.
RETRY_ON = frozenset(
    {
        "5xx",
        "gateway-error",
        "reset",
        "connect-failure",
        "refused-stream",
        "retriable-4xx",
        "retriable-status-codes",
        *GRPC_CODES,
    }
)

_NO_RESPONSE_5XX = frozenset(Failure)  # 5xx and gateway-error cover "no response at all"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a request is retried.

    `attempts` is the number of retries after the first try (0: never retried).
    `codes` are the statuses retriable-status-codes retries. `per_try_timeout` (seconds) bounds
    each try; None leaves only the request's own timeout.
    """

    attempts: int
    retry_on: frozenset[str]
    codes: frozenset[int] = frozenset()
    per_try_timeout: float | None = None
    backoff_base: float = DEFAULT_BACKOFF_BASE
    backoff_max: float = 10 * DEFAULT_BACKOFF_BASE
    host_selection_attempts: int = DEFAULT_HOST_SELECTION_ATTEMPTS
    avoid_previous_host: bool = True


DEFAULT_RETRY = RetryPolicy(
    attempts=2,
    retry_on=frozenset(
        {"connect-failure", "refused-stream", "unavailable", "cancelled", "retriable-status-codes"}
    ),
)
NO_RETRY = RetryPolicy(attempts=0, retry_on=frozenset())


def retriable(policy: RetryPolicy, outcome: Outcome) -> bool:
    """Whether `outcome` is one the policy retries (ignoring how many tries are left)."""
    on = policy.retry_on
    if isinstance(outcome, Failure):
        if outcome in _NO_RESPONSE_5XX and ("5xx" in on or "gateway-error" in on):
            return True
        if "reset" in on:
            return True
        if outcome is Failure.CONNECT_FAILURE:
            return "connect-failure" in on
        if outcome is Failure.REFUSED_STREAM:
            return "refused-stream" in on
        return False
    if isinstance(outcome, GrpcStatus):
        return any(GRPC_CODES[name] == outcome.code for name in on if name in GRPC_CODES)
    if "5xx" in on and 500 <= outcome <= 599:
        return True
    if "gateway-error" in on and outcome in (502, 503, 504):
        return True
    if "retriable-4xx" in on and outcome == 409:
        return True
    return "retriable-status-codes" in on and outcome in policy.codes


def should_retry(policy: RetryPolicy, attempt: int, outcome: Outcome) -> bool:
    """After try number `attempt` (1 for the first) ended with `outcome`: try again?"""
    return attempt <= policy.attempts and retriable(policy, outcome)


def backoff(policy: RetryPolicy, attempt: int, rnd: float) -> float:
    """Seconds to wait before retry number `attempt` (1 for the first retry).

    Envoy's jittered exponential back-off: uniform in [0, base * (2^attempt - 1)), the range
    capped at `backoff_max`. `rnd` is a uniform number in [0, 1).
    """
    attempt = max(1, min(attempt, 32))  # 2^32 is far past the cap; bounds the arithmetic
    ceiling = min(policy.backoff_base * ((1 << attempt) - 1), policy.backoff_max)
    return min(max(rnd, 0.0), 1.0) * ceiling
