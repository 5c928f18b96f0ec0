"""Certificate lifetime decisions: when to refresh, how long to back off after a failure,
and whether a certificate the CA issued is usable by this node's clock.

Pure: the current time and the random draw are arguments, so every decision is testable
without a clock or a CA (the certificate manager supplies both).

Clock skew: the CA back-dates notBefore by `controlplane.ca.CLOCK_SKEW` (two minutes, as
Istio's CA: `ClockSkewGracePeriod`), so a node or peer whose clock is up to that much behind
the CA's still sees a new certificate as valid. A certificate that is not valid yet by more
than `MAX_CLOCK_SKEW`, or has already expired, by this node's clock is refused: the CA's clock
and ours disagree beyond what back-dating covers, and presenting it would fail every
handshake with a peer whose clock agrees with ours. Within the bound it is taken (the CA's
clock is ahead of ours by more than the back-dating): peers whose clocks agree with the
CA's accept it at once, and the others within that bound.
"""

from __future__ import annotations

from datetime import datetime, timedelta

# How far a certificate's notBefore may lie ahead of our clock and still be taken (the CA
# back-dates by as much, so within this bound peers with our clock accept it too).
MAX_CLOCK_SKEW = timedelta(minutes=2)
# Never refresh more often than this, even for a certificate about to expire.
MIN_REFRESH_DELAY = 1.0
# Backoff after failed fetches: 0.5 s doubling, +-20 % jitter so that the tunnels of a
# cluster that lost its CA together do not come back in lockstep.
BACKOFF_INITIAL = 0.5
BACKOFF_JITTER = 0.2
# The cap while a valid certificate is still held (a refresh is retried well before expiry:
# half the remaining lifetime is left when the first refresh fails).
BACKOFF_MAX = 30.0
# The cap while no usable certificate is held: a pod waits for it (its traffic is refused,
# never passed in plaintext), so a CA that is back must be noticed within seconds.
BACKOFF_MAX_WAITING = 5.0


def refresh_delay(not_after: datetime, now: datetime) -> float:
    """Seconds until the next refresh: half of the lifetime left by our clock.

    Measured from now, not from notBefore: notBefore is back-dated (and set by the CA's
    clock), so half of notAfter - notBefore would be in the past for a short lifetime."""
    left = (not_after - now).total_seconds()
    return max(MIN_REFRESH_DELAY, left / 2)


def backoff_delay(failures: int, *, waiting: bool = False, rand: float = 0.5) -> float:
    """Seconds to wait after `failures` consecutive failed fetches (1 -> 0.5 s, doubling).

    `waiting`: no usable certificate is held (capped at BACKOFF_MAX_WAITING, else
    BACKOFF_MAX). `rand` in [0, 1) spreads the delay by +-BACKOFF_JITTER (0.5: none)."""
    cap = BACKOFF_MAX_WAITING if waiting else BACKOFF_MAX
    exponent = min(max(0, failures - 1), 32)  # capped: 2.0 ** 1024 would overflow
    base = min(cap, BACKOFF_INITIAL * 2.0**exponent)
    spread = 1.0 + BACKOFF_JITTER * (2.0 * min(max(rand, 0.0), 1.0) - 1.0)
    return min(cap, base * spread)


def issued_problem(
    not_before: datetime,
    not_after: datetime,
    now: datetime,
    max_skew: timedelta = MAX_CLOCK_SKEW,
) -> str | None:
    """Why a freshly issued certificate cannot be used by our clock, or None if it can."""
    if not_after <= not_before:
        return f"its validity is empty (notBefore {_t(not_before)}, notAfter {_t(not_after)})"
    ahead = not_before - now
    if ahead > max_skew:
        return (
            f"it is not valid until {_t(not_before)}, {ahead.total_seconds():.0f} s after this "
            f"node's clock ({_t(now)}); more than the {max_skew.total_seconds():.0f} s of "
            "clock skew tolerated: check the CA's and this node's clocks"
        )
    if not_after <= now:
        return (
            f"it expired at {_t(not_after)}, {(now - not_after).total_seconds():.0f} s before "
            f"this node's clock ({_t(now)}): check the CA's and this node's clocks"
        )
    return None


def usable(not_after: datetime, now: datetime) -> bool:
    """Whether a held certificate may still be presented on a new connection."""
    return now < not_after


def _t(when: datetime) -> str:
    return when.isoformat(timespec="seconds")


__all__ = [
    "BACKOFF_INITIAL",
    "BACKOFF_MAX",
    "BACKOFF_MAX_WAITING",
    "MAX_CLOCK_SKEW",
    "MIN_REFRESH_DELAY",
    "backoff_delay",
    "issued_problem",
    "refresh_delay",
    "usable",
]
