"""The load generator's `connect` mode on loopback: a failed attempt is counted with its
kind, so a row of zero new connections in the report says why (a refused port, a server
that closes without answering) instead of reading as a slow proxy."""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from meshbench.loadgen import connect, error_kind
from meshbench.report import flatten

from tests.support.closing_server import closing_server

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


@pytest.fixture
def answering() -> Iterator[int]:
    with closing_server(ANSWER) as port:
        yield port


@pytest.fixture
def silent() -> Iterator[int]:
    with closing_server(b"") as port:
        yield port


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()  # nothing listens there now
    return port


def test_connections_that_get_their_answer_count_and_none_fails(answering: int) -> None:
    res = connect("127.0.0.1", answering, 5.0, 2, count=20)
    assert res["connections"] == 20 and res["failed"] == 0 and res["errors"] == {}
    # The generator's own CPU over the phase, so a saturated generator is told apart.
    assert res["client_cpu_s"] > 0 and res["client_cpu_cores"] == pytest.approx(
        res["client_cpu_s"] / res["seconds"]
    )
    assert flatten({"connect": res})["connect_client_cores"] == res["client_cpu_cores"]


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
