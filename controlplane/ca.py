"""The mesh's built-in certificate authority: one self-signed root that signs SPIFFE leaves.

Invariants:
- The root is ECDSA P-256, lives in `<state_dir>/ca/` (directory 0700, key 0600) and is
  reused across restarts; a missing, corrupt or mismatched file is a `CAError`, never a
  silently new root (a new root would make every issued certificate untrusted).
- A leaf is issued only for a CSR that parses, is self-signed correctly, carries an EC
  P-256 key and exactly one SAN: a URI equal to the identity being issued, inside this
  CA's trust domain. The leaf has an empty subject, so its SAN extension is critical.
- Only `load_or_create` touches the file system; signing is pure computation.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshcore.identity.spiffe import IdentityError, SpiffeId

ROOT_VALIDITY = timedelta(days=3650)
DEFAULT_LEAF_TTL = timedelta(hours=24)
MAX_LEAF_TTL = timedelta(days=7)
# notBefore is back-dated by this much: peers whose clocks run up to this far behind the
# CA's still accept a certificate issued "now" (Istio's CA back-dates by the same two
# minutes; meshcore.identity.lifetime.MAX_CLOCK_SKEW is the bound the tunnels tolerate).
CLOCK_SKEW = timedelta(minutes=2)

CA_DIR = "ca"
ROOT_KEY_FILE = "root-key.pem"
ROOT_CERT_FILE = "root-cert.pem"


class CAError(Exception):
    """The CA cannot load its root, or refuses a request; the message says what to check."""


# What a CA certificate may sign: certificates and CRLs, nothing else.
CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


@dataclass(frozen=True, slots=True)
class CertificateAuthority:
    trust_domain: str
    root_key: ec.EllipticCurvePrivateKey
    root_cert: x509.Certificate

    @classmethod
    def create(cls, trust_domain: str, now: datetime | None = None) -> CertificateAuthority:
        """A fresh root in memory (tests, and the first start of `load_or_create`)."""
        _check_trust_domain(trust_domain)
        now = now or datetime.now(UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
                x509.NameAttribute(NameOID.COMMON_NAME, f"{trust_domain} mesh root CA"),
            ]
        )
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(_random_serial())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + ROOT_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(CA_KEY_USAGE, critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(trust_domain, key, cert)

    @classmethod
    def load_or_create(cls, state_dir: Path, trust_domain: str) -> CertificateAuthority:
        """Reuse the root in `state_dir/ca/`, or create and store one if neither file exists."""
        _check_trust_domain(trust_domain)
        ca_dir = Path(state_dir) / CA_DIR
        key_path, cert_path = ca_dir / ROOT_KEY_FILE, ca_dir / ROOT_CERT_FILE
        have_key, have_cert = key_path.exists(), cert_path.exists()
        if not have_key and not have_cert:
            ca = cls.create(trust_domain)
            ca_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(ca_dir, 0o700)  # mkdir's mode is masked by the umask; be explicit
            _write_private(cert_path, ca.roots_pem(), 0o644)
            key_pem = ca.root_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            _write_private(key_path, key_pem, 0o600)
            return ca
        if have_key != have_cert:
            missing = cert_path if not have_cert else key_path
            raise CAError(
                f"CA state is incomplete: {missing} is missing. Restore it, or delete "
                f"{ca_dir} to create a new root (every issued certificate becomes untrusted)"
            )
        return cls._load(key_path, cert_path, trust_domain)

    @classmethod
    def _load(cls, key_path: Path, cert_path: Path, trust_domain: str) -> CertificateAuthority:
        return cls.from_pem(
            key_path.read_bytes(),
            cert_path.read_bytes(),
            trust_domain,
            str(key_path),
            str(cert_path),
        )

    @classmethod
    def from_pem(
        cls,
        key_pem: bytes,
        cert_pem: bytes,
        trust_domain: str,
        key_source: str = "the CA key",
        cert_source: str = "the CA certificate",
    ) -> CertificateAuthority:
        """A stored root (files, or a Kubernetes Secret); every defect is a `CAError` that
        names its source, never a silently new root."""
        _check_trust_domain(trust_domain)
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as e:
            raise CAError(
                f"{key_source} is not an unencrypted PEM private key ({e}); restore it"
            ) from e
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
            raise CAError(f"{key_source} holds a {type(key).__name__}, expected an EC P-256 key")
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except ValueError as e:
            raise CAError(f"{cert_source} is not a PEM certificate ({e}); restore it") from e
        if cert.public_key() != key.public_key():
            raise CAError(f"{cert_source} does not belong to the key in {key_source}")
        try:
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            bc = None
        if bc is None or not bc.ca:
            raise CAError(f"{cert_source} is not a CA certificate (basicConstraints CA:true)")
        orgs = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
        stored_domain = str(orgs[0].value) if orgs else ""
        if stored_domain != trust_domain:
            raise CAError(
                f"the CA in {cert_source} was created for trust domain "
                f"{stored_domain!r}, not {trust_domain!r}; pass the right trust domain or "
                f"use another CA store"
            )
        return cls(trust_domain, key, cert)

    def key_pem(self) -> bytes:
        return self.root_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def roots_pem(self) -> bytes:
        return self.root_cert.public_bytes(serialization.Encoding.PEM)

    def sign_csr(
        self,
        csr_pem: bytes,
        identity: SpiffeId,
        ttl: timedelta = DEFAULT_LEAF_TTL,
        now: datetime | None = None,
    ) -> list[bytes]:
        """Issue a leaf for `identity`; returns PEMs leaf first, root last."""
        if not timedelta(0) < ttl <= MAX_LEAF_TTL:
            raise CAError(f"certificate lifetime {ttl} is out of range (0, {MAX_LEAF_TTL}]")
        if identity.trust_domain != self.trust_domain:
            raise CAError(f"this CA signs only trust domain {self.trust_domain!r}, not {identity}")
        csr = parse_csr(csr_pem)
        requested = csr_identity(csr)
        if requested != identity:
            raise CAError(f"CSR asks for {requested}, but {identity} is being issued")
        now = now or datetime.now(UTC)
        root_ski = self.root_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.root_cert.subject)
            .public_key(csr.public_key())
            .serial_number(_random_serial())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + ttl)
            # RFC 5280 4.2.1.6: with an empty subject the SAN extension must be critical.
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(identity))]),
                critical=True,
            )
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=True,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(root_ski.value),
                critical=False,
            )
            .sign(self.root_key, hashes.SHA256())
        )
        return [leaf.public_bytes(serialization.Encoding.PEM), self.roots_pem()]


def parse_csr(csr_pem: bytes) -> x509.CertificateSigningRequest:
    """A CSR whose signature is valid and whose key is EC P-256, or a `CAError`."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as e:
        raise CAError(f"CSR is not a PEM certificate request: {e}") from e
    try:
        valid = csr.is_signature_valid
    except (ValueError, InvalidSignature) as e:
        raise CAError(f"CSR signature cannot be checked: {e}") from e
    if not valid:
        raise CAError("CSR signature is invalid (the request was not signed by its own key)")
    try:
        key = csr.public_key()
    except ValueError as e:
        raise CAError(f"CSR public key cannot be read: {e}") from e
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise CAError(f"CSR key is {type(key).__name__}; only EC P-256 keys are signed")
    return csr


