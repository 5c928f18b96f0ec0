"""The load generator's `connect` mode on loopback: a failed attempt is counted with its
kind, so a row of zero new connections in the report says why (a refused port, a server
that closes without answering) instead of reading as a slow proxy."""

from __future__ import annotations

import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from meshbench.loadgen import connect, error_kind
from meshbench.report import flatten

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


def _server(answer: bytes) -> Iterator[int]:
    """A loopback server that reads each request and sends `answer` (maybe nothing), then
    closes."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(128)
    srv.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with c:
                c.settimeout(2.0)
                try:
                    c.recv(4096)
                    c.sendall(answer)
                except OSError:
                    pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield srv.getsockname()[1]
    finally:
        stop.set()
        t.join(5)
        srv.close()


@pytest.fixture
def answering() -> Iterator[int]:
    yield from _server(ANSWER)


@pytest.fixture
def silent() -> Iterator[int]:
    yield from _server(b"")


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()  # nothing listens there now
    return port


def test_connections_that_get_their_answer_count_and_none_fails(answering: int) -> None:
    res = connect("127.0.0.1", answering, 5.0, 2, count=20)
    assert res["connections"] == 20 and res["failed"] == 0 and res["errors"] == {}


def test_a_refused_port_fails_every_attempt_as_econnrefused() -> None:
    res = connect("127.0.0.1", _closed_port(), 5.0, 2, count=10)
    assert res["connections"] == 0 and res["failed"] == 10
    assert res["errors"] == {"ECONNREFUSED": 10}


def test_a_server_that_closes_without_answering_fails_as_a_connection_error(silent: int) -> None:
    res = connect("127.0.0.1", silent, 5.0, 1, count=5)
    assert res["connections"] == 0 and res["failed"] == 5
    assert res["errors"] == {"ConnectionError": 5}


def test_failed_attempts_reach_the_report() -> None:
    run = {"scenario": "relay", "placement": "cross-node", "phases": {},
           "connect": {"per_second": 0.0, "failed": 46217}}  # fmt: skip
    assert flatten(run)["conn_failed"] == 46217.0


def test_error_kind_names_the_errno_or_the_type() -> None:
    assert error_kind(ConnectionRefusedError(111, "refused")) == "ECONNREFUSED"
    assert error_kind(ValueError("bad length")) == "ValueError"
    assert error_kind(OSError("no errno")) == "OSError"
