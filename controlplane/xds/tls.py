"""The discovery server's TLS: a certificate from the mesh CA for istiod.

The leaf names istiod both ways, as upstream's does: the SPIFFE URI SAN
(spiffe://<trust domain>/ns/istio-system/sa/istiod), which our tunnels and waypoints check,
and the DNS name istiod.istio-system.svc, which gRPC clients (upstream's included) check.
Plaintext is refused except on a loopback address.

With `require_client_cert` the listener takes only clients presenting a certificate that
chains to the mesh roots (grpc checks it in the handshake); the subscriber is then the
certificate's SPIFFE id. grpcio's Python credentials can require a client certificate or
not ask for one, never ask for an optional one, so a listener that also takes tokens (the
CA's callers have no certificate yet) does not see one.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import grpc

from controlplane.ca import CertificateAuthority
from controlplane.ca_grpc_tls import serving_certificate
from meshcore.identity.spiffe import SpiffeId

XDS_NAMESPACE = "istio-system"
XDS_SERVICE_ACCOUNT = "istiod"
XDS_DNS_NAME = "istiod.istio-system.svc"


class XdsTlsError(ValueError):
    """The server cannot listen as asked; the message says why."""


def server_identity(trust_domain: str) -> SpiffeId:
    return SpiffeId(trust_domain, XDS_NAMESPACE, XDS_SERVICE_ACCOUNT)


def server_certificate(
    ca: CertificateAuthority,
    ttl: timedelta = timedelta(days=7),
    dns_names: Sequence[str] = (XDS_DNS_NAME,),
) -> tuple[bytes, bytes]:
    """(private key PEM, chain PEM leaf first) for the discovery server: istiod's serving
    certificate, the same one the gRPC CA presents (they share 15012)."""
    return serving_certificate(ca, dns_names=dns_names, ttl=ttl)


def server_credentials(
    ca: CertificateAuthority,
    ttl: timedelta = timedelta(days=7),
    dns_names: Sequence[str] = (XDS_DNS_NAME,),
    require_client_cert: bool = False,
) -> Any:
    """gRPC server credentials with a fresh key and a leaf signed by `ca` for istiod; with
    `require_client_cert`, clients must present a certificate chaining to `ca`'s roots."""
    pair = [server_certificate(ca, ttl, dns_names)]
    if require_client_cert:
        return grpc.ssl_server_credentials(
            pair, root_certificates=ca.roots_pem(), require_client_auth=True
        )
    return grpc.ssl_server_credentials(pair)


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
