"""Where a proxy's mesh state comes from: the local file (LOCAL_XDS_PATH) or a discovery
server (XDS_ADDRESS, verified with the root in XDS_ROOT_CERT). Exactly one is configured.

Both sources look alike to a proxy (`ConfigSource`: the current state, a status for the
admin, close), and both deliver every new state to the proxy's callback. The xDS client is
imported only when it is used, so a proxy in local mode loads nothing of it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from meshcore.discovery import ConfigStatus, LocalConfigWatcher
from meshcore.envconfig import EnvConfigError
from meshcore.state import MeshConfigError, MeshState

XDS_ADDRESS = "XDS_ADDRESS"
XDS_ROOT_CERT = "XDS_ROOT_CERT"
XDS_INITIAL_WAIT = 30.0


@dataclass(frozen=True, slots=True)
class XdsSettings:
    address: str  # host:port of the discovery server (istiod's 15012), or unix:/path
    root_cert: Path  # PEM roots the server's certificate must chain to (the mesh root)


class ConfigSource(Protocol):
    @property
    def current(self) -> MeshState: ...

    @property
    def status(self) -> ConfigStatus: ...

    async def close(self) -> None: ...


def parse_source(env: Mapping[str, str], local_name: str) -> tuple[Path | None, XdsSettings | None]:
    """(local file, xDS settings) from the environment: exactly one of the two."""
    local = env.get(local_name, "").strip()
    address = env.get(XDS_ADDRESS, "").strip()
    if local and address:
        raise EnvConfigError(f"set either {local_name} or {XDS_ADDRESS}, not both")
    if not local and not address:
        raise EnvConfigError(f"{local_name} or {XDS_ADDRESS} must be set")
    if local:
        return Path(local), None
    host, sep, port = address.rpartition(":")
    if address.startswith("unix:/"):
        pass  # a unix socket path, gRPC's spelling
    elif not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise EnvConfigError(f"{XDS_ADDRESS}={address!r} is neither host:port nor unix:/path")
    root = env.get(XDS_ROOT_CERT, "").strip()
    if not root:
        raise EnvConfigError(f"{XDS_ROOT_CERT} must name the PEM file of the mesh root")
    return None, XdsSettings(address, Path(root))


async def open_source(
    local: Path | None,
    xds: XdsSettings | None,
    *,
    node_id: str,
    trust_domain: str,
    on_update: Callable[[MeshState], None],
    token_path: Path | None = None,
) -> ConfigSource:
    """Start the configured source; its first state has been delivered when this returns.
    MeshConfigError when there is no usable first state (bad file, server not answering).
    `token_path`: the proxy's service-account (or node) token, which the discovery server
    authenticates it by; the CA client's CA_TOKEN_PATH, as upstream ztunnel does."""
    if local is not None:
        watcher = LocalConfigWatcher(local, on_update)
        await watcher.start()
        return watcher
    assert xds is not None
    from meshcore.identity.spiffe import SpiffeId
    from meshcore.xds import messages
    from meshcore.xds.client import XdsClient, XdsTarget
    from meshcore.xds.convert import RESOURCE_TYPES
    from meshcore.xds.credentials import token_credentials
    from meshcore.xds.grpc import client_context

    try:
        roots = xds.root_cert.read_bytes()
        ctx = client_context(roots)
    except (OSError, ValueError) as exc:
        raise MeshConfigError(f"cannot use {XDS_ROOT_CERT}={xds.root_cert}: {exc}") from exc
    identity = SpiffeId(trust_domain, "istio-system", "istiod")
    target = XdsTarget.parse(xds.address, ctx, identity)
    credentials = token_credentials(token_path) if token_path is not None else None
    client = XdsClient(
        target, messages.Node(id=node_id), on_update, RESOURCE_TYPES, credentials=credentials
    )
    await client.start(wait=XDS_INITIAL_WAIT)
    return client
