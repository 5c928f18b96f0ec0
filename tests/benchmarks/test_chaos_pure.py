"""The chaos benchmark's pure parts: the capture read back, the outage and recovery
arithmetic, the fail-open and stale decisions, the table."""

from __future__ import annotations

import struct
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from chaosbench import event, pcap, probes, report, verdict
from chaosbench.targets import Target

MARK = b"chaos-plaintext-0123456789abcdef"


def _frame(src: str, sport: int, dst: str, dport: int, seq: int, payload: bytes) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, 0x18, 65535, 0, 0)
    total = 20 + len(tcp) + len(payload)
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, total, 0, 0, 64, 6, 0,
        bytes(int(x) for x in src.split(".")), bytes(int(x) for x in dst.split(".")),
    )  # fmt: skip
    eth = b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00"
    return eth + ip + tcp + payload


def _pcap(frames: list[bytes], truncate: int = 0) -> bytes:
    out = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)
    for f in frames:
        out += struct.pack("<IIII", 0, 0, len(f), len(f)) + f
    return out[: len(out) - truncate] if truncate else out


def test_pcap_packets_are_read_with_addresses_ports_and_payload() -> None:
    data = _pcap([_frame("10.1.0.2", 40000, "10.2.0.3", 15008, 7, b"\x17\x03\x03hello")])
    (p,) = pcap.tcp_packets(data)
    assert p.src == ("10.1.0.2", 40000) and p.dst == ("10.2.0.3", 15008)
    assert p.seq == 7 and p.payload == b"\x17\x03\x03hello"


def test_pcap_a_record_cut_short_ends_the_packets() -> None:
    frames = [
        _frame("10.1.0.2", 1, "10.2.0.3", 15008, 1, b"a"),
        _frame("10.1.0.2", 1, "10.2.0.3", 15008, 2, b"b"),
    ]
    assert len(list(pcap.tcp_packets(_pcap(frames, truncate=3)))) == 1


def test_pcap_refuses_what_is_not_a_capture() -> None:
    with pytest.raises(pcap.PcapError, match="magic"):
        list(pcap.tcp_packets(b"x" * 40))
    with pytest.raises(pcap.PcapError, match="24-byte"):
        list(pcap.tcp_packets(b"\xd4\xc3\xb2\xa1"))


def test_marker_found_in_one_packet_and_across_two() -> None:
    whole = _frame("10.1.0.2", 40000, "10.2.0.3", 9000, 100, b"x" + MARK)
    half1 = _frame("10.1.0.2", 40001, "10.2.0.3", 80, 1, MARK[:10])
    half2 = _frame("10.1.0.2", 40001, "10.2.0.3", 80, 11, MARK[10:])
    tls = _frame("10.1.0.2", 40002, "10.2.0.3", 15008, 1, b"\x17\x03\x03" + b"\x00" * 40)
    packets = list(pcap.tcp_packets(_pcap([whole, half1, half2, tls])))
    assert pcap.plaintext_flows(packets, MARK) == [
        (("10.1.0.2", 40000), ("10.2.0.3", 9000)),
        (("10.1.0.2", 40001), ("10.2.0.3", 80)),
    ]
    assert pcap.plaintext_flows(packets[3:], MARK) == []


def test_bypass_is_every_flow_without_the_hbone_port() -> None:
    packets = list(
        pcap.tcp_packets(
            _pcap(
                [
                    _frame("10.1.0.2", 40000, "10.2.0.3", 15008, 1, b""),
                    _frame("10.2.0.3", 15008, "10.1.0.2", 40000, 1, b""),
                    _frame("10.1.0.2", 40001, "10.2.0.3", 9000, 1, b""),
                ]
            )
        )
    )
    assert pcap.bypass_flows(packets) == [(("10.1.0.2", 40001), ("10.2.0.3", 9000))]
    assert pcap.hbone_packets(packets) == 2


def _a(began: float, ok: bool, took: float = 0.01) -> verdict.Attempt:
    return verdict.Attempt(began, began + took, ok, None if ok else "ConnectionRefusedError")


def test_outage_none_failed_is_zero_recovery() -> None:
    o = verdict.outage([_a(9.0, True), _a(10.5, True)], killed_at=10.0)
    assert o == verdict.Outage(1, 0, 0.0)


