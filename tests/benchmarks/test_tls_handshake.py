"""benchmarks/tls_handshake.py: each variant completes real mutual-TLS handshakes with the
mesh's contexts and reports a cost for each side; a client from another CA fails the
handshake instead of being counted."""

from __future__ import annotations

import asyncio
import ssl
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import tls_handshake as th

from meshcore import tls
from meshcore.identity.certs import CertificateManager
from tests.support.certs import InProcessCA, SendsRoot


def test_every_variant_measures_both_sides() -> None:
    got = th.run(handshakes=3, rounds=1)
    assert set(got) == set(th.VARIANTS)
    for row in got.values():
        assert row["client_us"] > 0 and row["server_us"] > 0  # type: ignore[operator]


def test_the_whole_chain_variant_sends_the_root_too() -> None:
    client, _ = asyncio.run(th.certificates())
    assert client.chain_without_root_pem.count(b"BEGIN CERTIFICATE") == 1  # as run: the leaf
    whole = SendsRoot(client)
    assert whole.chain_without_root_pem.count(b"BEGIN CERTIFICATE") == len(client.chain_pem) == 2
    assert whole.key_pem == client.key_pem


def test_a_client_of_another_ca_fails_the_handshake() -> None:
    async def stranger() -> object:
        certs = CertificateManager(InProcessCA())
        try:
            return await certs.get(th.CLIENT)
        finally:
            await certs.close()

    _, server = asyncio.run(th.certificates())
    other = asyncio.run(stranger())
    with pytest.raises(ssl.SSLError):
        th.handshake(tls.client_context(other), tls.server_context(server))  # type: ignore[arg-type]
