"""The report from raw results: aggregation, ratios, the targets, Markdown and plots; and
the /proc parsing of the cost sampler."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import meshbench.costs as costs
import meshbench.report as report
from meshbench.hist import Histogram

PNG = b"\x89PNG\r\n\x1a\n"


def run(
    scenario: str,
    *,
    gbit: float,
    p99: float,
    cpu: float | None,
    placement: str = "cross-node",
    rnd: int = 0,
    idle_mb: float = 30.0,
    per_conn_kb: float = 4.0,
    handshakes: float | None = None,
) -> dict[str, Any]:
    h = Histogram()
    h.record_all(int(p99 * 1e6 * f) for f in (0.3, 0.5, 0.6, 0.9, 1.0))
    tunnels = scenario in ("ambient", "sidecar")
    c = {"total": {"cpu_s_per_1000_req": cpu, "rss_kb": 2048.0 if cpu is not None else None}}
    if tunnels:
        c["tunnel-node1"] = {"cpu_s_per_1000_req": cpu}
    out: dict[str, Any] = {
        "scenario": scenario,
        "placement": placement,
        "round": rnd,
        "idle": {"tunnel-node1": {"rss_kb": idle_mb * 1024}} if tunnels else {},
        "bulk": {"gbit_per_s": gbit},
        "http": {
            "1000": {
                "latency_ms": {"p50": p99 / 2, "p90": p99 * 0.9, "p99": p99, "p999": p99},
                "achieved_rps": 1000.0,
                "unanswered": 0,
                "hist_ns": h.to_json(),
                "costs": c,
            }
        },
        "connect": {"per_second": 500.0},
        "conns": {"bytes_per_connection": per_conn_kb * 1024},
    }
    if handshakes is not None:
        out["handshake"] = {
            "handshakes_per_second": handshakes,
            "client_cpu_cores": 0.5,
            "server_cpu_ms_per_handshake": 1000.0 / handshakes,
        }
    return out


def doc() -> dict[str, Any]:
    return {
        "time": "now",
        "params": {"mode": "quick", "rounds": 2},
        "runs": [
            run("none", gbit=10.0, p99=1.0, cpu=None),
            run("none", gbit=12.0, p99=1.2, cpu=None, rnd=1),
            run("ambient", gbit=4.0, p99=1.1, cpu=0.05, handshakes=300.0),
            run("ambient", gbit=4.0, p99=1.1, cpu=0.05, rnd=1, idle_mb=50.0, handshakes=500.0),
            run("relay", gbit=5.0, p99=1.05, cpu=0.02) | {"dead_proxies": ["relay-a"]},
            run("sidecar", gbit=2.0, p99=1.6, cpu=0.2, handshakes=200.0),
            {"scenario": "relay", "placement": "same-node", "round": 0, "error": "boom"},
        ],
        "skipped": [{"scenario": "sidecar-haproxy", "reason": "module does not import"}],
        "earlier": {"rbac_check": {"error": "exit 1"}},
    }


def test_aggregate_takes_medians_and_leaves_failed_runs_out() -> None:
    agg = report.aggregate(doc()["runs"])
    assert agg[("none", "cross-node")]["bulk_gbit"] == pytest.approx(11.0)
    assert agg[("none", "cross-node")]["p99_ms@1000"] == pytest.approx(1.1)
    assert ("relay", "same-node") not in agg
    assert "cpu_s_per_1000@1000" not in agg[("none", "cross-node")]
    assert agg[("ambient", "cross-node")]["idle_rss_mb"] == pytest.approx(30.0)  # the cold one


def test_targets_verdicts() -> None:
    ts = {t.name: t for t in report.targets(report.aggregate(doc()["runs"]))}
    assert ts["ambient / relay throughput"].value == pytest.approx(0.8)
    assert ts["ambient / relay throughput"].met is True
    assert ts["ambient / none throughput"].value == pytest.approx(4 / 11)
    assert ts["ambient added p99 at 1000 rps"].value == pytest.approx(0.0)
    assert ts["ambient added p99 at 1000 rps"].met is True
    # sidecar adds 0.5 ms, ambient 0: ratio 0, met; CPU 0.05 / 0.2 = 0.25, met.
    assert ts["ambient / sidecar added p99"].met is True
    assert ts["ambient / sidecar CPU per 1000 req"].value == pytest.approx(0.25)
    assert ts["tunnel vCPU per 1000 rps (busiest tunnel)"].met is True
    assert ts["tunnel idle RSS (largest tunnel)"].value == pytest.approx(30.0)
    assert ts["memory per open connection (all tunnels)"].value == pytest.approx(4.0)


def test_a_missed_target_is_reported_as_missed() -> None:
    runs = [run("none", gbit=10.0, p99=1.0, cpu=None), run("ambient", gbit=2.0, p99=2.0, cpu=0.3)]
    ts = {t.name: t for t in report.targets(report.aggregate(runs))}
    assert ts["ambient / none throughput"].met is False
    assert ts["ambient added p99 at 1000 rps"].value == pytest.approx(1.0)
    assert ts["ambient added p99 at 1000 rps"].met is False
    assert ts["ambient / relay throughput"].met is None  # no relay row: not measured


def test_the_targets_against_sidecar_haproxy() -> None:
    """Judged only when the HAProxy pair ran: new connections (>= 0.7x), proxy CPU per 1000
    requests (<= 1.0x) and new mTLS handshakes (>= 1.0x)."""
    hap = run("sidecar-haproxy", gbit=3.0, p99=1.4, cpu=0.1, handshakes=400.0)
    hap["connect"] = {"per_second": 1000.0}
    amb = run("ambient", gbit=4.0, p99=1.1, cpu=0.15, handshakes=300.0)
    amb["connect"] = {"per_second": 800.0}
    runs = [run("none", gbit=10.0, p99=1.0, cpu=None), amb, hap]
    ts = {t.name: t for t in report.targets(report.aggregate(runs))}
    conn = ts["ambient / sidecar-haproxy new connections per second"]
    assert conn.value == pytest.approx(0.8) and conn.met is True
    cpu = ts["ambient / sidecar-haproxy proxy CPU per 1000 req"]
    assert cpu.value == pytest.approx(1.5) and cpu.met is False
    hs = ts["ambient / sidecar-haproxy new mTLS handshakes per second"]
    assert hs.value == pytest.approx(0.75) and hs.met is False
    # Without the HAProxy pair the three are not listed at all.
    without = {t.name for t in report.targets(report.aggregate(runs[:2]))}
    assert not any("haproxy" in n for n in without)
    table = report.targets_table(report.targets(report.aggregate(runs)))
    assert "ambient / sidecar-haproxy new connections per second" in table


def _churn(scenario: str, rnd: int, conns: float, hs: float | None) -> dict[str, Any]:
    """A later round's record: its latency step and its two churn phases."""
    out = run(scenario, gbit=1.0, p99=1.0, cpu=0.1, rnd=rnd)
    for once in ("bulk", "conns", "idle"):
        del out[once]
    out["connect"] = {"per_second": conns}
    if hs is not None:
        out["handshake"] = {"handshakes_per_second": hs}
    return out


