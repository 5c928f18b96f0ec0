"""`python -m controlplane.xds`: serves a mesh-config file over TLS and pushes its edits, to
subscribers that authenticate (a node token, or a mesh client certificate), and refuses the
others UNAUTHENTICATED before anything is sent."""

from __future__ import annotations

import json
import secrets
import signal
import socket
import ssl
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from controlplane.ca import CertificateAuthority
from controlplane.xds.tls import server_identity
from meshcore.identity.spiffe import SpiffeId
from meshcore.state import MeshConfigError
from meshcore.xds import messages as m
from meshcore.xds.client import XdsClient, XdsTarget
from meshcore.xds.convert import RESOURCE_TYPES
from meshcore.xds.credentials import Credentials, token_credentials
from meshcore.xds.grpc import GrpcClosed, GrpcStream, client_context
from meshcore.xds.source import XDS_INITIAL_WAIT
from tests.support.aio import Loop, wait_until
from tests.support.certs import issue
from tests.support.ports import free_port
from tests.xds.states import demo_document
from tests.xds.test_tunnel_process import ROOT


def start_server(args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "controlplane.xds", *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@dataclass
class Served:
    port: int
    root: Path  # the mesh root the server's certificate chains to
    token: str  # node1's token in the server's --tokens-file
    proc: subprocess.Popen[bytes]


def serve(aio: Loop, tmp_path: Path, *extra: str) -> Served:
    """The server process on a fresh port with a tokens file of one node, stopped at the end."""
    config = tmp_path / "xds.json"
    write(config, json.dumps(demo_document()))
    token = secrets.token_hex(32)
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(f"{token}: node1\n")
    port = free_port()
    proc = start_server(
        ["--config", str(config), "--state-dir", str(tmp_path), "--listen", f"127.0.0.1:{port}",
         "--tokens-file", str(tokens), *extra]
    )  # fmt: skip

    def stop() -> None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    aio.defer(stop)
    return Served(port, tmp_path / "ca" / "root-cert.pem", token, proc)


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


async def ready(served: Served) -> None:
    await wait_until(served.root.exists, "the CA's root", limit=20, interval=0.1)
    await wait_until(lambda: listening(served.port), "the server to listen", limit=20)


async def first_answer(
    served: Served, metadata: tuple[tuple[str, str], ...], ctx: ssl.SSLContext | None = None
) -> GrpcClosed:
    """Open the ADS call as a proxy does, subscribe to every type, and return how the call
    ended; fails if any message (a resource) came back first."""
    ctx = ctx or client_context(served.root.read_bytes())
    stream = await GrpcStream.open(
        "127.0.0.1",
        served.port,
        m.ADS_METHOD,
        ssl_context=ctx,
        expected=server_identity("cluster.local"),
        connect_limit=10,
        max_message=m.MAX_MESSAGE_SIZE,
        metadata=metadata,
    )
    try:
        for t in RESOURCE_TYPES:
            await stream.send(m.encode(m.DeltaDiscoveryRequest(type_url=t)))
        try:
            got = await stream.recv()
        except GrpcClosed as ended:
            return ended
        raise AssertionError(f"a subscriber that did not authenticate got {len(got)} bytes")
    finally:
        await stream.close()


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def client(served: Served, credentials: Credentials | None) -> XdsClient:
    target = XdsTarget(
        "127.0.0.1",
        served.port,
        client_context(served.root.read_bytes()),
        server_identity("cluster.local"),
    )
    return XdsClient(
        target, m.Node(id="n"), lambda _s: None, RESOURCE_TYPES, credentials=credentials
    )


def write(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def test_server_process_pushes_file_edits_to_a_subscriber_with_a_node_token(
    aio: Loop, tmp_path: Path
) -> None:
    served = serve(aio, tmp_path)
    config = tmp_path / "xds.json"
    doc = demo_document()
    (tmp_path / "token").write_text(served.token + "\n")

    async def main() -> None:
        await ready(served)
        xds = client(served, token_credentials(tmp_path / "token"))
        aio.defer(xds.close)
        await xds.start(wait=XDS_INITIAL_WAIT)
        assert len(xds.current.workloads) == len(doc["workloads"])
        doc["workloads"].pop()
        write(config, json.dumps(doc))
        await wait_until(
            lambda: len(xds.current.workloads) == len(doc["workloads"]), "the edit pushed"
        )
        assert served.proc.poll() is None

    aio.run(main)


def test_a_subscriber_without_a_token_is_refused_before_anything_is_sent(
    aio: Loop, tmp_path: Path
) -> None:
    served = serve(aio, tmp_path)

    async def main() -> None:
        await ready(served)
        ended = await first_answer(served, ())
        assert ended.status == grpc.StatusCode.UNAUTHENTICATED.value[0]
        assert "no client certificate" in ended.message
        assert "no token: send 'authorization: Bearer" in ended.message
        # And our client, as a proxy runs it, never gets a state from it.
        xds = client(served, None)
        with pytest.raises(MeshConfigError):
            await xds.start(wait=2)
        assert xds.responses == 0
        assert served.proc.poll() is None

    aio.run(main)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("Bearer not-a-node-token", "the token is not a node token of this cluster"),
        ("Basic dXNlcjpwYXNz", "the authorization header is not 'Bearer <token>'"),
    ],
)
def test_a_wrong_token_is_refused_saying_why(
    aio: Loop, tmp_path: Path, header: str, expected: str
) -> None:
    served = serve(aio, tmp_path)

    async def main() -> None:
        await ready(served)
        ended = await first_answer(served, (("authorization", header),))
        assert ended.status == grpc.StatusCode.UNAUTHENTICATED.value[0]
        assert expected in ended.message, ended.message
        # The right token on the same server is served.
        right = client(served, lambda: bearer(served.token))
        aio.defer(right.close)
        await right.start(wait=XDS_INITIAL_WAIT)
        assert right.current.workloads

    aio.run(main)


