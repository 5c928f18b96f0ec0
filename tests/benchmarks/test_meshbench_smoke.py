"""The whole harness at tiny scale (none and ambient, cross-node, about a second per phase,
two interleaved latency rounds, CPUs pinned): results.json, report.md and the plots are
written and well formed, every round measured every scenario, the load generator and the
server app ran on the CPUs the layout states, and ambient's new mTLS handshakes (loadgen
`handshake`) were made and answered. Nothing about speed is asserted; the figures of so
short a run mean nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from meshbench.rounds import pin_plan

ROOT = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n"
RUN_KEYS = {"scenario", "placement", "round", "proxies", "idle", "bulk", "http", "connect", "conns"}


@pytest.mark.netns
@pytest.mark.slow
def test_harness_writes_raw_results_report_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "results"
    argv = [
        sys.executable, "benchmarks/mesh_bench.py", "--quick",
        "--scenarios", "none,ambient", "--placements", "cross-node",
        "--rates", "200", "--seconds", "1", "--conns", "2",
        "--bulk-seconds", "0.5", "--connect-seconds", "0.5", "--handshake-seconds", "0.5",
        "--idle-conns", "20", "--rounds", "2", "--pin", "split",
        "--no-earlier", "--cluster-name", "mbsmoke", "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "(1/2) none cross-node: starting" in done.stdout  # progress is shown

    doc = json.loads((out / "results.json").read_text())
    assert doc["benchmark"] == "mesh_bench"
    assert {r["scenario"] for r in doc["runs"]} == {"none", "ambient"}
    plan = pin_plan("split", sorted(os.sched_getaffinity(0)))
    for r in doc["runs"]:
        assert "error" not in r, r.get("error")
        ph = r["http"]["200"]
        assert ph["answered"] == ph["requests"] == 200
        assert set(ph["latency_ms"]) >= {"p50", "p90", "p99", "p999"}
        assert ph["hist_ns"]["total"] == 200
        assert 0 < ph["client_cpu_cores"] < 4
        if plan:
            assert set(ph["client_cpus"]) == plan["loadgen"]
            assert set(ph["pinned"]["server"]) == plan["server"]
        if r.get("attempt", 0) > 0:
            continue  # a repeat holds only its latency step
        # Every round measures new connections (and, with mTLS, handshakes) side by side.
        assert r["connect"]["connections"] > 0, r["connect"].get("error")
        assert r["settle_s"]["connect"] >= 0
        if r["round"] > 0:
            assert "bulk" not in r and "conns" not in r  # measured once, in round 0
            continue
        assert set(r) >= RUN_KEYS
        assert r["bulk"]["gbit_per_s"] > 0
        assert r["conns"]["opened"] == 20
    # Interleaved: both rounds of both scenarios (a disturbed round adds a repeat).
    got = {(r["scenario"], r["round"]) for r in doc["runs"]}
    assert got == {(s, n) for s in ("none", "ambient") for n in (0, 1)}
    assert "round 2/2" in done.stdout
    amb = next(r for r in doc["runs"] if r["scenario"] == "ambient" and r["round"] == 0)
    assert set(amb["proxies"]) == {"tunnel-node1", "tunnel-node2"}
    assert amb["http"]["200"]["costs"]["total"]["cpu_s"] is not None
    assert amb["connect"]["tunnel_opened"] >= amb["connect"]["connections"]
    # An L4 path: every new client connection reaches the app as a connection of its own
    # (the tunnel's, in the server pod); more only if something else accepted meanwhile.
    for r in doc["runs"]:
        if "connect" in r and r.get("attempt", 0) == 0:
            assert r["connect"]["procs"] == 2 and r["connect"]["workers"] == 16
            assert r["connect"]["server_accepts_per_conn"] >= 1.0, r["connect"]
            assert r["connect"]["conn_ms"]["p50"] > 0
    # The client pod reuses TIME-WAIT ports (the generator's own cost otherwise).
    assert "tcp_tw_reuse" in json.dumps(doc["params"])
    assert "connection churn, round 2/2" in done.stdout
    for rnd in (0, 1):
        each = next(r for r in doc["runs"] if r["scenario"] == "ambient" and r["round"] == rnd)
        assert each["handshake"]["handshakes"] > 0, each["handshake"]
    hs = amb["handshake"]
    assert hs["handshakes"] > 0 and hs["failed"] == 0, hs.get("errors")
    assert hs["handshakes_per_second"] > 0
    assert hs["client_cpu_s"] > 0 and hs["server_cpu_s"] is not None
    assert hs["server_roles"] == ["tunnel-node2"]
    none = next(r for r in doc["runs"] if r["scenario"] == "none" and r["round"] == 0)
    assert "handshake" not in none  # no mTLS, nothing to measure

    md = (out / "report.md").read_text()
    assert "## Targets" in md and "## p99 latency at 200 rps" in md
    assert "## Rounds, spread and the machine" in md and "## Latency and cost per round" in md
    assert "## New mTLS handshakes per second (HBONE CONNECT answered)" in md
    table = [line for line in md.splitlines() if line.startswith("| ambient ")]
    assert table and all(line.count("|") == table[0].count("|") for line in table[:3])
    for name in ("latency_cdf_cross-node.png", "cpu_per_1000.png", "memory.png",
                 "throughput.png", "connections.png"):  # fmt: skip
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, name
        assert f"]({name})" in md
