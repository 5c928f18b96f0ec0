"""The CA over a real unix socket: tokens, per-node authorization, malformed requests."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import stat
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from cryptography import x509

from controlplane.ca import CLOCK_SKEW, CertificateAuthority
from controlplane.ca_grpc_auth import RateLimiter
from controlplane.ca_server import CAServer, WorkloadsFileAuthorizer, parse_workload_grants
from meshcore.identity.certs import CertificateError, LocalCAClient, new_key_and_csr
from meshcore.identity.spiffe import SpiffeId
from tests.support.aio import run
from tests.support.otheruser import as_nobody, reachable_dir

TD = "cluster.local"
ALICE = SpiffeId(TD, "shop", "alice")  # runs on node-a
BOB = SpiffeId(TD, "shop", "bob")  # runs on node-b

WORKLOADS = {
    "workloads": [
        {
            "uid": "u1",
            "name": "alice-1",
            "namespace": "shop",
            "serviceAccount": "alice",
            "node": "node-a",
            "workloadIps": ["10.0.0.1"],
            "protocol": "HBONE",
        },
        {
            "uid": "u2",
            "name": "bob-1",
            "namespace": "shop",
            "serviceAccount": "bob",
            "node": "node-b",
            "workloadIps": ["10.0.1.1"],
            "protocol": "HBONE",
            "extraKey": "ignored",
        },
    ]
}


async def post(sock: Path, body: bytes, token: str | None) -> tuple[int, dict[str, str]]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with (
        aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock))) as session,
        session.post("http://ca/v1/certificates", data=body, headers=headers) as resp,
    ):
        return resp.status, json.loads(await resp.text())


def run_with_server(tmp_path: Path, scenario, **settings: Any) -> None:
    ca = CertificateAuthority.create(TD)
    token_a, token_b = secrets.token_hex(32), secrets.token_hex(32)
    wfile = tmp_path / "workloads.yaml"
    wfile.write_text(yaml.safe_dump(WORKLOADS))
    sock = tmp_path / "ca.sock"

    async def main() -> None:
        server = CAServer(
            ca, {token_a: "node-a", token_b: "node-b"}, WorkloadsFileAuthorizer(wfile), **settings
        )
        await server.start(sock)
        try:
            await asyncio.wait_for(scenario(ca, sock, token_a, wfile), 30)
        finally:
            await server.close()
        assert not sock.exists()

    run(main)


def test_good_token_and_local_identity_gets_a_chain(tmp_path):
    async def scenario(ca, sock, token_a, _wfile):
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        chain = await LocalCAClient(sock, token_a).sign(
            new_key_and_csr(ALICE)[1], timedelta(hours=1)
        )
        assert len(chain) == 2
        assert chain[-1] == ca.roots_pem()
        leaf = x509.load_pem_x509_certificate(chain[0])
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [str(ALICE)]
        lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
        assert lifetime == timedelta(hours=1) + CLOCK_SKEW

    run_with_server(tmp_path, scenario)


def test_a_longer_lifetime_than_the_cap_is_issued_capped(tmp_path):
    async def scenario(_ca, sock, token_a, _wfile):
        chain = await LocalCAClient(sock, token_a).sign(
            new_key_and_csr(ALICE)[1], timedelta(hours=1)
        )
        leaf = x509.load_pem_x509_certificate(chain[0])
        lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
        assert lifetime == timedelta(seconds=10) + CLOCK_SKEW

    run_with_server(tmp_path, scenario, max_ttl=timedelta(seconds=10))


def test_bad_or_missing_token_is_401(tmp_path):
    async def scenario(_ca, sock, _token_a, _wfile):
        body = json.dumps({"csr": new_key_and_csr(ALICE)[1].decode()}).encode()
        status, doc = await post(sock, body, secrets.token_hex(32))
        assert status == 401
        assert "token" in doc["error"]
        status, _ = await post(sock, body, None)
        assert status == 401
        with pytest.raises(CertificateError, match=r"CA refused \(401\)"):
            await LocalCAClient(sock, "nope").sign(new_key_and_csr(ALICE)[1], timedelta(hours=1))

    run_with_server(tmp_path, scenario)


def test_identity_of_a_pod_on_another_node_is_403(tmp_path):
    async def scenario(_ca, sock, token_a, _wfile):
        with pytest.raises(CertificateError, match="403") as info:
            await LocalCAClient(sock, token_a).sign(new_key_and_csr(BOB)[1], timedelta(hours=1))
        assert "node-a" in str(info.value)
        assert str(BOB) in str(info.value)

    run_with_server(tmp_path, scenario)


def test_a_caller_of_another_uid_is_403_before_its_token_is_read(tmp_path):
    async def scenario(_ca, sock, token_a, _wfile):
        with pytest.raises(CertificateError, match="403") as info:
            await LocalCAClient(sock, token_a).sign(new_key_and_csr(ALICE)[1], timedelta(hours=1))
        assert f"peer uid {os.geteuid()}" in str(info.value)
        status, _ = await post(sock, b"not even json", None)
        assert status == 403  # not 401/400: nothing of the request is looked at

    run_with_server(tmp_path, scenario, allowed_uids=frozenset({os.geteuid() + 1}))


def test_issuance_is_rate_limited_per_node(tmp_path):
    async def scenario(_ca, sock, token_a, _wfile):
        csr = new_key_and_csr(ALICE)[1]
        for _ in range(3):
            await LocalCAClient(sock, token_a).sign(csr, timedelta(hours=1))
        headers = {"Authorization": f"Bearer {token_a}", "Content-Type": "application/json"}
        body = json.dumps({"csr": csr.decode()}).encode()
        async with (
            aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock))) as session,
            session.post("http://ca/v1/certificates", data=body, headers=headers) as resp,
        ):
            assert resp.status == 429
            assert resp.headers["Retry-After"] == "1"
            assert "node-a" in (await resp.json())["error"]

    # A clock that never moves: the burst of 3 is all node-a gets.
    run_with_server(tmp_path, scenario, limiter=RateLimiter(1.0, 3), clock=lambda: 0.0)


@pytest.mark.netns  # needs root to run a caller as another user
def test_a_real_process_of_another_user_is_refused(tmp_path):
    def ask(sock: Path) -> int:
        import socket as pysocket

        s = pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
        s.settimeout(20)
        s.connect(str(sock))
        s.sendall(
            b"POST /v1/certificates HTTP/1.1\r\nHost: ca\r\nContent-Length: 2\r\n"
            b"Connection: close\r\n\r\n{}"
        )
        head = s.recv(64)
        return 43 if head.startswith(b"HTTP/1.1 403") else 1

    async def scenario(_ca, sock, token_a, _wfile):
        os.chmod(sock, 0o666)  # loosened: the file no longer keeps nobody out
        assert await as_nobody(lambda: ask(sock)) == 43
        # Root is still served.
        await LocalCAClient(sock, token_a).sign(new_key_and_csr(ALICE)[1], timedelta(hours=1))

    with reachable_dir() as d:
        run_with_server(d, scenario)


def test_workloads_file_changes_are_picked_up(tmp_path):
    async def scenario(_ca, sock, token_a, wfile):
        client = LocalCAClient(sock, token_a)
        with pytest.raises(CertificateError, match="403"):
            await client.sign(new_key_and_csr(BOB)[1], timedelta(hours=1))
        moved = json.loads(json.dumps(WORKLOADS))
        moved["workloads"][1]["node"] = "node-a"
        wfile.write_text(yaml.safe_dump(moved))
        os.utime(wfile, ns=(time.time_ns(), time.time_ns() + 10**9))  # a distinct mtime
        chain = await client.sign(new_key_and_csr(BOB)[1], timedelta(hours=1))
        assert len(chain) == 2

    run_with_server(tmp_path, scenario)


def test_garbage_is_400(tmp_path):
    async def scenario(_ca, sock, token_a, _wfile):
        for body in (
            b"not json",
            b"[]",
            json.dumps({"csr": "garbage"}).encode(),
            json.dumps({"csr": new_key_and_csr(ALICE)[1].decode(), "ttlSeconds": "x"}).encode(),
            json.dumps({"csr": new_key_and_csr(ALICE)[1].decode(), "ttlSeconds": 0}).encode(),
            json.dumps({"ttlSeconds": 60}).encode(),
        ):
            status, doc = await post(sock, body, token_a)
            assert status == 400, body
            assert doc["error"]

    run_with_server(tmp_path, scenario)


def test_unreachable_ca_is_a_clear_error(tmp_path):
    async def main() -> None:
        client = LocalCAClient(tmp_path / "absent.sock", "t")
        with pytest.raises(CertificateError, match="cannot reach the CA"):
            await client.sign(new_key_and_csr(ALICE)[1], timedelta(hours=1))

    run(main)


def test_workload_grants_defaults():
    grants = parse_workload_grants(
        {
            "workloads": [
                {"namespace": "a", "node": "n1"},
                {
                    "namespace": "b",
                    "serviceAccount": "x",
                    "trustDomain": "td.example",
                    "node": "n2",
                },
                {"namespace": "c"},  # no node: nobody may hold it
            ]
        }
    )
    assert grants == {
        ("n1", SpiffeId(TD, "a", "default")),
        ("n2", SpiffeId("td.example", "b", "x")),
    }


def test_standalone_process(tmp_path):
    token = secrets.token_hex(32)
    (tmp_path / "tokens.yaml").write_text(yaml.safe_dump({token: "node-a"}))
    (tmp_path / "workloads.yaml").write_text(yaml.safe_dump(WORKLOADS))
    sock = tmp_path / "ca.sock"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "controlplane.ca_server",
            "--state-dir",
            str(tmp_path / "state"),
            "--socket",
            str(sock),
            "--tokens-file",
            str(tmp_path / "tokens.yaml"),
            "--trust-domain",
            TD,
            "--workloads-file",
            str(tmp_path / "workloads.yaml"),
        ],
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 15
        while not sock.exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "CA socket did not appear"
            time.sleep(0.05)
        chain = run(LocalCAClient(sock, token).sign(new_key_and_csr(ALICE)[1], timedelta(hours=1)))
        root = (tmp_path / "state" / "ca" / "root-cert.pem").read_bytes()
        assert chain[-1] == root
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        if proc.stderr:
            proc.stderr.close()
    assert rc == 0
    assert not sock.exists()
