"""Certificate lifetime decisions (pure), and the manager applying them with an injected clock
against the real CA whose own clock is set apart from ours."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from controlplane.ca import CLOCK_SKEW, csr_identity, parse_csr
from meshcore.identity.certs import CertificateError, CertificateManager
from meshcore.identity.lifetime import (
    BACKOFF_MAX,
    BACKOFF_MAX_WAITING,
    MAX_CLOCK_SKEW,
    MIN_REFRESH_DELAY,
    backoff_delay,
    issued_problem,
    refresh_delay,
    usable,
)
from meshcore.identity.spiffe import SpiffeId
from tests.support.certs import InProcessCA

from .test_certs import FakeSleep

ALICE = SpiffeId("cluster.local", "shop", "alice")
T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
S = timedelta(seconds=1)


def test_backoff_doubles_to_its_cap_and_waiting_identities_retry_sooner():
    assert [backoff_delay(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 4.0, 8.0]
    assert backoff_delay(6) == 16.0
    assert backoff_delay(7) == BACKOFF_MAX == 30.0
    assert backoff_delay(10_000) == BACKOFF_MAX
    assert [backoff_delay(n, waiting=True) for n in range(1, 6)] == [0.5, 1.0, 2.0, 4.0, 5.0]
    assert backoff_delay(10_000, waiting=True) == BACKOFF_MAX_WAITING


def test_backoff_jitter_spreads_within_twenty_percent_and_never_past_the_cap():
    assert backoff_delay(3, rand=0.0) == pytest.approx(1.6)
    assert backoff_delay(3, rand=0.999999) == pytest.approx(2.4, rel=1e-4)
    assert backoff_delay(100, rand=0.999999) == BACKOFF_MAX
    assert backoff_delay(100, rand=0.0) == pytest.approx(0.8 * BACKOFF_MAX)
    assert backoff_delay(1, rand=7.0) == pytest.approx(0.6)  # a bad draw is clamped
    assert backoff_delay(0) == backoff_delay(1)


def test_refresh_at_half_of_the_lifetime_left_by_our_clock():
    # A 60 s certificate back-dated by the CA: refresh in 30 s, not at once.
    assert refresh_delay(T0 + 60 * S, T0) == 30.0
    assert refresh_delay(T0 + 24 * 3600 * S, T0) == 12 * 3600
    # A CA clock 20 s behind ours issues a certificate with 40 s left: refresh in 20 s.
    assert refresh_delay(T0 + 40 * S, T0) == 20.0
    assert refresh_delay(T0 + S, T0) == MIN_REFRESH_DELAY
    assert refresh_delay(T0 - 10 * S, T0) == MIN_REFRESH_DELAY


def test_issued_within_the_tolerated_skew_is_taken():
    assert issued_problem(T0 - CLOCK_SKEW, T0 + 60 * S, T0) is None
    # The CA's clock is 100 s ahead of ours: notBefore is 20 s back, notAfter 160 s on.
    assert issued_problem(T0 - 20 * S, T0 + 160 * S, T0) is None
    # notBefore ahead of us by less than the bound (the CA did not back-date enough).
    assert issued_problem(T0 + 90 * S, T0 + 300 * S, T0) is None
    assert issued_problem(T0 + MAX_CLOCK_SKEW, T0 + 600 * S, T0) is None


def test_issued_beyond_the_bound_or_expired_is_refused_with_the_reason():
    ahead = issued_problem(T0 + MAX_CLOCK_SKEW + S, T0 + 600 * S, T0)
    assert ahead is not None
    assert "not valid until 2026-01-01T12:02:01+00:00, 121 s after" in ahead
    assert "more than the 120 s of clock skew tolerated" in ahead
    expired = issued_problem(T0 - 300 * S, T0 - 5 * S, T0)
    assert expired is not None and "expired at 2026-01-01T11:59:55+00:00, 5 s before" in expired
    assert issued_problem(T0 - 300 * S, T0, T0) is not None  # expiring now is expired
    empty = issued_problem(T0, T0, T0 - S)
    assert empty is not None and "validity is empty" in empty


def test_usable_until_not_after():
    assert usable(T0 + S, T0)
    assert not usable(T0, T0)
    assert not usable(T0 - S, T0)


class SkewedCA(InProcessCA):
    """The real CA signing by its own clock, `offset` from ours; it can be told to fail."""

    def __init__(self, clock: list[datetime]) -> None:
        super().__init__()
        self.clock = clock
        self.offset = timedelta(0)
        self.down = False

    async def sign(self, csr_pem: bytes, ttl: timedelta) -> list[bytes]:
        identity = csr_identity(parse_csr(csr_pem))
        self.calls.append(identity)
        if self.down:
            raise CertificateError("cannot reach the CA: connection refused")
        return self.ca.sign_csr(csr_pem, identity, ttl, now=self.clock[0] + self.offset)


def manager(ca: SkewedCA, clock: list[datetime], sleep: FakeSleep) -> CertificateManager:
    return CertificateManager(
        ca, timedelta(seconds=60), clock=lambda: clock[0], sleep=sleep, rand=lambda: 0.5
    )


def test_a_ca_clock_ahead_within_the_bound_is_tolerated(aio):
    async def main() -> None:
        clock = [datetime.now(UTC)]
        ca, sleep = SkewedCA(clock), FakeSleep()
        ca.offset = timedelta(seconds=90)  # back-dating still puts notBefore in our past
        mgr = aio.closing(manager(ca, clock, sleep))
        cert = await mgr.get(ALICE)
        assert cert.not_before < clock[0]
        await sleep.wait_for_calls(1)
        # notAfter is 150 s ahead of our clock: refresh at half of that.
        assert sleep.calls[0] == pytest.approx(75.0, abs=1.0)

    aio.run(main)


def test_a_ca_clock_too_far_ahead_is_refused_and_the_held_certificate_kept(aio):
    async def main() -> None:
        clock = [datetime.now(UTC)]
        ca, sleep = SkewedCA(clock), FakeSleep()
        mgr = aio.closing(manager(ca, clock, sleep))
        first = await mgr.get(ALICE)
        await sleep.wait_for_calls(1)
        ca.offset = timedelta(minutes=5)  # notBefore 3 min ahead of our clock
        clock[0] += timedelta(seconds=30)
        sleep.release()
        await sleep.wait_for_calls(2)
        assert (await mgr.get(ALICE)).serial == first.serial
        assert sleep.calls[1] == 0.5  # a refused certificate is a failed fetch: backoff
        # A new identity gets the reason, not a certificate no peer would accept yet.
        with pytest.raises(CertificateError, match="clock skew tolerated"):
            await mgr.get(SpiffeId("cluster.local", "shop", "bob"))

    aio.run(main)


def test_a_ca_clock_behind_by_more_than_the_lifetime_is_refused(aio):
    async def main() -> None:
        clock = [datetime.now(UTC)]
        ca, sleep = SkewedCA(clock), FakeSleep()
        ca.offset = -timedelta(minutes=5)
        mgr = aio.closing(manager(ca, clock, sleep))
        with pytest.raises(CertificateError, match=r"refused: it expired at .* s before"):
            await mgr.get(ALICE)

    aio.run(main)


def test_outage_keeps_the_certificate_until_expiry_then_fails_closed_and_recovers(aio):
    async def main() -> None:
        clock = [datetime.now(UTC)]
        ca, sleep = SkewedCA(clock), FakeSleep()
        mgr = aio.closing(manager(ca, clock, sleep))
        first = await mgr.get(ALICE)
        await sleep.wait_for_calls(1)
        ca.down = True
        clock[0] += timedelta(seconds=30)  # the half-life refresh fails
        sleep.release()
        await sleep.wait_for_calls(2)
        assert (await mgr.get(ALICE)).serial == first.serial
        # Retries come well before expiry (30 s left), then stop at expiry itself.
        assert sleep.calls[1] == 0.5
        clock[0] = first.not_after - timedelta(seconds=3)
        for n in range(3, 8):
            sleep.release()
            await sleep.wait_for_calls(n)
        assert max(sleep.calls[2:]) <= 3.0  # never sleeps past the held certificate's expiry
        clock[0] = first.not_after + timedelta(seconds=1)
        # Expired: never handed out; the caller learns why at once.
        with pytest.raises(CertificateError, match="connection refused"):
            await asyncio.wait_for(mgr.get(ALICE), 1.0)
        sleep.release()
        await sleep.wait_for_calls(8)
        assert sleep.calls[7] <= BACKOFF_MAX_WAITING  # nothing held: the short cap
        ca.down = False
        sleep.release()
        await sleep.wait_for_calls(9)
        again = await mgr.get(ALICE)
        assert again.serial != first.serial and again.not_after > clock[0]

    aio.run(main)
