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
    # Each connection's time to its whole answer, as a histogram summary in ms.
    assert res["conn_ms"]["count"] == 20 and 0 < res["conn_ms"]["p50"] <= res["conn_ms"]["p99"]
    assert res["client_cpu_us_per_conn"] == pytest.approx(res["client_cpu_s"] * 1e6 / 20)


def test_workers_spread_over_processes_make_their_shares_and_sum_up(answering: int) -> None:
    """Two forked processes, three threads: every attempt is made once, the counts, kinds,
    times and CPU of both processes are summed."""
    res = connect("127.0.0.1", answering, 10.0, 3, count=31, procs=2)
    assert res["connections"] == 31 and res["failed"] == 0
    assert res["procs"] == 2 and res["workers"] == 3
    assert res["conn_ms"]["count"] == 31
    assert res["client_cpu_s"] > 0
    # More processes than threads would leave one idle: capped at the threads.
    assert connect("127.0.0.1", answering, 10.0, 1, count=3, procs=4)["procs"] == 1
    # Fewer attempts than threads: the threads without a share make none (not: unbounded
    # until the deadline).
    few = connect("127.0.0.1", answering, 10.0, 8, count=3, procs=2)
    assert few["connections"] == 3 and few["seconds"] < 5.0


def test_a_refused_port_is_counted_across_processes() -> None:
    res = connect("127.0.0.1", _closed_port(), 5.0, 2, count=10, procs=2)
    assert res["connections"] == 0 and res["failed"] == 10
    assert res["errors"] == {"ECONNREFUSED": 10} and res["conn_ms"] is None


def test_an_answer_split_across_reads_and_a_bad_status_are_told_apart() -> None:
    pieces = (b"HTTP/1.1 200 OK\r\nContent-Le", b"ngth: 4\r\n\r\nab", b"cd")
    with closing_server(pieces, pause=0.02) as port:
        res = connect("127.0.0.1", port, 5.0, 1, count=3)
    assert res["connections"] == 3, res["errors"]
    with closing_server(b"HTTP/1.1 503 No\r\nContent-Length: 0\r\n\r\n") as port:
        res = connect("127.0.0.1", port, 5.0, 1, count=2)
    assert res["connections"] == 0 and res["errors"] == {"ConnectionError": 2}
    # A body cut short by the server's close is a failure, not an answer.
    with closing_server(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nab") as port:
        res = connect("127.0.0.1", port, 5.0, 1, count=2)
    assert res["connections"] == 0 and res["errors"] == {"ConnectionError": 2}


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
