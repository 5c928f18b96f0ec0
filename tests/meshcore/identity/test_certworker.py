"""The certificate worker: its wire protocol, the tunnel's client of it, and its failures.

Every worker here is a real child process: `python -m meshcore.identity.certworker`, or a small
deliberately broken program in its place (garbage, silence, early exit) so that the
client's handling of each failure is seen against a real pipe and a real PID.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import textwrap
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from controlplane.ca import CertificateAuthority
from meshcore.identity import certworker
from meshcore.identity.certs import CertificateError, CertificateManager, build_certificate
from meshcore.identity.certworker_client import CertWorkerClient, CertWorkerError
from meshcore.identity.spiffe import SpiffeId
from tests.support.certs import InProcessCA

TD = "cluster.local"
ALICE = SpiffeId(TD, "shop", "alice")
BOB = SpiffeId(TD, "shop", "bob")


class FirstSleepOnly:
    """The first sleep (a backoff) returns at once; later ones never end."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        if len(self.calls) > 1:
            await asyncio.Event().wait()


class HeldSleep:
    """Sleeps that never end (the test looks at the state between attempts)."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        await asyncio.Event().wait()


def python(code: str) -> list[str]:
    """A worker command that runs `code` instead of the real worker."""
    return [sys.executable, "-c", textwrap.dedent(code)]


def pid_in(message: str) -> int:
    found = re.search(r"\(pid (\d+)\)", message)
    assert found, message
    return int(found.group(1))


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# --- the worker's side of the protocol, in process ------------------------------------


def serve(*requests: object) -> tuple[int, list[dict[str, Any]], str]:
    lines = io.BytesIO(b"".join(json.dumps(r).encode() + b"\n" for r in requests))
    out, err = io.BytesIO(), io.StringIO()
    status = certworker.serve(lines, out, err)
    return status, [json.loads(a) for a in out.getvalue().splitlines()], err.getvalue()


def test_worker_makes_a_key_and_csr_and_checks_the_chain():
    ca = CertificateAuthority.create(TD)
    status, [made], _ = serve({"id": 7, "op": "key_and_csr", "identity": str(ALICE)})
    assert status == 0
    assert made["id"] == 7
    chain = ca.sign_csr(made["csr"].encode(), ALICE)
    request = {
        "id": 8,
        "op": "check_chain",
        "identity": str(ALICE),
        "public_key": made["public_key"],
        "chain": [c.decode() for c in chain],
    }
    status, [checked], _ = serve(request)
    assert status == 0
    # The same facts as the in-process check of the same chain and key.
    cert = build_certificate(ALICE, made["key"].encode(), chain)
    assert checked == {
        "id": 8,
        "serial": cert.serial,
        "not_before": cert.not_before.isoformat(),
        "not_after": cert.not_after.isoformat(),
    }
    status, answers, _ = serve(request, {**request, "id": 9, "identity": str(BOB)})
    assert answers[1]["id"] == 9
    assert "asked for " + str(BOB) in answers[1]["error"]


def test_worker_answers_a_bad_request_with_an_error_and_goes_on():
    status, answers, _ = serve(
        {"id": 1, "op": "launch"},
        {"id": 2, "op": "check_chain", "identity": str(ALICE), "public_key": "x", "chain": "y"},
        {"id": 3, "op": "check_chain", "identity": str(ALICE), "public_key": "x", "chain": []},
        {"id": 4, "op": "key_and_csr", "identity": str(ALICE)},
    )
    assert status == 0
    assert [a["id"] for a in answers] == [1, 2, 3, 4]
    assert "no identity" in answers[0]["error"]
    assert "no chain list" in answers[1]["error"]
    assert "expected the leaf and at least the root" in answers[2]["error"]
    assert "csr" in answers[3]


def test_worker_stops_at_a_request_without_an_id():
    status, answers, err = serve({"op": "key_and_csr", "identity": str(ALICE)}, {"id": 1})
    assert status == certworker.EXIT_BAD_REQUEST
    assert answers == []
    assert "no integer id" in err


# --- the client, with the real worker -------------------------------------------------


def test_client_and_real_worker_give_a_certificate_that_matches_the_ca(aio):
    async def main() -> None:
        ca = InProcessCA()
        client = CertWorkerClient()
        mgr = aio.closing(
            CertificateManager(ca, timedelta(hours=1), sleep=HeldSleep(), crypto=client)
        )
        cert = await mgr.get(ALICE)
        leaf = x509.load_pem_x509_certificate(cert.chain_pem[0])
        assert leaf.serial_number == cert.serial
        assert (cert.not_before, cert.not_after) == (
            leaf.not_valid_before_utc,
            leaf.not_valid_after_utc,
        )
        assert cert.roots_pem == ca.ca.roots_pem()
        assert build_certificate(ALICE, cert.key_pem, cert.chain_pem) == cert
        assert client.started == 1
        await mgr.close()
        assert client.running == 0

    aio.run(main)


def test_many_identities_at_once_share_one_worker_process(aio):
    async def main() -> None:
        client = CertWorkerClient()
        mgr = aio.closing(CertificateManager(InProcessCA(), sleep=HeldSleep(), crypto=client))
        ids = [SpiffeId(TD, "shop", f"sa-{i}") for i in range(50)]
        certs = await asyncio.gather(*(mgr.get(i) for i in ids))
        assert [c.identity for c in certs] == ids
        assert len({c.key_pem for c in certs}) == 50
        assert client.started == 1

    aio.run(main)


def test_an_idle_worker_exits_and_a_later_request_starts_another(aio):
    async def main() -> None:
        client = CertWorkerClient(idle_exit=0.1)
        mgr = aio.closing(CertificateManager(InProcessCA(), sleep=HeldSleep(), crypto=client))
        await mgr.get(ALICE)
        for _ in range(500):
            if client.running == 0:
                break
            await asyncio.sleep(0.01)
        assert client.running == 0  # exited on its own (stdin closed) and was reaped
        await mgr.get(BOB)
        assert client.started == 2

    aio.run(main)


def test_a_wrong_chain_is_refused_with_the_workers_reason(aio):
    class WrongIdentityCA(InProcessCA):
        async def sign(self, csr_pem: bytes, ttl: timedelta) -> list[bytes]:
            other = CertificateAuthority.create(TD)
            from meshcore.identity.certs import new_key_and_csr

            return other.sign_csr(new_key_and_csr(BOB)[1], BOB, ttl)

    async def main() -> None:
        mgr = aio.closing(CertificateManager(WrongIdentityCA(), sleep=HeldSleep()))
        with pytest.raises(CertificateError, match=re.escape(f"asked for {ALICE}")):
            await mgr.get(ALICE)

    aio.run(main)


# --- the client, with broken workers --------------------------------------------------


async def first_error(command: list[str], within: float = 5.0) -> CertWorkerError:
    client = CertWorkerClient(command, timeout=within)
    try:
        with pytest.raises(CertWorkerError) as info:
            await client.new_key_and_csr(str(ALICE))
        assert client.running == 0  # the broken worker was reaped
        return info.value
    finally:
        await client.close()


def test_garbage_output_is_a_clear_error_and_the_worker_is_killed(aio):
    async def main() -> None:
        error = await first_error(
            python("""
                import sys, time
                sys.stdin.readline()
                print("hello, I am not JSON", flush=True)
                time.sleep(60)
            """)
        )
        assert "sent a malformed answer (not JSON): b'hello, I am not JSON" in str(error)
        assert gone(pid_in(str(error)))

    aio.run(main)


@pytest.mark.parametrize(
    ("answer", "problem"),
    [
        ('{"id": 12345}', "no request has this id"),
        ("[1, 2]", "not a JSON object"),
        ('{"id": ID, "key": 1, "public_key": "p", "csr": "c"}', "key is not a str"),
        ('{"id": ID, "error": 5}', "error is not a string"),
    ],
    ids=["unknown-id", "not-object", "wrong-field", "bad-error"],
)
def test_malformed_answers_are_errors(aio, answer, problem):
    async def main() -> None:
        error = await first_error(
            python(f"""
                import json, sys, time
                rid = json.loads(sys.stdin.readline())["id"]
                print({answer!r}.replace("ID", str(rid)), flush=True)
                time.sleep(60)
            """)
        )
        assert f"malformed answer ({problem})" in str(error)

    aio.run(main)


def test_exit_without_an_answer_reports_status_and_stderr(aio):
    async def main() -> None:
        error = await first_error(
            python("""
                import sys
                sys.stdin.readline()
                sys.stderr.write("cannot load the crypto library\\n")
                sys.exit(3)
            """)
        )
        assert "exited with status 3 before answering" in str(error)
        assert "stderr: cannot load the crypto library" in str(error)

    aio.run(main)


def test_a_worker_that_cannot_be_started_is_an_error(aio):
    async def main() -> None:
        error = await first_error(["/nonexistent/python", "-m", "meshcore.identity.certworker"])
        assert "cannot start the certificate worker /nonexistent/python" in str(error)

    aio.run(main)


def test_a_hung_worker_is_killed_after_the_timeout(aio):
    async def main() -> None:
        started = time.monotonic()
        error = await first_error(
            python("""
                import sys, time
                sys.stdin.readline()
                sys.stderr.write("thinking...\\n")
                sys.stderr.flush()
                time.sleep(60)
            """),
            within=0.5,
        )
        assert time.monotonic() - started < 5
        assert "gave no answer within 0.5 s and was killed" in str(error)
        assert "stderr: thinking..." in str(error)
        assert gone(pid_in(str(error)))

    aio.run(main)


def test_a_worker_that_never_reads_is_killed_after_the_timeout(aio):
    # Requests fill the pipe; even waiting for room to write is bounded.
    async def main() -> None:
        client = aio.closing(CertWorkerClient(python("import time; time.sleep(60)"), timeout=0.5))
        chain = [b"x" * 200_000, b"y"]
        with pytest.raises(CertWorkerError, match=r"gave no answer within 0\.5 s"):
            await client.check_chain(str(ALICE), b"key", chain)
        await client.close()
        assert client.running == 0

    aio.run(main)


def test_a_dead_worker_fails_every_pending_request_at_once(aio):
    async def main() -> None:
        mgr = aio.closing(
            CertificateManager(
                InProcessCA(),
                sleep=HeldSleep(),
                crypto=CertWorkerClient(python("import sys; sys.stdin.readline(); sys.exit(1)")),
            )
        )
        ids = [SpiffeId(TD, "shop", f"sa-{i}") for i in range(10)]
        results = await asyncio.gather(*(mgr.get(i) for i in ids), return_exceptions=True)
        assert all(isinstance(r, CertificateError) for r in results), results
        assert all("exited with status 1" in str(r) for r in results)

    aio.run(main)


def test_a_failed_worker_is_retried_by_the_backoff(aio, tmp_path: Path):
    # The first worker dies; the retry, after the backoff, gets a working one.
    marker = tmp_path / "failed-once"
    command = python(f"""
        import os, sys
        if not os.path.exists({str(marker)!r}):
            open({str(marker)!r}, "w").close()
            sys.exit("first start fails")
        os.execv(sys.executable, [sys.executable, "-m", "meshcore.identity.certworker"])
    """)

    async def main() -> None:
        sleep = FirstSleepOnly()
        updates: list[SpiffeId] = []
        client = CertWorkerClient(command)
        mgr = aio.closing(
            CertificateManager(InProcessCA(), sleep=sleep, crypto=client, rand=lambda: 0.5)
        )
        mgr.on_update(lambda c: updates.append(c.identity))
        with pytest.raises(CertificateError, match="first start fails"):
            await mgr.get(ALICE)
        for _ in range(1000):
            if updates:
                break
            await asyncio.sleep(0.01)
        assert updates == [ALICE]
        assert sleep.calls[0] == 0.5  # the first backoff step
        assert (await mgr.get(ALICE)).identity == ALICE
        assert client.started == 2

    aio.run(main)


# --- the tunnel's process never imports cryptography -----------------------------------

TUNNEL_SIDE = """
import asyncio, json, sys
from datetime import timedelta

