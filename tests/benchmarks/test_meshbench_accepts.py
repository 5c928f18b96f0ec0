"""How many connections the server pod accepted per new client connection, from the
kernel's own count (/proc/<pid>/net/snmp, per network namespace): it tells a proxy that
re-uses its connections to the app (L7 pooling) from one that opens one per client
connection (an L4 proxy must), which the new-connection rates alone do not show."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from meshbench.costs import parse_tcp_passive_opens, passive_opens
from meshbench.report import flatten

SNMP = (
    "Ip: Forwarding DefaultTTL\nIp: 2 64\n"
    "Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens AttemptFails\n"
    "Tcp: 1 200 120000 -1 17 42 0\n"
    "Udp: InDatagrams\nUdp: 5\n"
)


def test_passive_opens_is_read_by_the_field_name() -> None:
    assert parse_tcp_passive_opens(SNMP) == 42


@pytest.mark.parametrize("text", ["", "Tcp: A B\nTcp: 1 2\n", "Tcp: PassiveOpens\n"])
def test_a_table_without_the_field_is_a_clear_error(text: str) -> None:
    with pytest.raises(ValueError, match="PassiveOpens"):
        parse_tcp_passive_opens(text)


def test_the_count_follows_real_accepts_and_a_gone_process_reads_none() -> None:
    before = passive_opens(os.getpid())
    assert before is not None
    srv = socket.create_server(("127.0.0.1", 0))
    clients = [socket.create_connection(srv.getsockname()) for _ in range(3)]
    accepted = [srv.accept()[0] for _ in range(3)]
    after = passive_opens(os.getpid())
    for s in (*clients, *accepted, srv):
        s.close()
    # Other tests of this machine may accept in the same namespace meanwhile: at least 3.
    assert after is not None and after - before >= 3
    assert passive_opens(2**22 + 1) is None  # above any pid_max: no such process


def test_the_figure_reaches_the_report() -> None:
    run = {"connect": {"per_second": 10.0, "server_accepts_per_conn": 0.02,
                       "conn_ms": {"p50": 1.5, "p99": 4.0}}}  # fmt: skip
    flat = flatten(run)
    assert flat["server_accepts_per_conn"] == 0.02
    assert flat["conn_ms_p50"] == 1.5 and flat["conn_ms_p99"] == 4.0