def test_outage_recovery_is_the_first_success_after_the_last_failure() -> None:
    attempts = [_a(9.0, False), _a(10.1, False), _a(10.3, True), _a(10.6, False), _a(11.2, True)]
    o = verdict.outage(attempts, killed_at=10.0)
    assert (o.attempted, o.failed) == (4, 2)
    assert o.recovery_s == pytest.approx(1.2)
    assert o.first_error == "ConnectionRefusedError"


def test_outage_that_never_ends_has_no_recovery() -> None:
    assert verdict.outage([_a(10.1, True), _a(10.2, False)], 10.0).recovery_s is None


def test_an_attempt_begun_before_the_kill_that_died_with_it_counts() -> None:
    o = verdict.outage([verdict.Attempt(9.9, 10.4, False, "reset"), _a(10.5, True)], 10.0)
    assert o.failed == 1 and o.recovery_s == pytest.approx(0.5)


def test_worked_while_down_counts_only_attempts_inside_the_window() -> None:
    attempts = [_a(9.9, True, 0.2), _a(10.2, True), _a(10.5, False), _a(10.9, True, 0.2)]
    assert verdict.worked_while_down(attempts, 10.0, 11.0) == 1


def test_rules_changed_names_gone_added_and_duplicated_lines() -> None:
    before = {"mesh/a": "x\ny\n", "mesh/b": "x\n", "mesh/c": "x\n"}
    after = {"mesh/a": "x\ny\ny\n", "mesh/b": "", "mesh/c": "x\n"}
    lines = verdict.rules_changed(before, after)
    assert lines[0] == "mesh/a: 1 duplicated lines"
    assert lines[1].startswith("mesh/b: 1 lines gone")
    assert len(lines) == 2


def test_listeners_must_be_there_exactly_once() -> None:
    ok = {15001: 1, 15006: 1, 15008: 1, 9000: 1}
    assert verdict.listener_problems({"mesh/a": ok}) == []
    bad = {"mesh/a": {15001: 2, 15006: 1}}
    assert verdict.listener_problems(bad) == [
        "mesh/a: 2 listeners on 15001",
        "mesh/a: 0 listeners on 15008",
    ]


def test_ss_output_is_counted_per_port() -> None:
    text = (
        "LISTEN 0 128 10.1.0.2:15008 0.0.0.0:*\n"
        "LISTEN 0 128 127.0.0.1:15001 0.0.0.0:*\n"
        "LISTEN 0 128 [::]:15001 [::]:*\n"
        "LISTEN 0 511 0.0.0.0:9000 0.0.0.0:*\n"
    )
    assert probes.listener_counts(text) == {15008: 1, 15001: 2, 9000: 1}


def test_netns_fds_same_as_before_and_at_most_one_per_pod() -> None:
    assert verdict.netns_fd_problems({"n1": 1}, {"n1": 1}, {"n1": 1}) == []
    assert verdict.netns_fd_problems({"n1": 1}, {"n1": 2}, {"n1": 1}) == [
        "n1: tunnel holds 2 netns fds, 1 before"
    ]
    assert verdict.netns_fd_problems({"n1": 3}, {"n1": 3}, {"n1": 1}) == [
        "n1: tunnel holds 3 netns fds for 1 pods"
    ]


def test_a_ca_crash_may_cost_nothing_a_tunnel_crash_may() -> None:
    out = {"l4": verdict.Outage(10, 2, 0.5, "reset"), "l7": verdict.Outage(10, 0, 0.0)}
    assert verdict.unexpected("tunnel", out, {"l4": 2, "l7": 2}) == []
    assert verdict.unexpected("ca", out, {"l4": 0, "l7": 1}) == [
        "l4: 2 new connections failed (reset)",
        "l7: 1 long-lived connections lost",
    ]
    # the waypoint is on the L7 path only
    assert verdict.unexpected("waypoint", out, {"l4": 0, "l7": 0}) == [
        "l4: 2 new connections failed (reset)"
    ]


def _load(worked_while_down: bool) -> dict[str, Any]:
    rows = [[9.0, 9.01, True, None], [10.2, 10.21, False, "refused"], [11.5, 11.51, True, None]]
    if worked_while_down:
        rows.insert(2, [10.4, 10.41, True, None])
    return {
        "attempts": {"l4": rows, "l7": [[9.0, 9.01, True, None], [11.5, 11.51, True, None]]},
        "long": {"l4": [{"ok": False}], "l7": [{"ok": True}]},
    }


