"""The gRPC CA's serving certificate, from the mesh CA itself.

Clients verify it against the mesh root they were given (upstream's CA_ADDRESS +
ROOT_CA), so the leaf names the server every way a client may dial it: the DNS name
istiod.istio-system.svc (upstream's address), the SPIFFE id of istiod, and the IP
addresses it listens on (127.0.0.1 in tests and the local cluster).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from controlplane.ca import CLOCK_SKEW, CertificateAuthority
from meshcore.identity.spiffe import SpiffeId

ISTIOD_DNS_NAME = "istiod.istio-system.svc"
ISTIOD_NAMESPACE = "istio-system"
ISTIOD_SERVICE_ACCOUNT = "istiod"
SERVING_TTL = timedelta(days=7)


def service_dns_names(namespace: str, domain: str = "cluster.local") -> tuple[str, ...]:
    """The names clients in the cluster dial istiod by, in the namespace it runs in."""
    return (f"istiod.{namespace}.svc", f"istiod.{namespace}.svc.{domain}")


def serving_certificate(
    ca: CertificateAuthority,
    dns_names: Sequence[str] = (ISTIOD_DNS_NAME,),
    ips: Sequence[str] = ("127.0.0.1",),
    ttl: timedelta = SERVING_TTL,
) -> tuple[bytes, bytes]:
    """(private key PEM, chain PEM: leaf then root) for the CA's gRPC listener."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    identity = SpiffeId(ca.trust_domain, ISTIOD_NAMESPACE, ISTIOD_SERVICE_ACCOUNT)
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(identity))]
    names += [x509.DNSName(d) for d in dns_names]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    root_ski = ca.root_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca.root_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + ttl)
        # RFC 5280 4.2.1.6: with an empty subject the SAN extension must be critical.
        .add_extension(x509.SubjectAlternativeName(names), critical=True)
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
