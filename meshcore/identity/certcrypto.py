"""Key, CSR and certificate-chain operations with `cryptography`.

The tunnel process never imports this module: `cryptography` costs it about 10 MB of
resident memory for work done once per identity and half-life. The tunnel asks a
short-lived child process (`meshcore.identity.certworker`) instead; tools and tests that want the
operations in process use the wrappers in `meshcore.identity.certs`.

Plain values in and out (identities as URI strings, PEM bytes, `LeafFacts`), so the child
can serve them without importing the tunnel's own modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec


class ChainError(Exception):
    """The CA's answer is not a usable chain for our key and identity (the message says why)."""


@dataclass(frozen=True, slots=True)
class LeafFacts:
    """What the tunnel keeps from a checked leaf certificate."""

    serial: int
    not_before: datetime  # UTC, timezone-aware
    not_after: datetime


@dataclass(frozen=True, slots=True)
class KeyAndCsr:
    key_pem: bytes  # PKCS#8, unencrypted
    public_key_pem: bytes  # SubjectPublicKeyInfo: what the chain check compares the leaf to
    csr_pem: bytes


def new_key_and_csr(identity: str) -> KeyAndCsr:
    """A fresh EC P-256 key and a SHA-256 CSR whose only name is the URI SAN `identity`."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return KeyAndCsr(key_pem, public_pem, csr.public_bytes(serialization.Encoding.PEM))


def public_key_pem(key_pem: bytes) -> bytes:
    """The public half (SubjectPublicKeyInfo PEM) of an unencrypted private key PEM."""
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:
        raise ChainError(f"the private key cannot be read: {e}") from e
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def check_chain(identity: str, public_key_pem: bytes, chain_pem: list[bytes]) -> LeafFacts:
    """Check that the CA's answer is a chain for our key and identity; the leaf's facts.

    Given the public key, not the private one: the private key need not travel again."""
    if len(chain_pem) < 2:
        raise ChainError(
            f"CA returned {len(chain_pem)} certificate(s) for {identity}; "
            "expected the leaf and at least the root"
        )
    try:
        leaf = x509.load_pem_x509_certificate(chain_pem[0])
        for pem in chain_pem[1:]:
            x509.load_pem_x509_certificate(pem)
    except ValueError as e:
        raise ChainError(f"CA returned an unreadable certificate for {identity}: {e}") from e
    try:
        ours = serialization.load_pem_public_key(public_key_pem)
    except (ValueError, TypeError) as e:
        raise ChainError(f"the public key for {identity} cannot be read: {e}") from e
    if leaf.public_key() != ours:
        raise ChainError(f"CA returned a leaf for another key when asked for {identity}")
    uris = _uri_sans(leaf)
    if uris != [identity]:
        raise ChainError(f"CA returned a leaf for {uris}, asked for {identity}")
    return LeafFacts(leaf.serial_number, leaf.not_valid_before_utc, leaf.not_valid_after_utc)


def _uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(v) for v in san.get_values_for_type(x509.UniformResourceIdentifier)]


def csr_uri(csr_pem: bytes) -> str:
    """The one URI SAN of a CSR (the identity it asks for), or a `ChainError`."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound) as e:
        raise ChainError(f"the CSR names no identity: {e}") from e
    uris = [str(v) for v in san.get_values_for_type(x509.UniformResourceIdentifier)]
    if len(uris) != 1:
        raise ChainError(f"the CSR names {len(uris)} URIs, expected one")
    return uris[0]
