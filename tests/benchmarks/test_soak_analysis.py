"""The soak benchmark's pure parts: the flatness decision (least-squares slope against the
noise band), percentiles per interval, the answer parser, error kinds, and the summary and
report of a hand-made run."""

from __future__ import annotations

import errno
import math
import random
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from meshbench.hist import Histogram
from soakbench import analysis, report
from soakbench.wire import HELD_OPEN_REQUEST, HELD_REQUEST, AnswerParser, error_kind

TS = [float(t) for t in range(0, 600, 5)]


def test_fit_recovers_a_line_exactly() -> None:
    tr = analysis.fit(TS, [100.0 + 0.5 * t for t in TS])
    assert tr is not None
    assert tr.slope_per_min == pytest.approx(30.0)
    assert tr.intercept == pytest.approx(100.0)
    assert tr.growth == pytest.approx(0.5 * (TS[-1] - TS[0]))
    assert tr.noise == pytest.approx(0.0, abs=1e-9)
    assert not tr.flat  # a clean steady leak is never within noise


def test_noise_alone_is_flat() -> None:
    rng = random.Random(7)
    ys = [50_000.0 + rng.gauss(0.0, 300.0) for _ in TS]
    tr = analysis.fit(TS, ys)
    assert tr is not None and tr.flat
    assert tr.noise == pytest.approx(2 * 300.0, rel=0.25)


def test_leak_above_the_noise_is_not_flat() -> None:
    rng = random.Random(7)
    # 300 kB of noise, 2 kB/s of growth: 1.2 MB over the run, twice the band.
    ys = [50_000.0 + 2.0 * t + rng.gauss(0.0, 300.0) for t in TS]
    tr = analysis.fit(TS, ys)
    assert tr is not None and not tr.flat and tr.grows
    assert tr.growth > tr.noise


def test_a_fall_is_not_growth() -> None:
    tr = analysis.fit(TS, [9000.0 - 2.0 * t for t in TS])  # memory given back
    assert tr is not None and not tr.flat and not tr.grows
    assert analysis.rss_target("t", tr).met is True


def test_small_leak_inside_the_noise_is_flat() -> None:
    rng = random.Random(3)
    ys = [50_000.0 + 0.05 * t + rng.gauss(0.0, 300.0) for t in TS]  # 30 kB in 10 min
    tr = analysis.fit(TS, ys)
    assert tr is not None and tr.flat


def test_warmup_is_left_out() -> None:
    # A steep rise while connections open, flat after it: flat once the warm-up is cut.
    ys: list[float | None] = [1000.0 + 100.0 * t if t < 60 else 7000.0 + (t % 10) for t in TS]
    whole = analysis.fit(TS, [float(y) for y in ys if y is not None])
    tr = analysis.trend_after_warmup(TS, ys, 60.0)
    assert tr is not None and tr.flat and tr.points == len([t for t in TS if t >= 60])
    assert whole is not None and whole.growth > 100 * abs(tr.growth)


def test_missing_values_and_too_few_points() -> None:
    assert analysis.fit([0.0, 1.0, 2.0], [1.0, 2.0, 3.0]) is None
    assert analysis.fit([5.0] * 6, [1.0] * 6) is None  # no spread in time
    t, y = analysis.after_warmup([0.0, 10.0, 20.0], [1.0, None, 3.0], 5.0)
    assert (t, y) == ([20.0], [3.0])
    with pytest.raises(ValueError, match="times but"):
        analysis.fit([0.0, 1.0], [1.0])


def _hist(values_ms: list[float]) -> dict[str, object]:
    h = Histogram()
    h.record_all(int(v * 1e6) for v in values_ms)
    return h.to_json()


def test_percentiles_per_interval_and_merged() -> None:
    first = _hist([1.0] * 99 + [50.0])
    second = _hist([2.0] * 100)
    empty = Histogram().to_json()
    got = analysis.per_interval([first, second, empty])
    assert got[0].count == 100
    assert got[0].p50_ms == pytest.approx(1.0, rel=1e-3)
    assert got[0].p99_ms == pytest.approx(1.0, rel=1e-3)
    assert got[0].max_ms == pytest.approx(50.0, rel=1e-3)
    assert got[1].p99_ms == pytest.approx(2.0, rel=1e-3)
    assert got[2] == analysis.Percentiles(0, None, None, None)
    both = analysis.merged([first, second, empty])
    assert both.count == 200 and both.max_ms == pytest.approx(50.0, rel=1e-3)
    assert both.p50_ms == pytest.approx(2.0, rel=1e-3)  # rank 100 of 99 ones, 100 twos, one 50
    assert analysis.merged([first, second], skip=1).max_ms == pytest.approx(2.0, rel=1e-3)


