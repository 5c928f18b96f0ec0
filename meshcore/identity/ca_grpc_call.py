"""One `CreateCertificate` call to an Istio-compatible CA over gRPC + TLS (istiod's 15012).

Run only inside the certificate worker (`python -m meshcore.identity.certworker`): grpcio
costs a process several MB and threads, which the tunnel does not carry for a call made
once per identity and half-life. Blocking, one channel per call: the worker is short-lived.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from meshcore.identity import camessages as m

SERVICE = "istio.v1.auth.IstioCertificateService"
METHOD = "CreateCertificate"
MAX_TOKEN_BYTES = 64 * 1024


class CaCallError(Exception):
    """The CA could not be asked, or refused; the message says which and why."""


def create_certificate(
    address: str,
    root_cert: Path,
    token_path: Path,
    csr_pem: str,
    ttl_seconds: int,
    impersonated: str,
    timeout: float,
) -> list[str]:
    """The chain (leaf first) the CA at `address` ("host:port") issues for `csr_pem`."""
    try:
        roots = root_cert.read_bytes()
    except OSError as e:
        raise CaCallError(f"cannot read the CA root certificate {root_cert}: {e}") from e
    try:
        # Read for every call: the token is rotated by the kubelet (projected volume).
        token = token_path.read_bytes()[:MAX_TOKEN_BYTES].decode().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CaCallError(f"cannot read the CA token {token_path}: {e}") from e
    if not token:
        raise CaCallError(f"the CA token file {token_path} is empty")
    request = m.encode_request(m.CertificateRequest(csr_pem, ttl_seconds, impersonated))
    creds = grpc.ssl_channel_credentials(root_certificates=roots)
    with grpc.secure_channel(address, creds) as channel:
        call = channel.unary_unary(f"/{SERVICE}/{METHOD}")
        try:
            raw = call(request, metadata=[("authorization", f"Bearer {token}")], timeout=timeout)
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else None
            details = e.details() if hasattr(e, "details") else str(e)
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise CaCallError(
                    f"cannot reach the CA at {address} ({code.name}): {details}; check the "
                    "address, that the CA runs, and that its certificate matches the root"
                ) from None
            name = code.name if code is not None else "error"
            raise CaCallError(f"CA refused ({name}): {details}") from None
    try:
        return list(m.decode_response(raw).cert_chain)
    except m.CaMessageError as e:
        raise CaCallError(f"the CA at {address} sent a malformed answer: {e}") from e
