"""The project's CA held in memory: certificates for tests without a CA process or socket."""

from __future__ import annotations

import contextlib
import ssl
from dataclasses import dataclass
from datetime import timedelta

from controlplane.ca import CertificateAuthority, csr_identity, parse_csr
from meshcore.identity.certs import WorkloadCertificate, build_certificate, new_key_and_csr
from meshcore.identity.spiffe import SpiffeId
from tests.support.mesh import TRUST_DOMAIN


def issue(
    ca: CertificateAuthority, identity: SpiffeId, ttl: timedelta = timedelta(hours=1)
) -> WorkloadCertificate:
    """A fresh key and a certificate for `identity` signed by `ca`, checked as the tunnel
    checks what its CA returns."""
    key_pem, csr_pem = new_key_and_csr(identity)
    return build_certificate(identity, key_pem, ca.sign_csr(csr_pem, identity, ttl))


class InProcessCA:
    """The real CA, signing in this process: a `CertificateClient` for the certificate
    manager without the CA's socket (tests/controlplane covers that)."""

    def __init__(self, trust_domain: str = TRUST_DOMAIN) -> None:
        self.ca = CertificateAuthority.create(trust_domain)
        self.calls: list[SpiffeId] = []

    async def sign(self, csr_pem: bytes, ttl: timedelta) -> list[bytes]:
        identity = csr_identity(parse_csr(csr_pem))
        self.calls.append(identity)
        await self.before_signing(identity)
        return self.ca.sign_csr(csr_pem, identity, ttl)

    async def before_signing(self, identity: SpiffeId) -> None:
        """Where a test holds or fails a request (nothing here)."""


def client_hello() -> bytes:
    """The first flight of a real TLS client: a ClientHello, as bytes (cut it short to
    leave a server's handshake waiting)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


@dataclass(frozen=True, slots=True)
class SendsRoot:
    """A certificate whose TLS context (meshcore.tls) sends its whole chain, root included,
    as the contexts did before they left the root out: for comparisons."""

    cert: WorkloadCertificate

    def __getattr__(self, name: str) -> object:
        return getattr(self.cert, name)

    @property
    def chain_without_root_pem(self) -> bytes:
        return self.cert.presented_chain_pem