from meshcore import tls
from meshcore.identity.certs import CertificateManager, LocalCAClient
from meshcore.identity.certworker_client import CertWorkerClient
from meshcore.identity.spiffe import SpiffeId


async def main(sock: str, token: str, server_uri: str, client_uri: str) -> dict:
    server_id, client_id = SpiffeId.parse(server_uri), SpiffeId.parse(client_uri)
    worker = CertWorkerClient()
    mgr = CertificateManager(LocalCAClient(sock, token), timedelta(hours=1), crypto=worker)
    server_cert, client_cert = await asyncio.gather(mgr.get(server_id), mgr.get(client_id))
    mgr.forget(server_id)  # fetched afresh: the path a rotation takes
    rotated = await mgr.get(server_id)
    seen = {}

    async def handle(reader, writer):
        peer = tls.hbone_peer(writer.get_extra_info("ssl_object"))
        tls.verify_client(peer, server_id.trust_domain)
        seen["client"] = str(peer)
        writer.write(b"ok")
        await writer.drain()
        await reader.read()
        writer.close()

    server = await asyncio.start_server(
        handle, "127.0.0.1", 0, ssl=tls.server_context(rotated)
    )
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=tls.client_context(client_cert), server_hostname=""
    )
    data = await reader.readexactly(2)
    peer = tls.hbone_peer(writer.get_extra_info("ssl_object"))
    tls.verify_server(peer, frozenset({server_id}))
    writer.close()
    await writer.wait_closed()
    server.close()
    await server.wait_closed()
    await mgr.close()
    return {
        "data": data.decode(),
        "server": str(peer),
        "client": seen.get("client"),
        "rotated": rotated.serial != server_cert.serial,
        "worker_starts": worker.started,
        "cryptography": sorted(m for m in sys.modules if m.startswith("cryptography")),
    }