def test_churn_targets_are_the_median_of_the_rounds_own_ratios() -> None:
    """Each round's ambient and HAProxy were measured back to back: the target takes the
    median of the per-round ratios, with their spread. HAProxy's fast round 2 would pull
    a ratio of the medians (800 / 1000 = 0.8) away from what every round says."""
    runs = [
        _churn("sidecar-haproxy", 0, 1000.0, 400.0),
        _churn("ambient", 0, 800.0, 380.0),
        _churn("sidecar-haproxy", 1, 2000.0, 500.0),
        _churn("ambient", 1, 900.0, 510.0),
        _churn("sidecar-haproxy", 2, 950.0, 400.0),
        _churn("ambient", 2, 700.0, 410.0),
    ]
    assert report.paired_ratio(runs, "ambient", "sidecar-haproxy", "cross-node", "conn_per_s") == (
        pytest.approx([0.8, 0.45, 700.0 / 950.0])
    )
    ts = {t.name: t for t in report.targets(report.aggregate(runs), runs=runs)}
    conn = ts["ambient / sidecar-haproxy new connections per second"]
    assert conn.value == pytest.approx(700.0 / 950.0) and conn.met is True
    assert conn.spread is not None and conn.spread.n == 3
    assert conn.spread.low == pytest.approx(0.45) and conn.spread.high == pytest.approx(0.8)
    hs = ts["ambient / sidecar-haproxy new mTLS handshakes per second"]
    assert hs.value == pytest.approx(1.02) and hs.met is True
    # A round where one of the pair has no figure (its phase failed) pairs nothing.
    runs[5]["connect"] = {"error": "BenchError: connect phase timed out"}
    ts = {t.name: t for t in report.targets(report.aggregate(runs), runs=runs)}
    conn = ts["ambient / sidecar-haproxy new connections per second"]
    assert conn.spread is not None and conn.spread.n == 2
    assert conn.value == pytest.approx((0.8 + 0.45) / 2)
    # The failed phase is told in the notes, and the round's other figures still count.
    md = report.render({"runs": runs, "params": {}}, [])
    assert (
        "- ambient cross-node round 2: connect failed (BenchError: connect phase timed out)" in md
    )
    assert report.spreads(runs)[("ambient", "cross-node")]["p99_ms@1000"].n == 3