def mesh_client_context(
    root: bytes, ca: CertificateAuthority, identity: SpiffeId, tmp_path: Path
) -> ssl.SSLContext:
    """TLS to the server presenting a certificate `ca` signed for `identity`."""
    cert = issue(ca, identity)
    chain, key = tmp_path / f"{identity.service_account}.pem", tmp_path / "key.pem"
    chain.write_bytes(cert.presented_chain_pem)
    key.write_bytes(cert.key_pem)
    ctx = client_context(root)
    assert ctx is not None
    ctx.load_cert_chain(chain, key)
    return ctx


def test_a_mesh_client_certificate_is_served_and_a_foreign_one_refused(
    aio: Loop, tmp_path: Path
) -> None:
    served = serve(aio, tmp_path, "--require-client-cert")
    ztunnel = SpiffeId("cluster.local", "istio-system", "ztunnel")

    async def main() -> None:
        await ready(served)
        root = served.root.read_bytes()
        mesh_ca = CertificateAuthority.load_or_create(tmp_path, "cluster.local")
        ctx = mesh_client_context(root, mesh_ca, ztunnel, tmp_path)
        target = XdsTarget("127.0.0.1", served.port, ctx, server_identity("cluster.local"))
        xds = XdsClient(target, m.Node(id="n"), lambda _s: None, RESOURCE_TYPES)
        aio.defer(xds.close)
        await xds.start(wait=XDS_INITIAL_WAIT)
        assert xds.current.workloads
        # Without a certificate, or with one of another CA, the server ends the handshake
        # (with TLS 1.3 the client learns it at its first read): no message comes back,
        # whatever the token.
        other = CertificateAuthority.create("cluster.local")
        foreign = mesh_client_context(root, other, ztunnel, tmp_path / "other")
        for without in (client_context(root), foreign):
            try:
                ended = await first_answer(served, bearer(served.token), without)
            except (OSError, ssl.SSLError):
                continue
            assert ended.status == grpc.StatusCode.UNAVAILABLE.value[0], ended

    (tmp_path / "other").mkdir()
    aio.run(main)


def test_the_server_refuses_to_start_without_saying_how_subscribers_authenticate(
    tmp_path: Path,
) -> None:
    config = tmp_path / "xds.json"
    write(config, json.dumps(demo_document()))
    out = subprocess.run(
        [sys.executable, "-m", "controlplane.xds", "--config", str(config),
         "--state-dir", str(tmp_path), "--listen", f"127.0.0.1:{free_port()}"],
        cwd=ROOT, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert out.returncode == 2
    assert "say how subscribers authenticate" in out.stderr
