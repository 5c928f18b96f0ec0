"""The discovery server's TLS: a certificate from the mesh CA for istiod.

The leaf names istiod both ways, as upstream's does: the SPIFFE URI SAN
(spiffe://<trust domain>/ns/istio-system/sa/istiod), which our tunnels and waypoints check,
and the DNS name istiod.istio-system.svc, which gRPC clients (upstream's included) check.
Plaintext is refused except on a loopback address.
"""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from controlplane.ca import CLOCK_SKEW, CertificateAuthority
from meshcore.identity.spiffe import SpiffeId

XDS_NAMESPACE = "istio-system"
XDS_SERVICE_ACCOUNT = "istiod"
XDS_DNS_NAME = "istiod.istio-system.svc"


class XdsTlsError(ValueError):
    """The server cannot listen as asked; the message says why."""


def server_identity(trust_domain: str) -> SpiffeId:
    return SpiffeId(trust_domain, XDS_NAMESPACE, XDS_SERVICE_ACCOUNT)


def server_certificate(
    ca: CertificateAuthority, ttl: timedelta = timedelta(days=7)
) -> tuple[bytes, bytes]:
    """(private key PEM, chain PEM leaf first) for the discovery server."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    identity = server_identity(ca.trust_domain)
    root_ski = ca.root_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca.root_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + ttl)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(str(identity)), x509.DNSName(XDS_DNS_NAME)]
            ),
            critical=True,  # RFC 5280 4.2.1.6: an empty subject makes the SAN critical
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(root_ski.value),
            critical=False,
        )
        .sign(ca.root_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, leaf.public_bytes(serialization.Encoding.PEM) + ca.roots_pem()


def server_credentials(ca: CertificateAuthority, ttl: timedelta = timedelta(days=7)) -> Any:
    """gRPC server credentials with a fresh key and a leaf signed by `ca` for istiod."""
    return grpc.ssl_server_credentials([server_certificate(ca, ttl)])


def bind(server: Any, address: str, credentials: Any | None) -> int:
    """Listen on `address` ("host:port", port 0 for any); returns the port. Without
    credentials only a loopback host is accepted: discovery is never sent in plaintext."""
    host, _, _ = address.rpartition(":")
    if address.startswith("unix:"):
        # A unix socket: reachable from other network namespaces through the file system,
        # so it is served with TLS like a TCP port (plaintext only for loopback TCP tests).
        if credentials is None:
            raise XdsTlsError(f"refusing to serve discovery in plaintext on {address}")
        if not server.add_secure_port(address, credentials):
            raise XdsTlsError(f"cannot listen on {address}")
        return 0
    if credentials is None:
        try:
            loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
        except ValueError:
            loopback = host == "localhost"
        if not loopback:
            raise XdsTlsError(f"refusing to serve discovery in plaintext on {address}")
        port: int = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise XdsTlsError(f"cannot listen on {address}")
    return port
