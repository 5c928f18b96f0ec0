"""The tunnel's certificate manager, driven by a fake clock and sleep against a real CA."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from controlplane.ca import CLOCK_SKEW, CertificateAuthority
from meshcore.identity.certs import (
    CertificateError,
    CertificateManager,
    WorkloadCertificate,
    build_certificate,
    new_key_and_csr,
)
from meshcore.identity.spiffe import SpiffeId
from tests.support.certs import InProcessCA

TD = "cluster.local"
ALICE = SpiffeId(TD, "shop", "alice")
BOB = SpiffeId(TD, "shop", "bob")


class CAClient(InProcessCA):
    """The in-memory CA; can be told to fail or to wait for a gate."""

    def __init__(self) -> None:
        super().__init__()
        self.failures_left = 0
        self.gate: asyncio.Event | None = None

    async def before_signing(self, identity: SpiffeId) -> None:
        if self.gate is not None:
            await self.gate.wait()
        if self.failures_left:
            self.failures_left -= 1
            raise CertificateError("CA refused (503): try later")


class FakeSleep:
    """Records each requested delay and blocks until the test releases it."""

    def __init__(self) -> None:
        self.calls: list[float] = []
        self._blocked: list[asyncio.Future[None]] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._blocked.append(fut)
        await fut

    async def wait_for_calls(self, n: int) -> None:
        for _ in range(5000):
            if len(self.calls) >= n:
                return
            await asyncio.sleep(0.001)
        raise AssertionError(f"expected {n} sleeps, saw {self.calls}")

    def release(self) -> None:
        self._blocked.pop(0).set_result(None)


def test_fetch_builds_a_consistent_certificate(aio):
    async def main() -> None:
        client, sleep = CAClient(), FakeSleep()
        mgr = aio.closing(CertificateManager(client, timedelta(hours=4), sleep=sleep))
        cert = await mgr.get(ALICE)
        assert cert.identity == ALICE
        assert cert.roots_pem == client.ca.roots_pem()
        assert cert.chain_pem[-1] == client.ca.roots_pem()
        leaf = x509.load_pem_x509_certificate(cert.chain_pem[0])
        key = serialization.load_pem_private_key(cert.key_pem, password=None)
        assert leaf.public_key() == key.public_key()
        assert leaf.serial_number == cert.serial
        assert cert.not_after - cert.not_before == timedelta(hours=4) + CLOCK_SKEW
        # The whole chain, root included (so OpenSSL does not rebuild it per handshake).
        assert cert.presented_chain_pem == cert.chain_pem[0] + cert.chain_pem[1]
        assert await mgr.get(ALICE) is cert
        assert client.calls == [ALICE]
        assert mgr.snapshot() == [cert]

    aio.run(main)


def test_csr_has_the_uri_san_only():
    key_pem, csr_pem = new_key_and_csr(ALICE)
    csr = x509.load_pem_x509_csr(csr_pem)
    assert csr.subject == x509.Name([])
    assert csr.is_signature_valid
    assert csr.signature_hash_algorithm is not None
    assert csr.signature_hash_algorithm.name == "sha256"
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [n.value for n in san] == [str(ALICE)]
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert key.public_key() == csr.public_key()
    assert new_key_and_csr(ALICE)[0] != key_pem  # a fresh key each time


def test_concurrent_callers_share_one_request(aio):
    async def main() -> None:
        client = CAClient()
        client.gate = asyncio.Event()
        mgr = aio.closing(CertificateManager(client, sleep=FakeSleep()))
        getters = [asyncio.create_task(mgr.get(ALICE)) for _ in range(10)]
        await asyncio.sleep(0.01)
        assert not any(t.done() for t in getters)
        client.gate.set()
        certs = await asyncio.gather(*getters)
        assert len({c.serial for c in certs}) == 1
        assert client.calls == [ALICE]

    aio.run(main)


def test_one_caller_cancelled_does_not_cancel_the_shared_fetch(aio):
    async def main() -> None:
        client = CAClient()
        client.gate = asyncio.Event()
        mgr = aio.closing(CertificateManager(client, sleep=FakeSleep()))
        first, second = asyncio.create_task(mgr.get(ALICE)), asyncio.create_task(mgr.get(ALICE))
        await asyncio.sleep(0.01)
        first.cancel()
        client.gate.set()
        assert (await second).identity == ALICE
        assert client.calls == [ALICE]

    aio.run(main)


def test_refresh_at_half_life_notifies_listeners(aio):
    async def main() -> None:
        now = datetime.now(UTC)
        client, sleep = CAClient(), FakeSleep()
        mgr = aio.closing(
            CertificateManager(client, timedelta(hours=24), clock=lambda: now, sleep=sleep)
        )
        updates: list[WorkloadCertificate] = []
        mgr.on_update(updates.append)
        first = await mgr.get(ALICE)
        await sleep.wait_for_calls(1)
        # Half of the lifetime left by our clock (the back-dated notBefore does not count).
        expected = (first.not_after - now).total_seconds() / 2
        assert sleep.calls[0] == pytest.approx(expected)
        assert 12 * 3600 - 5 < sleep.calls[0] < 12 * 3600 + 5

        sleep.release()
        await sleep.wait_for_calls(2)
        second = await mgr.get(ALICE)
        assert second.serial != first.serial
        assert second.key_pem != first.key_pem
        assert [u.serial for u in updates] == [first.serial, second.serial]
        assert client.calls == [ALICE, ALICE]

    aio.run(main)


def test_failed_refresh_backs_off_and_keeps_the_old_certificate(aio):
    async def main() -> None:
        client, sleep = CAClient(), FakeSleep()
        mgr = aio.closing(CertificateManager(client, sleep=sleep, rand=lambda: 0.5))
        first = await mgr.get(ALICE)
        await sleep.wait_for_calls(1)
        client.failures_left = 4
        for n in range(2, 6):  # four failed refreshes
            sleep.release()
            await sleep.wait_for_calls(n)
            assert (await mgr.get(ALICE)).serial == first.serial
        assert sleep.calls[1:] == [0.5, 1.0, 2.0, 4.0]
        sleep.release()  # the next attempt succeeds
        await sleep.wait_for_calls(6)
        assert (await mgr.get(ALICE)).serial != first.serial
        assert sleep.calls[5] > 3600  # back to the half-life schedule

    aio.run(main)


def test_first_fetch_failure_is_reported_then_retried(aio):
    async def main() -> None:
        client, sleep = CAClient(), FakeSleep()
        client.failures_left = 1
        mgr = aio.closing(CertificateManager(client, sleep=sleep))
        with pytest.raises(CertificateError, match="try later"):
            await mgr.get(ALICE)
        await sleep.wait_for_calls(1)
        # During the backoff a caller learns the last error at once, without waiting.
        with pytest.raises(CertificateError, match="try later"):
            await asyncio.wait_for(mgr.get(ALICE), 0.5)
        assert mgr.snapshot() == []
        client.gate = asyncio.Event()  # hold the retry in flight
        sleep.release()
        for _ in range(1000):
            if len(client.calls) == 2:
                break
            await asyncio.sleep(0.001)
        retry = asyncio.create_task(mgr.get(ALICE))  # waits for the attempt in flight
        await asyncio.sleep(0.01)
        assert not retry.done()
        client.gate.set()
        assert (await retry).identity == ALICE
        assert len(client.calls) == 2

    aio.run(main)


def test_prefetch_forget_and_close(aio):
    async def main() -> None:
        client, sleep = CAClient(), FakeSleep()
        mgr = aio.closing(CertificateManager(client, sleep=sleep))
        mgr.prefetch(ALICE)
        mgr.prefetch(BOB)
        await sleep.wait_for_calls(2)
        assert sorted(client.calls) == [ALICE, BOB]
        assert [c.identity for c in mgr.snapshot()] == [ALICE, BOB]

        mgr.forget(BOB)
        assert [c.identity for c in mgr.snapshot()] == [ALICE]
        await mgr.get(BOB)  # a forgotten identity is fetched afresh
        assert client.calls.count(BOB) == 2

        client.gate = asyncio.Event()
        waiting = asyncio.create_task(mgr.get(SpiffeId(TD, "shop", "carol")))
        await asyncio.sleep(0.01)
        await mgr.close()
        with pytest.raises(CertificateError, match="closed"):
            await waiting
        with pytest.raises(CertificateError, match="closed"):
            await mgr.get(ALICE)

    aio.run(main)


def test_real_time_refresh_with_a_short_lifetime(aio):
    # No fakes: a 1 s certificate has 0.5 s to its refresh; the manager must still pace
    # refreshes (MIN_REFRESH_DELAY), not spin.
    async def main() -> None:
        client = CAClient()
        mgr = aio.closing(CertificateManager(client, timedelta(seconds=1)))
        seen: list[int] = []
        mgr.on_update(lambda c: seen.append(c.serial))
        await mgr.get(ALICE)
        await asyncio.sleep(1.5)
        await mgr.close()
        assert 2 <= len(seen) <= 3
        assert len(set(seen)) == len(seen)

    aio.run(main)


def test_a_chain_for_another_identity_or_key_is_rejected():
    ca = CertificateAuthority.create(TD)
    key_pem, csr_pem = new_key_and_csr(ALICE)
    chain = ca.sign_csr(csr_pem, ALICE)
    assert build_certificate(ALICE, key_pem, chain).identity == ALICE
    with pytest.raises(CertificateError, match="asked for"):
        build_certificate(BOB, key_pem, chain)
    other_key, _ = new_key_and_csr(ALICE)
    with pytest.raises(CertificateError, match="another key"):
        build_certificate(ALICE, other_key, chain)
    with pytest.raises(CertificateError, match="expected the leaf"):
        build_certificate(ALICE, key_pem, chain[:1])