def csr_identity(csr: x509.CertificateSigningRequest) -> SpiffeId:
    """The one SPIFFE identity the CSR asks for: exactly one SAN, a URI, nothing else."""
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise CAError("CSR has no subjectAltName; it must carry one SPIFFE URI SAN") from None
    except ValueError as e:
        raise CAError(f"CSR extensions cannot be parsed: {e}") from e
    names = list(san)
    if len(names) != 1 or not isinstance(names[0], x509.UniformResourceIdentifier):
        raise CAError(
            f"CSR must carry exactly one SAN, a SPIFFE URI; it has {len(names)}: "
            + ", ".join(repr(n.value) for n in names)
        )
    try:
        return SpiffeId.parse(names[0].value)
    except IdentityError as e:
        raise CAError(f"CSR URI SAN is not a SPIFFE identity: {e}") from e


def _check_trust_domain(trust_domain: str) -> None:
    # Reuse SpiffeId's component rules so the CA never holds a domain it could not issue.
    try:
        SpiffeId(trust_domain, "ns", "sa")
    except IdentityError as e:
        raise CAError(f"invalid trust domain {trust_domain!r}") from e


def _random_serial() -> int:
    # 128 random bits (RFC 5280 wants a positive serial of at most 20 octets).
    while True:
        serial = secrets.randbits(128)
        if serial:
            return serial


def _write_private(path: Path, data: bytes, mode: int) -> None:
    """Write atomically: a reader sees the old file or the whole new one, with `mode`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # os.open's mode is masked by the umask
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
