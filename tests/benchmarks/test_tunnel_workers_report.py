"""benchmarks/tunnel_workers.py's summary and table, from raw rows (no cluster)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import tunnel_workers


def _row(workers: int, rps: float, rss: dict[str, float]) -> dict[str, Any]:
    names = [f"{n}/{i}" for n in ("node1", "node2") for i in range(workers)]
    return {
        "workers": workers,
        "requests_per_s": rps,
        "gbit_per_s": 2.0,
        "machine_cores_busy_rr": 1.9,
        "machine_cores_busy_tput": 1.8,
        "machine_cores_stolen_rr": 0.1,
        "machine_cores_stolen_tput": 0.1,
        "cores_rr": {n: 0.2 for n in names},
        "cores_tput": {n: 0.3 for n in names},
        "rss_mb_idle": rss,
    }


def test_the_table_has_each_process_idle_memory_and_the_medians() -> None:
    rows = [
        _row(1, 5000, {"node1/0": 60.0, "node2/0": 58.0}),
        _row(1, 7000, {"node1/0": 62.0, "node2/0": 58.0}),
        _row(2, 8000, {"node1/0": 64.0, "node1/1": 41.0, "node2/0": 60.0, "node2/1": 40.0}),
    ]
    summary = tunnel_workers.summarize(rows, (1, 2))
    assert summary["1"]["rss_mb_idle"] == {"node1/0": 61.0, "node2/0": 58.0}
    assert summary["1"]["requests_per_s"] == 6000
    # Two processes at 0.2 core each for 8000 requests/s: 50 us per request per tunnel end.
    assert round(summary["2"]["cpu"]["node1"]["us_per_request"]) == 50
    table = tunnel_workers.format_table(summary)
    lines = table.splitlines()
    assert "idle RSS per process, MB" in lines[0]
    assert lines[2].endswith("| 61.0 / 58.0 |")
    assert lines[3].endswith("| 64.0 + 41.0 / 60.0 + 40.0 |")
