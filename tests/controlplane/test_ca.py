"""The built-in CA: root persistence, leaf profile, and what it refuses to sign."""

from __future__ import annotations

import base64
import os
import re
import stat
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from controlplane.ca import CAError, CertificateAuthority
from meshcore.identity.certs import new_key_and_csr
from meshcore.identity.spiffe import SpiffeId

TD = "cluster.local"
ALICE = SpiffeId(TD, "shop", "alice")
BOB = SpiffeId(TD, "shop", "bob")


def make_csr(key, sans, critical=False) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=critical)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create(TD)


def test_root_is_created_private_and_reused(tmp_path):
    ca1 = CertificateAuthority.load_or_create(tmp_path, TD)
    key_path = tmp_path / "ca" / "root-key.pem"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "ca").stat().st_mode) == 0o700
    assert (tmp_path / "ca" / "root-cert.pem").read_bytes() == ca1.roots_pem()
    bc = ca1.root_cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical
    assert bc.value.ca
    ku = ca1.root_cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical
    assert ku.value.key_cert_sign
    assert ku.value.crl_sign
    ca1.root_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)

    ca2 = CertificateAuthority.load_or_create(tmp_path, TD)
    assert ca2.roots_pem() == ca1.roots_pem()
    assert ca2.root_key.private_numbers() == ca1.root_key.private_numbers()
    assert not [p for p in (tmp_path / "ca").iterdir() if p.name.endswith(".tmp")]


def test_corrupt_key_is_a_clear_error(tmp_path):
    CertificateAuthority.load_or_create(tmp_path, TD)
    (tmp_path / "ca" / "root-key.pem").write_text("garbage")
    with pytest.raises(
        CAError, match=re.escape("root-key.pem is not an unencrypted PEM private key")
    ):
        CertificateAuthority.load_or_create(tmp_path, TD)


def test_wrong_key_type_is_a_clear_error(tmp_path):
    CertificateAuthority.load_or_create(tmp_path, TD)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "ca" / "root-key.pem").write_bytes(
        rsa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(CAError, match="expected an EC P-256 key"):
        CertificateAuthority.load_or_create(tmp_path, TD)


def test_missing_half_and_other_trust_domain_are_refused(tmp_path):
    CertificateAuthority.load_or_create(tmp_path, TD)
    with pytest.raises(CAError, match=re.escape("created for trust domain 'cluster.local'")):
        CertificateAuthority.load_or_create(tmp_path, "other.example")
    (tmp_path / "ca" / "root-cert.pem").unlink()
    with pytest.raises(CAError, match=re.escape("root-cert.pem is missing")):
        CertificateAuthority.load_or_create(tmp_path, TD)


def test_leaf_profile_and_chain_validates(ca):
    _, csr = new_key_and_csr(ALICE)
    before = datetime.now(UTC)
    chain = ca.sign_csr(csr, ALICE, timedelta(hours=2))
    assert len(chain) == 2
    assert chain[1] == ca.roots_pem()
    leaf = x509.load_pem_x509_certificate(chain[0])

    assert leaf.subject == x509.Name([])
    assert not leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [str(ALICE)]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical
    assert ku.value.digital_signature
    assert ku.value.key_encipherment
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.root_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert 0 < leaf.serial_number < 2**128
    assert leaf.not_valid_before_utc <= before - timedelta(seconds=59)
    lifetime = leaf.not_valid_after_utc - before
    assert timedelta(hours=2) - timedelta(seconds=5) <= lifetime <= timedelta(hours=2)

    verifier = PolicyBuilder().store(Store([ca.root_cert])).build_client_verifier()
    verified = verifier.verify(leaf, [])
    assert [str(s.value) for s in verified.subjects or []] == [str(ALICE)]

    other = CertificateAuthority.create(TD)
    with pytest.raises(VerificationError):
        PolicyBuilder().store(Store([other.root_cert])).build_client_verifier().verify(leaf, [])


def test_serials_are_random(ca):
    serials = set()
    for _ in range(5):
        _, csr = new_key_and_csr(ALICE)
        serials.add(x509.load_pem_x509_certificate(ca.sign_csr(csr, ALICE)[0]).serial_number)
    assert len(serials) == 5


@pytest.mark.parametrize(
    ("csr_factory", "message"),
    [
        (lambda: new_key_and_csr(BOB)[1], "CSR asks for spiffe://cluster.local/ns/shop/sa/bob"),
        (
            lambda: make_csr(
                rsa.generate_private_key(public_exponent=65537, key_size=2048),
                [x509.UniformResourceIdentifier(str(ALICE))],
            ),
            "only EC P-256",
        ),
        (
            lambda: make_csr(
                ec.generate_private_key(ec.SECP384R1()),
                [x509.UniformResourceIdentifier(str(ALICE))],
            ),
            "only EC P-256",
        ),
        (
            lambda: make_csr(
                ec.generate_private_key(ec.SECP256R1()),
                [
                    x509.UniformResourceIdentifier(str(ALICE)),
                    x509.UniformResourceIdentifier(str(BOB)),
                ],
            ),
            "exactly one SAN",
        ),
        (
            lambda: make_csr(
                ec.generate_private_key(ec.SECP256R1()),
                [x509.UniformResourceIdentifier(str(ALICE)), x509.DNSName("alice.shop")],
            ),
            "exactly one SAN",
        ),
        (lambda: make_csr(ec.generate_private_key(ec.SECP256R1()), []), "no subjectAltName"),
        (
            lambda: make_csr(
                ec.generate_private_key(ec.SECP256R1()),
                [x509.UniformResourceIdentifier("https://alice.example")],
            ),
            "not a SPIFFE identity",
        ),
        (lambda: b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n", "not a PEM"),
        (lambda: b"", "not a PEM"),
    ],
    ids=[
        "wrong-san",
        "rsa",
        "p384",
        "two-sans",
        "extra-dns",
        "no-san",
        "not-spiffe",
        "junk",
        "empty",
    ],
)
def test_bad_csrs_are_refused(ca, csr_factory, message):
    with pytest.raises(CAError, match=message):
        ca.sign_csr(csr_factory(), ALICE)


def test_tampered_csr_signature_is_refused(ca):
    _, good = new_key_and_csr(ALICE)
    der = bytearray(x509.load_pem_x509_csr(good).public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01  # inside the signature value
    pem = (
        b"-----BEGIN CERTIFICATE REQUEST-----\n"
        + base64.encodebytes(bytes(der))
        + b"-----END CERTIFICATE REQUEST-----\n"
    )
    with pytest.raises(CAError, match="signature"):
        ca.sign_csr(pem, ALICE)


def test_ttl_bounds_and_foreign_trust_domain(ca):
    _, csr = new_key_and_csr(ALICE)
    with pytest.raises(CAError, match="out of range"):
        ca.sign_csr(csr, ALICE, timedelta(0))
    with pytest.raises(CAError, match="out of range"):
        ca.sign_csr(csr, ALICE, timedelta(days=7, seconds=1))
    ca.sign_csr(csr, ALICE, timedelta(days=7))
    foreign = SpiffeId("other.example", "shop", "alice")
    _, csr = new_key_and_csr(foreign)
    with pytest.raises(CAError, match=re.escape("signs only trust domain 'cluster.local'")):
        ca.sign_csr(csr, foreign)


def test_key_file_permissions_ignore_umask(tmp_path):
    old = os.umask(0)
    try:
        CertificateAuthority.load_or_create(tmp_path, TD)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "ca" / "root-key.pem").stat().st_mode) == 0o600
