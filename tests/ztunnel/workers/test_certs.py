"""A worker's certificates come from its owner: asked once per identity, rotations passed
on, a refusal or silence a CertificateError."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from meshcore.identity.certs import CertificateError, WorkloadCertificate
from meshcore.identity.spiffe import SpiffeId
from tests.support.aio import Loop
from ztunnel.workers import codec
from ztunnel.workers.certs import RemoteCertificates, from_message, to_message

ID = SpiffeId.parse("spiffe://cluster.local/ns/a/sa/b")


def cert(serial: int, hours: int = 1) -> WorkloadCertificate:
    now = datetime.now(UTC).replace(microsecond=0)
    return WorkloadCertificate(
        ID, b"KEY", [b"LEAF", b"ROOT"], b"ROOT", serial, now, now + timedelta(hours=hours)
    )


def test_a_certificate_survives_the_wire() -> None:
    c = cert(2**150)
    assert from_message(to_message(c)) == c
    bad = codec.Cert("not a spiffe id", b"", (), b"", "1", 0.0, 0.0)
    with pytest.raises(CertificateError, match="unusable certificate"):
        from_message(bad)


def test_asked_once_then_answered_and_rotated(aio: Loop) -> None:
    async def main() -> None:
        asked: list[SpiffeId] = []
        certs = RemoteCertificates(asked.append)
        rotated: list[WorkloadCertificate] = []
        certs.on_update(rotated.append)
        first = [asyncio.ensure_future(certs.get(ID)) for _ in range(2)]
        await asyncio.sleep(0)
        assert asked == [ID]
        certs.deliver(cert(1))
        assert [(await f).serial for f in first] == [1, 1]
        assert rotated == []
        certs.deliver(cert(2))
        assert [c.serial for c in rotated] == [2]
        assert (await certs.get(ID)).serial == 2
        assert asked == [ID]

    aio.run(main())


def test_a_refusal_or_silence_is_an_error(aio: Loop) -> None:
    async def main() -> None:
        certs = RemoteCertificates(lambda _: None, timeout=0.05)
        pending = asyncio.ensure_future(certs.get(ID))
        await asyncio.sleep(0)
        certs.failed(ID, "CA away")
        with pytest.raises(CertificateError, match="CA away"):
            await pending
        with pytest.raises(CertificateError, match="sent no certificate"):
            await certs.get(ID)

    aio.run(main())