def _tables(md: str) -> list[list[str]]:
    tables: list[list[str]] = []
    current: list[str] = []
    for line in [*md.splitlines(), ""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    return tables


def test_markdown_tables_are_well_formed_and_show_ratios() -> None:
    md = report.render(doc(), ["throughput.png"])
    assert md.startswith("# Mesh cost benchmark")
    assert "## Targets" in md and "## Single-connection throughput" in md
    tables = _tables(md)
    assert len(tables) >= 8
    for t in tables:
        widths = {line.count("|") for line in t}
        assert len(widths) == 1, t
        assert set(t[1].replace("|", "")) == {"-"}
    tput = next(t for t in tables if "Gbit/s" in t[0])
    amb = next(line for line in tput if line.startswith("| ambient "))
    # ambient 4.0 Gbit/s in both its rounds (min..max beside the median): x none 4/11,
    # x sidecar 4/2.
    assert "| 4.00 (4.00..4.00) | 0.36 | 2.00 |" in amb
    assert "sidecar-haproxy: skipped" in md
    assert "relay same-node round 0: failed (boom)" in md
    assert "proxy process(es) relay-a gone" in md
    assert "rbac_check: not run (exit 1)" in md
    assert "![throughput.png](throughput.png)" in md


def test_the_header_names_the_interpreter_and_where_it_was_built() -> None:
    # Every process of a run uses one interpreter, and its build moves every CPU figure.
    first = report.render(doc() | {"host": {"python": "3.11.2", "python_prefix": "/usr"}}, [])
    assert "Python 3.11.2 (/usr);" in first.splitlines()[2]
    older = report.render(doc() | {"host": {"python": "3.11.7"}}, [])  # before the prefix
    assert "Python 3.11.7;" in older.splitlines()[2]


def test_handshake_rows_show_the_median_and_the_ratio_to_sidecar() -> None:
    agg = report.aggregate(doc()["runs"])
    assert agg[("ambient", "cross-node")]["handshakes_per_s"] == pytest.approx(400.0)
    assert "handshakes_per_s" not in agg[("none", "cross-node")]
    md = report.render(doc(), [])
    table = next(t for t in _tables(md) if "handshakes/s" in t[0])
    assert "## New mTLS handshakes per second (HBONE CONNECT answered)" in md
    amb = next(line for line in table if line.startswith("| ambient "))
    # ambient 400/s (median of 300 and 500, both shown); none has none (n/a); x sidecar
    # 400/200.
    assert "| 400 (300..500) | n/a | 2.00 |" in amb
    assert any("cores" in t[0] for t in _tables(md))
    assert any("CPU ms" in t[0] for t in _tables(md))


def test_write_report_writes_pngs(tmp_path: Path) -> None:
    path = report.write_report(doc(), tmp_path)
    assert path.read_text(encoding="utf-8").startswith("# Mesh cost benchmark")
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == [
        "connections.png",
        "cpu_per_1000.png",
        "latency_cdf_cross-node.png",
        "memory.png",
        "throughput.png",
    ]
    for p in tmp_path.glob("*.png"):
        data = p.read_bytes()
        assert data.startswith(PNG) and len(data) > 5000


def test_stat_parsing_survives_spaces_and_parentheses_in_the_name() -> None:
    fields = ["S"] + ["0"] * 10 + ["250", "150"] + ["0"] * 30
    text = "1234 (we ird) (name) " + " ".join(fields)
    assert costs.parse_stat_cpu(text, ticks=100) == pytest.approx(4.0)


def test_own_process_is_sampled_from_proc() -> None:
    u = costs.sample({"me": [os.getpid()]})["me"]
    assert u is not None and u.rss_kb > 1000 and u.cpu_s > 0
    gone = costs.sample({"gone": [os.getpid(), 2**22 + 1]})
    assert gone["gone"] is None


def test_load_costs_per_1000_requests() -> None:
    before = {"a": costs.Usage(1.0, 1000), "b": costs.Usage(2.0, 500)}
    after = {"a": costs.Usage(1.5, 1100), "b": costs.Usage(2.1, 500)}
    out = costs.load_costs(before, after, 2000)
    assert out["a"]["cpu_s_per_1000_req"] == pytest.approx(0.25)
    assert out["total"]["cpu_s_per_1000_req"] == pytest.approx(0.3)
    assert out["total"]["rss_kb"] == 1600
    assert costs.load_costs({"a": None}, after, 10)["total"]["cpu_s"] is None
    assert costs.bytes_per_connection(1000, 1010, 10) == pytest.approx(1024.0)
    assert costs.bytes_per_connection(None, 1010, 10) is None


def test_ambient_below_baseline_counts_as_no_added_latency() -> None:
    runs = [
        run("none", gbit=10.0, p99=2.0, cpu=None),
        run("ambient", gbit=4.0, p99=1.5, cpu=0.05),
        run("sidecar", gbit=2.0, p99=3.0, cpu=0.2),
    ]
    ts = {t.name: t for t in report.targets(report.aggregate(runs))}
    assert ts["ambient added p99 at 1000 rps"].value == pytest.approx(-0.5)
    assert ts["ambient / sidecar added p99"].value == 0.0
    assert ts["ambient / sidecar added p99"].met is True
