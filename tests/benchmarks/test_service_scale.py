"""benchmarks/service_scale.py at tiny scale: it runs, the decision it times is the one a
client tunnel makes for a connection to a service VIP (HBONE to one of the service's pods),
and its JSON line carries a row per size. Nothing about speed is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_service_scale_runs_and_reports_each_size() -> None:
    done = subprocess.run(
        [sys.executable, "benchmarks/service_scale.py", "--sizes", "1,40", "--calls", "20",
         "--rounds", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads(done.stdout.strip().splitlines()[-1])
    assert [r["pods"] for r in doc["rows"]] == [1, 40]
    assert all(r["us_per_decision"] > 0 and r["first_us"] > 0 for r in doc["rows"])
    assert doc["ratio"] > 0
    assert "ratio 40 pods over 1" in done.stdout


def test_a_bad_size_is_refused() -> None:
    done = subprocess.run(
        [sys.executable, "benchmarks/service_scale.py", "--sizes", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2 and "--sizes" in done.stderr
