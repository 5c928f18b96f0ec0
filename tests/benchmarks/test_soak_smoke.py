"""soak.py at tiny scale (50 held, 50 new connections/s for 6 s, cross-node through both
tunnels): results.json, summary.json, report.md and the plots are written and well formed,
the clean run reports zero errors, every held connection alive, and a slope figure for
each tunnel's RSS and fds. Nothing about speed or flatness is asserted: a run this short
means nothing for either."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n"
TUNNELS = {"tunnel-node1", "tunnel-node2"}


@pytest.mark.netns
def test_soak_writes_a_clean_report(tmp_path: Path) -> None:
    out = tmp_path / "soak"
    argv = [
        sys.executable, "benchmarks/soak.py", "--held", "50", "--rate", "50",
        "--duration", "6", "--interval", "1", "--warmup", "2", "--held-period", "10",
        "--cluster-name", "soaksmoke", "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=180)
    # 1 would be a target not met (flatness over 6 s is noise); the figures are checked below.
    assert done.returncode in (0, 1), done.stdout[-3000:] + done.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    assert "error" not in doc, doc.get("error")
    assert doc["held_phase"]["opened"] == 50 and doc["end"]["alive"] == 50
    assert len(doc["timeline"]) >= 5
    assert set(doc["idle"]) == TUNNELS
    for e in doc["timeline"]:
        assert set(e["proxies"]) == TUNNELS and all(e["proxies"].values())
        # Each tunnel's own account of its memory, read from its admin inside its netns.
        assert set(e["memory"]) == TUNNELS
        for m in e["memory"].values():
            assert m["python_blocks"] > 0 and m["rss_bytes"] > 0 and m["heap_in_use"] > 0
    assert sum(e["new"]["ok"] for e in doc["timeline"]) > 0
    assert sum(e["held"]["ok"] for e in doc["timeline"]) > 0
    assert doc["after_close"]["tunnel-node1"]["fds"] < doc["at_end"]["tunnel-node1"]["fds"]
    assert 0 < doc["close_settle_s"] <= 31.0
    # The kernel's counters of each namespace on the path, read over the churn: the client
    # pod's saw the generator's connects (no attempt failed in a clean run).
    churn = doc["tcp_counters"]["churn"]
    client = next(v for k, v in churn.items() if k.startswith("client pod"))
    assert {"Tcp.AttemptFails", "TcpExt.ListenOverflows", "TcpExt.TCPSynRetrans"} <= set(client)
    assert client["Tcp.AttemptFails"] == 0
    assert any(k.startswith("server pod") for k in churn)
    assert {k for k in churn if k.endswith("(node)")} == {f"{t} (node)" for t in TUNNELS}

    summary = json.loads((out / "summary.json").read_text())["summary"]
    targets = {t["name"]: t for t in summary["targets"]}
    assert targets["zero errors"]["met"] is True, targets["zero errors"]["measured"]
    assert targets["held connections all open and alive"]["met"] is True
    for role in TUNNELS:
        for key in ("rss_kb", "fds"):
            trend = summary["trends"][role][key]
            assert trend is not None and isinstance(trend["slope_per_min"], float)
        assert targets[f"{role}: RSS flat"]["met"] in (True, False)

    md = (out / "report.md").read_text()
    assert "## Targets" in md and "| zero errors | 0 |" in md and "| met |" in md
    assert "RSS flat" in md and "noise band" in md
    assert "## Where the memory is" in md
    assert "## Kernel TCP counters over the churn" in md and "| ListenOverflows |" in md
    for name in ("rss.png", "fds.png", "errors.png", "latency.png", "rate.png", "cpu.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, name
        assert f"]({name})" in md
