"""What a proxy presents to the discovery server: its service-account token, as istiod's
clients do (`authorization: Bearer <token>` on the ADS call).

The token is the one the proxy's CA client already uses (CA_TOKEN_PATH: the projected
istio-ca token on Kubernetes, the node token in the local cluster), read again for every
stream because the kubelet rotates projected tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

MAX_TOKEN_BYTES = 64 * 1024  # a service-account JWT is about 1 KiB

Metadata = tuple[tuple[str, str], ...]
Credentials = Callable[[], Metadata]


class XdsCredentialError(Exception):
    """The credential cannot be read; the message names the file and what is wrong."""


def read_token(path: Path) -> str:
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_TOKEN_BYTES + 1)
    except OSError as e:
        raise XdsCredentialError(f"cannot read the xDS token {path}: {e}") from e
    if len(raw) > MAX_TOKEN_BYTES:
        raise XdsCredentialError(f"the xDS token {path} is over {MAX_TOKEN_BYTES} bytes")
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise XdsCredentialError(f"the xDS token {path} is not ASCII text") from None
    if not token or any(c.isspace() for c in token):
        raise XdsCredentialError(f"the xDS token {path} is empty or holds whitespace")
    return token


def token_credentials(path: Path) -> Credentials:
    """The call metadata carrying the token at `path`, read when a stream opens."""

    def metadata() -> Metadata:
        return (("authorization", f"Bearer {read_token(path)}"),)

    return metadata
