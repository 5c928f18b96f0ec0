"""`ambientctl logs` and `access-log`, the pure parts: `--since` durations, dating and
merging log lines, choosing the last N, and the access-log table (golden)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ambientctl import accesslog
from ambientctl.logfilter import (
    Entry,
    LogUsage,
    complete_lines,
    entries,
    parse_duration,
    render,
    select,
    timestamp_of,
)
from tests.ambientctl.golden import check

T0 = 1_796_000_000.0  # an instant in 2026


def iso(t: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


def line(t: float, event: str, **fields: Any) -> str:
    return json.dumps({"event": event, "timestamp": iso(t), "level": "info", **fields})


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("5m", 300), ("1h30m", 5400), ("2d", 172800), ("1.5h", 5400), ("250ms", 0.25)],
)
def test_durations_as_kubectl_takes_them(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "m", "5 m", "-5m", "5min", "1h 30m", "5m!"])
def test_a_duration_without_a_unit_or_with_junk_is_refused(text: str) -> None:
    with pytest.raises(LogUsage, match=r"expected e\.g\. 30s"):
        parse_duration(text)


def test_timestamps_of_json_lines_only() -> None:
    assert timestamp_of(line(T0, "x")) == pytest.approx(T0)
    assert timestamp_of("plain text") is None
    assert timestamp_of('{"event": "no time"}') is None
    assert timestamp_of('{"timestamp": "2026-12-02T10:00:00"}') is None  # naive: not ours
    assert timestamp_of("{not json") is None


def test_undated_lines_take_the_time_around_them() -> None:
    lines = ["starting", line(T0, "a"), "Traceback: under a", line(T0 + 5, "b")]
    got = entries("src", lines, mtime=T0 + 60)
    assert (
        [(e.text[:10], e.when) for e in got]
        == [
            ("starting", T0),  # before the first timestamp: no later than it
            (lines[1][:10], T0),
            ("Traceback:", T0),  # after a dated line: that line's time
            (lines[3][:10], T0 + 5),
        ]
    )
    # A file with no timestamp at all: its modification time.
    assert [e.when for e in entries("app", ["a", "b"], mtime=T0)] == [T0, T0]


def test_sources_merge_in_time_order_and_since_and_tail_apply_to_the_merge() -> None:
    n1 = entries("node1", [line(T0, "1"), line(T0 + 20, "3")], T0 + 20)
    n2 = entries("node2", [line(T0 + 10, "2"), line(T0 + 30, "4")], T0 + 30)
    merged = select([n1, n2], None, None)
    assert [json.loads(e.text)["event"] for e in merged] == ["1", "2", "3", "4"]
    assert [e.source for e in select([n1, n2], T0 + 10, None)] == ["node2", "node1", "node2"]
    assert [e.source for e in select([n1, n2], None, 1)] == ["node2"]
    assert select([n1, n2], None, 0) == []
    assert select([n1, n2], T0 + 31, None) == []


def test_prefix_as_kubectl_logs_prefix() -> None:
    e = Entry("ztunnel/node1", "hello", T0)
    assert render(e, True) == "[ztunnel/node1] hello"
    assert render(e, False) == "hello"


def test_a_follower_keeps_the_unfinished_line() -> None:
    assert complete_lines("a\nb\nc") == (["a", "b"], "c")
    assert complete_lines("a\n") == (["a"], "")


# ---- the access log ------------------------------------------------------------------------

FRONTEND = "spiffe://cluster.local/ns/travel/sa/frontend"
PRICING = "spiffe://cluster.local/ns/travel/sa/pricing"


def outbound(t: float, **extra: Any) -> str:
    return line(
        t,
        "connection complete",
        direction="outbound",
        **{
            "src.addr": "10.244.1.10:40312",
            "src.workload": "frontend-0",
            "src.namespace": "travel",
            "src.identity": FRONTEND,
            "dst.addr": "10.244.2.20:8080",
            "dst.hbone_addr": "10.244.2.20:15008",
            "dst.service": "pricing.travel.svc.cluster.local",
            "dst.workload": "pricing-0",
            "dst.namespace": "travel",
            "dst.identity": PRICING,
        },
        bytes_sent=120,
        bytes_recv=3400,
        duration="12.5ms",
        **extra,
    )


def sample_records() -> list[accesslog.Record]:
    node1 = entries(
        "node1",
        [
            line(T0, "policies loaded", count=1),
            outbound(T0 + 1),
            outbound(T0 + 3, error="destination answered 401: denied by policy"),
        ],
        T0 + 3,
    )
    inbound = json.dumps(
        {
            "event": "connection complete",
            "timestamp": iso(T0 + 2),
            "direction": "inbound_plaintext",
            "src.addr": "10.244.1.30:51000",
            "dst.addr": "10.244.2.20:8080",
            "dst.workload": "pricing-0",
            "dst.namespace": "travel",
            "authorization_policy": "travel/pricing-from-flights#0",
            "bytes_sent": 0,
            "bytes_recv": 0,
            "duration": "0.4ms",
            "error": "denied by ALLOW policies: none matched",
        }
    )
    node2 = entries("node2", [inbound, "a line that is not JSON"], T0 + 2)
    records = [accesslog.record_of(e) for e in select([node1, node2], None, None)]
    return [r for r in records if r is not None]


def test_only_connection_lines_become_records() -> None:
    records = sample_records()
    assert [(r.node, r.doc["direction"]) for r in records] == [
        ("node1", "outbound"),
        ("node2", "inbound_plaintext"),
        ("node1", "outbound"),
    ]


@pytest.mark.parametrize(
    ("pod", "identity", "count"),
    [
        ("travel/pricing-0", None, 3),  # the destination of all three
        ("pricing-0", None, 3),  # a bare name: any namespace
        ("travel/frontend-0", None, 2),
        ("other/frontend-0", None, 0),
        (None, FRONTEND, 2),
        (None, "cluster.local/ns/travel/sa/frontend", 2),  # a policy's principal form
        (None, PRICING, 2),  # the destination's identity, on the outbound lines
        ("travel/frontend-0", PRICING, 2),
        (None, "spiffe://cluster.local/ns/x/sa/y", 0),
    ],
)
def test_filter_by_pod_and_identity(pod: str | None, identity: str | None, count: int) -> None:
    got = [r for r in sample_records() if accesslog.matches(r, pod, identity)]
    assert len(got) == count


def test_access_log_table_golden() -> None:
    check("access_log", accesslog.render_table(sample_records()))


def test_access_log_follow_rows_golden() -> None:
    records = sample_records()
    text = accesslog.render_follow(records[:1], header=True)
    text += accesslog.render_follow(records[1:], header=False)
    check("access_log_follow", text)


def test_no_connections() -> None:
    assert accesslog.render_table([]) == "No connections found.\n"


def test_access_log_json_is_the_raw_lines_with_their_node() -> None:
    doc = json.loads(accesslog.render_json(sample_records()))
    assert doc[0]["node"] == "node1" and doc[0]["src.identity"] == FRONTEND
    assert doc[1]["authorization_policy"] == "travel/pricing-from-flights#0"
