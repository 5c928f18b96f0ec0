"""A discovery server on loopback with TLS from a fresh mesh CA, and clients for it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from controlplane.ca import CertificateAuthority
from controlplane.xds.auth import SubscriberAuth
from controlplane.xds.server import XdsServer
from controlplane.xds.tls import bind, server_credentials, server_identity
from meshcore.state import MeshState
from meshcore.xds import messages as m
from meshcore.xds.client import XdsClient, XdsTarget
from meshcore.xds.convert import RESOURCE_TYPES
from meshcore.xds.grpc import client_context
from tests.support.aio import Loop

# For the tests of everything but authentication (tests/xds/test_auth.py): every
# subscriber served, asked for by name.
OPEN = SubscriberAuth.unauthenticated("cluster.local")


@pytest.fixture(scope="session")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create("cluster.local")


@pytest.fixture(scope="session")
def credentials(ca: CertificateAuthority) -> Any:
    return server_credentials(ca)


@dataclass
class Harness:
    aio: Loop
    ca: CertificateAuthority
    credentials: Any
    port: int = 0
    servers: list[Any] = field(default_factory=list)

    async def serve(self, xds: XdsServer, port: int = 0) -> int:
        """A grpc.aio server for `xds` on 127.0.0.1 (the same port again after a restart)."""
        server = grpc.aio.server()
        xds.add_to_server(server)
        self.port = bind(server, f"127.0.0.1:{port}", self.credentials)
        await server.start()
        self.servers.append(server)
        self.aio.defer(lambda: server.stop(None))
        return self.port

    async def client(
        self, on_update: Callable[[MeshState], None] | None = None, node: str = "node1"
    ) -> XdsClient:
        target = XdsTarget(
            "127.0.0.1",
            self.port,
            client_context(self.ca.roots_pem()),
            server_identity("cluster.local"),
        )
        client = XdsClient(target, m.Node(id=node), on_update or (lambda _s: None), RESOURCE_TYPES)
        self.aio.defer(client.close)
        await client.start(wait=20)
        return client


@pytest.fixture
def harness(aio: Loop, ca: CertificateAuthority, credentials: Any) -> Harness:
    return Harness(aio, ca, credentials)
