"""The gRPC CA's edges without an API server: a CA whose API server is gone answers
UNAVAILABLE; the certificate worker's client reports a server that answers garbage, and a
request it cannot make. Real grpcio servers on loopback, as the unprivileged user."""

from __future__ import annotations

import asyncio
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from controlplane.ca import CertificateAuthority
from controlplane.ca_grpc import METHOD, SERVICE, CaGrpcServer, CaGrpcService, KubeFacts
from controlplane.ca_grpc_tls import serving_certificate
from kube.client import KubeClient, KubeConfig
from meshcore.identity import certworker
from meshcore.identity.certs import CertificateError, new_key_and_csr
from meshcore.identity.certworker_client import CertWorkerClient
from meshcore.identity.istio_ca import CaGrpcSettings, IstioCAClient
from meshcore.identity.spiffe import SpiffeId

ALICE = SpiffeId("cluster.local", "app", "alice")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _files(tmp: Path, ca: CertificateAuthority) -> tuple[Path, Path]:
    (tmp / "root.pem").write_bytes(ca.roots_pem())
    (tmp / "token").write_text("a.b.c")
    return tmp / "root.pem", tmp / "token"


def test_a_ca_whose_api_server_is_gone_answers_unavailable(tmp_path: Path) -> None:
    ca = CertificateAuthority.create("cluster.local")
    root, token = _files(tmp_path, ca)

    async def main() -> str:
        dead = KubeConfig(server=f"https://127.0.0.1:{_closed_port()}", token="t", insecure=True)
        async with KubeClient(dead, timeout=3) as client:
            server = CaGrpcServer(CaGrpcService(ca, KubeFacts(client)), ca)
            port = await server.start("127.0.0.1:0")
            worker = CertWorkerClient()
            try:
                client_ = IstioCAClient(CaGrpcSettings(f"127.0.0.1:{port}", root, token), worker)
                with pytest.raises(CertificateError) as e:
                    await client_.sign(new_key_and_csr(ALICE)[1], timedelta(hours=1))
                return str(e.value)
            finally:
                await worker.close()
                await server.stop()

    message = asyncio.run(main())
    assert "UNAVAILABLE" in message and "cannot check the token with the API server" in message


def test_the_worker_reports_a_ca_that_answers_garbage(tmp_path: Path) -> None:
    ca = CertificateAuthority.create("cluster.local")
    root, token = _files(tmp_path, ca)
    seen: list[list[tuple[str, Any]]] = []

    async def garbage(raw: bytes, context: Any) -> bytes:
        seen.append(list(context.invocation_metadata()))
        return b"\x0a\x05ab"  # a chain entry that claims 5 bytes and has 2

    async def main() -> str:
        server = grpc.aio.server()
        handler = grpc.unary_unary_rpc_method_handler(garbage)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {METHOD: handler}),)
        )
        creds = grpc.ssl_server_credentials([serving_certificate(ca)])
        port = server.add_secure_port("127.0.0.1:0", creds)
        await server.start()
        worker = CertWorkerClient()
        try:
            client = IstioCAClient(CaGrpcSettings(f"127.0.0.1:{port}", root, token), worker)
            with pytest.raises(CertificateError) as e:
                await client.sign(new_key_and_csr(ALICE)[1], timedelta(hours=1))
            return str(e.value)
        finally:
            await worker.close()
            await server.stop(0)

    message = asyncio.run(main())
    assert "malformed answer" in message and "truncated" in message
    # What the worker sent: the token from the file, as a bearer token.
    assert ("authorization", "Bearer a.b.c") in seen[0]


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"ttl_seconds": "1"}, "integer ttl_seconds"),
        ({"timeout": True}, "number timeout"),
        ({"csr": 5}, "no csr string"),
        ({"address": None}, "no address string"),
        ({"impersonate": True, "csr": "not a csr"}, "names no identity"),
    ],
)
def test_a_sign_request_the_worker_cannot_make_is_an_error_answer(
    tmp_path: Path, change: dict[str, Any], words: str
) -> None:
    request = {
        "id": 7,
        "op": "sign_grpc",
        "address": f"127.0.0.1:{_closed_port()}",
        "root_cert": str(tmp_path / "absent.pem"),
        "token_path": str(tmp_path / "absent"),
        "csr": new_key_and_csr(ALICE)[1].decode(),
        "ttl_seconds": 60,
        "impersonate": False,
        "timeout": 1.0,
    }
    answer = certworker.answer({**request, **change})
    assert answer["id"] == 7 and words in answer["error"]


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--max-cert-ttl-seconds", "30"], "outside 60..604800"),
        (["--max-cert-ttl-seconds", "999999"], "outside 60..604800"),
        (["--rate-per-node", "0"], "--rate-per-node must be positive"),
        (["--burst-per-node", "0"], "--burst-per-node 1..1000000"),
        (["--trusted-node-account", "ztunnel"], "not <namespace>/<service account>"),
    ],
)
def test_the_process_refuses_bad_settings_before_starting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], words: str
) -> None:
    from controlplane.ca_grpc import main

    argv = ["--state-dir", str(tmp_path), "--kubeconfig", str(tmp_path / "absent"), *flags]
    assert main(argv) == 1
    assert words in capsys.readouterr().err
    assert not (tmp_path / "ca").exists()  # nothing was created


def test_the_process_settings_reach_the_policy(tmp_path: Path) -> None:
    import argparse

    from controlplane.ca_grpc import policy_and_limiter

    args = argparse.Namespace(
        trust_domain="example.org",
        trusted_node_account=["kube-system/node-proxy"],
        max_cert_ttl_seconds=3600,
        rate_per_node=2.0,
        burst_per_node=5,
    )
    policy, limiter = policy_and_limiter(args)
    assert policy.trusted_node_accounts == frozenset({("kube-system", "node-proxy")})
    assert policy.max_validity == policy.default_validity == timedelta(hours=1)
    assert (limiter.rate, limiter.burst) == (2.0, 5)