def test_targets() -> None:
    assert analysis.errors_target({}, {}).met is True
    bad = analysis.errors_target({"connect:ECONNREFUSED": 2}, {"held:no_answer": 1})
    assert bad.met is False and "connect:ECONNREFUSED 2" in bad.measured
    assert analysis.held_target(100, 100, 100).met is True
    assert analysis.held_target(100, 100, 99).met is False
    assert analysis.held_target(100, 98, 98).met is False
    short = analysis.rate_target(1000.0, 480_000, 600.0, 120_000)
    assert short.met is False and "800/s (80% of the target" in short.measured
    assert analysis.rate_target(1000.0, 599_000, 600.0, 0).met is True
    assert analysis.rss_target("t", None).met is None
    assert analysis.busy_cores(1.0, 3.0, 4.0) == pytest.approx(0.5)
    assert analysis.busy_cores(None, 3.0, 4.0) is None


def test_answer_parser() -> None:
    p = AnswerParser()
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    assert p.feed(answer[:10]) == 0
    assert p.feed(answer[10:] + answer) == 2
    assert p.feed(b"HTTP/1.1 200 OK\r\n\r\n") == 1  # no body
    with pytest.raises(ValueError, match="unexpected answer"):
        AnswerParser().feed(b"HTTP/1.1 503 Unavailable\r\nContent-Length: 0\r\n\r\n")
    with pytest.raises(ValueError, match="Content-Length"):
        AnswerParser().feed(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n")
    with pytest.raises(ValueError, match="8 KiB"):
        AnswerParser().feed(b"H" * 9000)


def test_error_kinds() -> None:
    assert error_kind(ConnectionRefusedError(errno.ECONNREFUSED, "x"), "connect") == (
        "connect:ECONNREFUSED"
    )
    assert error_kind(TimeoutError(), "answer") == "answer:timeout"
    assert error_kind(ValueError("bad"), "answer") == "answer:bad_answer"
    assert error_kind(ConnectionError("closed before the answer"), "answer") == (
        "answer:ConnectionError"
    )
    assert error_kind(None, "held") == "held:closed"


# --- summary and report of a hand-made run ----------------------------------------------------


def _run(leak_kb_per_s: float, errors: dict[str, int]) -> dict[str, Any]:
    timeline = []
    for i, t in enumerate(TS[1:40]):
        proxies = {
            "tunnel-node1": {"rss_kb": 60_000 + leak_kb_per_s * t + (i % 3) * 50,
                             "fds": 2100 + i % 5, "cpu_s": 0.4 * t},
            "tunnel-node2": {"rss_kb": 55_000 + (i % 4) * 40, "fds": 2050, "cpu_s": 0.3 * t},
        }  # fmt: skip
        timeline.append(
            {
                "phase": "interval", "t": t, "alive": 2000, "in_flight": 3,
                "new": {"started": 1000, "ok": 1000, "errors": errors if i == 5 else {},
                        "missed_cap": 0, "missed_late": 0, "hist_ns": _hist([2.0] * 10),
                        "lag_hist_ns": _hist([0.1] * 10)},
                "held": {"sent": 660, "ok": 660, "errors": {}, "hist_ns": _hist([1.0] * 5)},
                "gen_cpu_s": 0.2 * t, "proxies": proxies, "host_cpu_s": 1.5 * t,
            }
        )  # fmt: skip
    idle = {"tunnel-node1": {"rss_kb": 40_000, "fds": 30, "cpu_s": 1.0},
            "tunnel-node2": {"rss_kb": 40_000, "fds": 30, "cpu_s": 1.0}}  # fmt: skip
    return {
        "benchmark": "soak", "command": "soak.py --quick", "time": "now",
        "host": {"cpus": 2, "kernel": "6"},
        "params": {"held": 2000, "rate": 200.0, "duration": 195.0, "interval": 5.0,
                   "warmup": 30.0, "held_period": 15.0, "max_in_flight": 500,
                   "placement": "cross-node", "mode": "quick"},
        "limits": {"tunnel-node1": "20000"},
        "idle": idle, "after_held": idle, "after_held_host_cpu_s": 0.0,
        "at_end": idle, "after_close": idle,
        "held_phase": {"requested": 2000, "opened": 2000, "errors": {}, "seconds": 3.0,
                       "cpu_s": 0.0},
        "timeline": timeline,
        "end": {"alive": 2000, "seconds": 195.0},
        "notes": ["a note"],
    }  # fmt: skip


def test_summary_of_a_clean_run() -> None:
    doc = _run(0.0, {})
    s = report.summarize(doc)
    met = {t.name: t.met for t in s["targets"]}
    assert met["zero errors"] is True
    assert met["held connections all open and alive"] is True
    assert met["tunnel-node1: RSS flat"] is True and met["tunnel-node2: no fd growth"] is True
    assert met["new connections per second"] is True  # 1000 per 5 s: the 200/s asked
    assert s["gen_cores_mean"] == pytest.approx(0.2)
    assert s["host_cores_mean"] == pytest.approx(1.5)
    assert s["rates"][0]["gen_cores"] == pytest.approx(0.2)
    assert s["rates"][0]["new_per_s"] == pytest.approx(200.0)
    # node1: 0.4 CPU s per s from 1.0 at the start to 78 at t=195, over 39 000 connections
    assert s["cpu_ms_per_new"]["tunnel-node1"] == pytest.approx((78.0 - 1.0) * 1000 / 39_000)
    assert s["gen_cpu_ms_per_new"] == pytest.approx(39.0 * 1000 / 39_000)
    md = report.render(doc, s, ["rss.png"])
    assert "## Targets" in md and "![rss.png](rss.png)" in md and "- a note" in md
    assert "the whole machine: 1.50 of 2 cores busy" in md
    rows = [line for line in md.splitlines() if line.startswith("| tunnel-node1 |")]
    assert rows and rows[0].count("|") == 13


def test_summary_flags_a_leak_and_errors() -> None:
    doc = _run(20.0, {"connect:ECONNRESET": 3})
    s = report.summarize(doc)
    met = {t.name: t.met for t in s["targets"]}
    assert met["tunnel-node1: RSS flat"] is False
    assert met["tunnel-node2: RSS flat"] is True
    assert met["zero errors"] is False
    assert s["new_errors"] == {"connect:ECONNRESET": 3}
    small = report.summary_json(doc, s)
    assert "hist_ns" not in str(small["timeline"][0])
    assert small["summary"]["trends"]["tunnel-node1"]["rss_kb"]["flat"] is False
    assert not math.isnan(small["summary"]["new_latency"]["p99_ms"])


def test_the_rss_verdict_tells_the_second_half_beside_the_whole_span() -> None:
    """Growth that levels off (an allocator reaching its high mark) and a steady leak fail
    the same verdict over the whole span; the second half's fit tells them apart."""
    ts = [float(t) for t in range(0, 600, 5)]
    levels = [50_000.0 + 2_000.0 * min(t, 300.0) / 300.0 for t in ts]  # +2 MB, then flat
    steady = [50_000.0 + 2_000.0 * t / 600.0 for t in ts]  # +2 MB, on and on
    for ys, late_mb in ((levels, 0.0), (steady, 2_000.0 * (600 - 60 - 5) / 2 / 600 / 1024)):
        whole = analysis.trend_after_warmup(ts, ys, 60.0)
        late = analysis.second_half(ts, ys, 60.0)
        assert whole is not None and late is not None and whole.grows
        target = analysis.rss_target("t", whole, late)
        assert target.met is False
        assert late.growth / 1024 == pytest.approx(late_mb, abs=0.05)
        assert f"second half {late.growth / 1024:+.2f} MB" in target.measured


def test_the_report_says_where_the_memory_went() -> None:
    """The tunnels' /memory at the first judged sample and the last: a tunnel whose Python
    blocks rise is told apart from one whose RSS rises with nothing more in use."""
    doc = _run(0.0, {})
    for i, e in enumerate(doc["timeline"]):
        e["memory"] = {
            "tunnel-node1": {"rss_bytes": 80 * 2**20 + i * 2**16, "python_blocks": 500_000,
                             "arenas": 40, "heap_in_use": 30 * 2**20,
                             "heap_free": 2**20 + i * 2**16, "mmapped": 2**21},
            "tunnel-node2": None if i % 2 else {"rss_bytes": 70 * 2**20,
                                                "python_blocks": 400_000 + 1_000 * i},
        }  # fmt: skip
    warm = [e for e in doc["timeline"] if e["t"] >= doc["params"]["warmup"]]
    first, last = report.memory_marks(doc, "tunnel-node1") or ({}, {})
    assert first["rss_bytes"] == warm[0]["memory"]["tunnel-node1"]["rss_bytes"]
    assert last["rss_bytes"] == warm[-1]["memory"]["tunnel-node1"]["rss_bytes"]
    # node2 did not answer at every sample: the marks are the ones it answered.
    first2, last2 = report.memory_marks(doc, "tunnel-node2") or ({}, {})
    assert last2["python_blocks"] > first2["python_blocks"]
    md = report.render(doc, report.summarize(doc), [])
    assert "## Where the memory is" in md
    row1 = next(line for line in md.splitlines() if line.startswith("| tunnel-node1 | 8"))
    assert "500.0 -> 500.0 (+0.0)" in row1  # the blocks flat
    assert "40.0 -> 40.0 (+0.0)" in row1
    row2 = next(line for line in md.splitlines() if line.startswith("| tunnel-node2 | 70"))
    assert "n/a" in row2  # figures it never gave
    # A run from before the endpoint has no such section.
    assert "## Where the memory is" not in report.render(
        _run(0.0, {}), report.summarize(_run(0.0, {})), []
    )


def test_a_held_connections_first_request_passes_the_small_int_cache() -> None:
    """One request head, keep-alive, and more than 256 bytes: the tunnels' byte counters
    of a held connection leave CPython's small-int cache at its opening, not minutes into
    the judged span (where it read as RSS growth)."""
    assert len(HELD_OPEN_REQUEST) > 256
    assert HELD_OPEN_REQUEST.count(b"\r\n\r\n") == 1 and HELD_OPEN_REQUEST.endswith(b"\r\n\r\n")
    assert HELD_OPEN_REQUEST.startswith(HELD_REQUEST[: HELD_REQUEST.index(b"\r\n\r\n")])
    assert b"connection: close" not in HELD_OPEN_REQUEST.lower()