result = asyncio.run(asyncio.wait_for(main(*sys.argv[1:5]), 60))
print("RESULT " + json.dumps(result))
"""


def test_the_tunnel_side_never_imports_cryptography(tmp_path: Path):
    # The CA runs as its own process (it may use cryptography); the tunnel side, in a
    # fresh interpreter, fetches certificates through the worker, rotates one and completes
    # an mTLS HBONE handshake with them, then lists what it imported.
    server_id, client_id = SpiffeId(TD, "shop", "server"), SpiffeId(TD, "shop", "client")
    token = secrets.token_hex(32)
    (tmp_path / "tokens.yaml").write_text(yaml.safe_dump({token: "node-a"}))
    workloads = [
        {
            "uid": f"u-{i.service_account}",
            "name": i.service_account,
            "namespace": i.namespace,
            "serviceAccount": i.service_account,
            "node": "node-a",
            "workloadIps": [f"10.0.0.{n + 1}"],
            "protocol": "HBONE",
        }
        for n, i in enumerate((server_id, client_id))
    ]
    (tmp_path / "workloads.yaml").write_text(yaml.safe_dump({"workloads": workloads}))
    sock = tmp_path / "ca.sock"
    # fmt: off
    ca = subprocess.Popen(
        [
            sys.executable, "-m", "controlplane.ca_server",
            "--state-dir", str(tmp_path / "state"), "--socket", str(sock),
            "--tokens-file", str(tmp_path / "tokens.yaml"), "--trust-domain", TD,
            "--workloads-file", str(tmp_path / "workloads.yaml"),
        ],
        stderr=subprocess.PIPE,
    )
    # fmt: on
    try:
        deadline = time.monotonic() + 15
        while not sock.exists():
            assert ca.poll() is None, ca.stderr.read() if ca.stderr else ""
            assert time.monotonic() < deadline, "CA socket did not appear"
            time.sleep(0.05)
        tunnel = subprocess.run(
            [sys.executable, "-c", TUNNEL_SIDE, str(sock), token, str(server_id), str(client_id)],
            capture_output=True,
            text=True,
            timeout=90,
        )
    finally:
        ca.send_signal(signal.SIGTERM)
        try:
            ca.wait(10)
        except subprocess.TimeoutExpired:
            ca.kill()
            ca.wait()
        if ca.stderr:
            ca.stderr.close()
    assert tunnel.returncode == 0, tunnel.stderr
    [line] = [x for x in tunnel.stdout.splitlines() if x.startswith("RESULT ")]
    result = json.loads(line.removeprefix("RESULT "))
    assert result.pop("worker_starts") >= 1
    assert result == {
        "data": "ok",
        "server": str(server_id),
        "client": str(client_id),
        "rotated": True,
        "cryptography": [],
    }
