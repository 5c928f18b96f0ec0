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

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from meshcore.envconfig import EnvConfigError, required
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


CA_ADDRESS = "CA_ADDRESS"
CA_TOKEN_PATH = "CA_TOKEN_PATH"
CA_ROOT_CERT = "CA_ROOT_CERT"


@dataclass(frozen=True, slots=True)
class CaSource:
    """Where a proxy gets its certificates: exactly one of `socket` (the mesh's CA socket,
    `controlplane.ca_server`) and `grpc` (an Istio-compatible CA such as istiod's 15012) is
    set; `token_path` is the credential either way."""

    socket: Path | None
    grpc: CaGrpcSettings | None
    token_path: Path


def parse_ca_source(env: Mapping[str, str]) -> CaSource:
    """CA_ADDRESS (a socket path starting with /, or host:port of a gRPC CA), CA_TOKEN_PATH
    and CA_ROOT_CERT, as the tunnel and the waypoint both read them (pure)."""
    address = required(env, CA_ADDRESS)
    token = env.get(CA_TOKEN_PATH, "").strip()
    root = env.get(CA_ROOT_CERT, "").strip()
    if address.startswith("/"):
        if root:
            # Refused rather than ignored: the operator meant one CA or the other.
            raise EnvConfigError(f"{CA_ROOT_CERT} is for a gRPC CA; {CA_ADDRESS} is a socket path")
        if not token:
            raise EnvConfigError(f"{CA_TOKEN_PATH} must be set for the CA socket {address}")
        return CaSource(Path(address), None, Path(token))
    try:
        host_port = parse_grpc_address(address)
    except ValueError as e:
        raise EnvConfigError(
            f"{CA_ADDRESS}: {e} (a socket path starting with /, or host:port of a gRPC CA)"
        ) from None
    if not root:
        raise EnvConfigError(f"{CA_ROOT_CERT} must be set to verify the gRPC CA at {host_port}")
    token_path = Path(token) if token else DEFAULT_TOKEN_PATH
    return CaSource(None, CaGrpcSettings(host_port, Path(root), token_path), token_path)


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