def _judge(kind: str, load: dict[str, Any], **kw: Any) -> dict[str, Any]:
    times = {"killed_at": 10.0, "down_at": 10.1, "restarted_at": 11.0, "ready_at": 11.3}
    rules = {"mesh/client": "r\n"}
    args: dict[str, Any] = dict(
        t=Target(kind, f"{kind} x", "p"), iteration=1, times=times, ready=True, load=load,
        packets=list(pcap.tcp_packets(_pcap([_frame("10.1.0.2", 1, "10.2.0.3", 15008, 1, b"")]))),
        mark=MARK, rules_before=rules, rules_down=rules,
        after={"rules": rules, "listeners": {"mesh/client": {15001: 1, 15006: 1, 15008: 1}},
               "fds": {"n1": 1}},
        fds_before={"n1": 1}, pods={"n1": 1}, leftovers=[],
    )  # fmt: skip
    args.update(kw)
    return event.judge(**args)


def test_judge_a_clean_tunnel_crash() -> None:
    rec = _judge("tunnel", _load(False))
    assert rec["clean"], rec["findings"]
    assert rec["paths"]["l4"]["failed"] == 1
    assert rec["paths"]["l4"]["recovery_s"] == pytest.approx(1.5)
    assert rec["down_s"] == pytest.approx(1.0) and rec["ready_s"] == pytest.approx(1.3)


def test_judge_success_while_the_tunnel_was_dead_is_a_bypass() -> None:
    rec = _judge("tunnel", _load(True))
    assert rec["findings"]["bypass"] == ["l4: 1 new connections worked while tunnel x was dead"]
    assert not rec["clean"]


def test_judge_rules_gone_while_down_is_a_bypass_and_after_is_stale() -> None:
    rec = _judge(
        "agent",
        {"attempts": {"l4": [], "l7": []}, "long": {"l4": [], "l7": []}},
        rules_down={"mesh/client": ""},
        leftovers=[4242],
    )
    assert rec["findings"]["bypass"] == ["while down: mesh/client: 1 lines gone (e.g. 'r')"]
    assert rec["findings"]["stale"] == ["pid 4242 of the killed p still runs"]


def test_judge_plaintext_and_non_hbone_flows_are_reported() -> None:
    packets = list(pcap.tcp_packets(_pcap([_frame("10.1.0.2", 40000, "10.2.0.3", 9000, 1, MARK)])))
    rec = _judge("ca", {"attempts": {"l4": [], "l7": []}, "long": {"l4": [], "l7": []}},
                 packets=packets)  # fmt: skip
    assert rec["findings"]["plaintext"] == ["marker in 10.1.0.2:40000 -> 10.2.0.3:9000"]
    assert rec["findings"]["bypass"] == [
        "non-HBONE TCP on the node link: 10.1.0.2:40000 -> 10.2.0.3:9000"
    ]
    assert "the capture saw no HBONE packet" in rec["findings"]["unexpected"][0]


def test_report_one_row_per_target() -> None:
    events = [_judge("tunnel", _load(False)), _judge("tunnel", _load(False))]
    (row,) = report.rows(events)
    assert row["target"] == "tunnel x" and row["iterations"] == "2"
    assert row["failed / attempted"] == "2 / 6"
    assert row["recovery median / max (s)"] == "1.50 / 1.50"
    assert row["long-lived lost"] == "l4 2/2, l7 0/2 (expected: l4 and l7 lost)"
    assert (row["plaintext"], row["bypass"], row["stale"]) == ("none", "none", "none")
    text = report.markdown([row])
    assert text.splitlines()[0].startswith("| target | iterations |")
    assert "| tunnel x | 2 |" in text


def test_attempts_the_load_did_not_make_are_not_failures_of_the_mesh() -> None:
    attempts = [
        _a(10.1, False),
        _a(10.5, True),
        verdict.Attempt(10.6, 10.6, False, "not made: 256"),
    ]
    o = verdict.outage(attempts, 10.0)
    assert (o.attempted, o.failed) == (2, 1)
    assert o.recovery_s == pytest.approx(0.5)


def test_rejudge_counts_again_from_the_timeline() -> None:
    rec = _judge("tunnel", _load(False))
    rec["paths"]["l4"]["timeline"].append([11.6, 11.6, False, "not made: 64 attempts in flight"])
    rec["paths"]["l4"]["failed"] = 99
    out = report.rejudge(rec)
    assert out["paths"]["l4"]["failed"] == 1 and out["paths"]["l4"]["not_made"] == 1
    assert out["paths"]["l4"]["recovery_s"] == pytest.approx(1.5)
