"""The soak's kernel TCP counters (soakbench/tcpstats.py) and their report section: pure,
on hand-made /proc texts, plus one read of this process's own namespace."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from soakbench import report, tcpstats

SNMP = """Ip: Forwarding DefaultTTL
Ip: 1 64
Tcp: RtoAlgorithm ActiveOpens AttemptFails EstabResets RetransSegs OutRsts
Tcp: 1 120 3 4 17 9
Udp: InDatagrams
Udp: 5
"""
NETSTAT = """TcpExt: SyncookiesSent ListenOverflows ListenDrops TCPSynRetrans TCPTimeouts
TcpExt: 0 2 5 7 11
IpExt: InNoRoutes
IpExt: 0
"""


def test_parse_takes_the_named_counters_of_each_section() -> None:
    got = tcpstats.parse(SNMP, NETSTAT)
    assert got == {
        "Tcp.AttemptFails": 3,
        "Tcp.EstabResets": 4,
        "Tcp.RetransSegs": 17,
        "Tcp.OutRsts": 9,
        "TcpExt.ListenOverflows": 2,
        "TcpExt.ListenDrops": 5,
        "TcpExt.TCPSynRetrans": 7,
        "TcpExt.TCPTimeouts": 11,
    }


def test_parse_skips_what_it_cannot_read() -> None:
    # A head and values of different sections, a value that is no number, a lone line.
    bad = "Tcp: AttemptFails OutRsts\nUdp: 1 2\nTcpExt: ListenDrops TCPTimeouts\nTcpExt: x 4\nTcp:"
    assert tcpstats.parse(bad) == {"TcpExt.TCPTimeouts": 4}
    assert tcpstats.parse("") == {}


def test_softnet_sums_the_second_column_in_hex_and_refuses_garbage() -> None:
    text = "01bb01f0 0000000a 000001ae\n01a662e5 00000010 00000197\n"
    assert tcpstats.softnet_dropped(text) == 26
    assert tcpstats.softnet_dropped("01bb01f0 zz 0\n") is None


def test_delta_only_over_counters_in_both_readings() -> None:
    before = {"Tcp.OutRsts": 3, "TcpExt.ListenDrops": 1}
    after = {"Tcp.OutRsts": 10, "Tcp.RetransSegs": 5}
    assert tcpstats.delta(before, after) == {"Tcp.OutRsts": 7}
    assert tcpstats.delta(None, after) == {}


def test_read_of_this_process_and_of_no_process() -> None:
    got = tcpstats.read(os.getpid())
    assert got is not None and "TcpExt.ListenOverflows" in got and "Tcp.RetransSegs" in got
    assert tcpstats.read(2**22 + 7) is None  # above pid_max's ceiling: no such process


def test_report_section_lists_each_namespace_and_the_backlog_drops() -> None:
    doc = {
        "tcp_counters": {
            "churn": {
                "client pod": {"TcpExt.TCPSynRetrans": 12, "TcpExt.ListenOverflows": 0},
                "tunnel-node1 (node)": {"TcpExt.TCPSynRetrans": 0},
            },
            "softnet_dropped": 3,
        }
    }
    lines = report._tcp_counters(doc)
    assert "## Kernel TCP counters over the churn" in lines
    assert "| counter | meaning | client pod | tunnel-node1 (node) |" in lines
    assert any(x.startswith("| TCPSynRetrans | ") and x.endswith("| 12 | 0 |") for x in lines)
    assert any(x.startswith("| ListenOverflows | ") and x.endswith("| 0 | n/a |") for x in lines)
    assert lines[-1].endswith(": 3.")
    assert report._tcp_counters({}) == []
