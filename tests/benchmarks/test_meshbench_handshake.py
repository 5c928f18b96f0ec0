"""The load generator's `handshake` mode on loopback: a real TLS 1.3 server built with the
tunnel's own server context (meshcore.tls) and certificates from the project's CA, speaking
HTTP/2 with h2. An attempt counts only when the server proves the expected identity and
answers the CONNECT with 200."""

from __future__ import annotations

import socket
import ssl
import sys
import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest

from controlplane.ca import CertificateAuthority
from meshcore.identity.certs import build_certificate, new_key_and_csr
from meshcore.identity.spiffe import SpiffeId
from meshcore.tls import server_context

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from meshbench import haproxy
from meshbench.loadgen import HandshakeJob, handshake_context, handshake_once, handshakes

TD = "cluster.local"
SERVER = SpiffeId(TD, "mesh", "server")
CLIENT = SpiffeId(TD, "mesh", "client")


def _serve_one(conn: socket.socket, ctx: ssl.SSLContext, status: str) -> None:
    try:
        with ctx.wrap_socket(conn, server_side=True) as tls:
            h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
            h2c.initiate_connection()
            tls.sendall(h2c.data_to_send())
            while data := tls.recv(65536):
                for ev in h2c.receive_data(data):
                    if isinstance(ev, h2.events.RequestReceived):
                        assert dict(ev.headers)[b":method"] == b"CONNECT"
                        h2c.send_headers(ev.stream_id, [(":status", status)])
                tls.sendall(h2c.data_to_send())
    except (OSError, h2.exceptions.H2Error):
        pass  # the client closes abruptly once it has its answer


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[int, HandshakeJob, list[str]]]:
    """A loopback HBONE-like server; yields (port, a job for it, the status to answer)."""
    ca = CertificateAuthority.create(TD)

    def cert(identity: SpiffeId) -> tuple[bytes, list[bytes]]:
        key, csr = new_key_and_csr(identity)
        return key, ca.sign_csr(csr, identity, timedelta(hours=1))

    skey, schain = cert(SERVER)
    ctx = server_context(build_certificate(SERVER, skey, schain))
    ckey, cchain = cert(CLIENT)
    (tmp_path / "cert.pem").write_bytes(cchain[0])
    (tmp_path / "key.pem").write_bytes(ckey)
    (tmp_path / "roots.pem").write_bytes(ca.roots_pem())
    status = ["200"]
    lsock = socket.create_server(("127.0.0.1", 0))
    lsock.settimeout(0.2)
    port = lsock.getsockname()[1]
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = lsock.accept()
            except TimeoutError:
                continue
            conn.settimeout(5)
            threading.Thread(target=_serve_one, args=(conn, ctx, status[0]), daemon=True).start()

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    job = HandshakeJob(
        "127.0.0.1", port, "hbone", 8080, str(SERVER),
        str(tmp_path / "cert.pem"), str(tmp_path / "key.pem"), str(tmp_path / "roots.pem"),
        0, 0.3, 1000,
    )  # fmt: skip
    try:
        yield port, job, status
    finally:
        stop.set()
        t.join(2)
        lsock.close()


def test_an_attempt_completes_when_the_server_proves_the_identity_and_answers_200(
    server: tuple[int, HandshakeJob, list[str]],
) -> None:
    _, job, _ = server
    handshake_once(handshake_context(job), job)


def test_an_attempt_fails_on_another_server_identity(
    server: tuple[int, HandshakeJob, list[str]],
) -> None:
    _, job, _ = server
    other = replace(job, server_identity=str(SpiffeId(TD, "mesh", "someone-else")))
    with pytest.raises(ConnectionError, match="expected"):
        handshake_once(handshake_context(other), other)


def test_an_attempt_fails_when_the_connect_is_not_answered_200(
    server: tuple[int, HandshakeJob, list[str]],
) -> None:
    _, job, status = server
    status[0] = "401"
    with pytest.raises(ConnectionError, match="401"):
        handshake_once(handshake_context(job), job)


def test_workers_report_rate_and_their_own_cpu(
    server: tuple[int, HandshakeJob, list[str]],
) -> None:
    _, job, _ = server
    res = handshakes(replace(job, count=40), workers=2)
    assert res["failed"] == 0, res["errors"]
    assert 0 < res["handshakes"] <= 40  # bounded by --count as well as by time
    assert res["handshakes_per_second"] > 0
    assert res["client_cpu_s"] > 0 and res["client_cpu_ms_per_handshake"] > 0


def test_haproxy_maxconn_is_the_open_file_limit_less_a_reserve() -> None:
    assert haproxy.maxconn_for(20000) == 18000  # 10 000 idle connections fit
    assert haproxy.maxconn_for(1024) == 512  # never below HAProxy's own choice
