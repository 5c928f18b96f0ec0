"""The client of an Istio-compatible CA over gRPC (istiod's 15012, or `controlplane.ca_grpc`).

`IstioCAClient` is a `CertificateClient` like `LocalCAClient`, but the call itself is made by
the certificate worker child process (`certworker_client.sign_grpc`): the tunnel process
never imports grpcio, and the request is made from the same short-lived process that made
the key and the CSR. The caller's credential is a Kubernetes service-account token read
from a file on every request (the kubelet rotates projected tokens), upstream's
/var/run/secrets/tokens/istio-token by default. As a node proxy, the client asks for each
pod's identity through metadata ImpersonatedIdentity (the CSR's identity).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from meshcore.identity.certs import CA_REQUEST_TIMEOUT, CertificateError
from meshcore.identity.certworker_client import CertWorkerClient, CertWorkerError

DEFAULT_TOKEN_PATH = Path("/var/run/secrets/tokens/istio-token")


@dataclass(frozen=True, slots=True)
class CaGrpcSettings:
    address: str  # host:port, as grpc dials it
    root_cert: Path  # PEM of the root that signed the CA's serving certificate
    token_path: Path = DEFAULT_TOKEN_PATH


def parse_grpc_address(value: str) -> str:
    """`https://host:port` or `host:port` -> `host:port`; ValueError saying what is wrong."""
    address = value.strip()
    if address.startswith("https://"):
        address = address[len("https://") :].rstrip("/")
    elif "://" in address:
        raise ValueError(f"{value!r}: only https:// (TLS) is accepted for a gRPC CA")
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r} is not host:port")
    if "/" in host:
        raise ValueError(f"{value!r}: a gRPC CA address has no path")
    return address


class IstioCAClient:
    """Asks the CA through the certificate worker; errors are `CertificateError`s."""

    def __init__(
        self,
        settings: CaGrpcSettings,
        worker: CertWorkerClient,
        *,
        impersonate: bool = True,
        timeout: float = CA_REQUEST_TIMEOUT,
    ) -> None:
        self._settings = settings
        self._worker = worker
        self._impersonate = impersonate
        self._timeout = timeout

    async def sign(self, csr_pem: bytes, ttl: timedelta) -> list[bytes]:
        s = self._settings
        try:
            return await self._worker.sign_grpc(
                s.address,
                str(s.root_cert),
                str(s.token_path),
                csr_pem,
                int(ttl.total_seconds()),
                impersonate=self._impersonate,
                call_timeout=self._timeout,
            )
        except CertWorkerError as e:
            raise CertificateError(f"CA at {s.address}: {e}") from e
