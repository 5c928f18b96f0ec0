"""newconn_profile's pure parts: CPU per connection less idle, /proc/stat cores, medians and
ratios of paired variants, profile areas and steps."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from newconn_profile import (
    Sample,
    area_of,
    busy_cores,
    by_area,
    parse_proc_stat,
    per_connection_us,
    steal_cores,
    steps,
    summarize,
    system_share,
)


def test_cpu_per_connection_less_idle() -> None:
    before, after = Sample(10.0, 100.0), Sample(12.5, 102.0)
    # 2.5 s busy over 2 s of wall time, 0.25 s/s of it idle work: 2.0 s for 1000
    assert per_connection_us(before, after, 0.25, 1000) == pytest.approx(2000.0)
    assert per_connection_us(before, after, 0.0, 0) is None
    assert per_connection_us(before, after, 10.0, 1000) == 0.0  # never negative


def test_the_kernels_share_of_a_tunnels_cpu() -> None:
    before, after = Sample(10.0, 100.0, 4.0), Sample(12.0, 102.0, 4.5)
    assert system_share(before, after) == pytest.approx(0.25)  # 0.5 of 2.0 s
    assert system_share(before, before) is None


def test_proc_stat_busy_and_steal_cores() -> None:
    line = "cpu  100 0 50 800 10 0 10 30 0 0\nintr 1\n"
    b0 = parse_proc_stat(line)
    assert b0 == (160, 30, 1000)
    b1 = parse_proc_stat("cpu  200 0 100 1400 10 0 20 70 0 0\n")
    # 160 busy, 40 stolen of 800 jiffies, on 2 cores
    assert busy_cores(b0, b1, 2) == pytest.approx(2 * 160 / 800)
    assert steal_cores(b0, b1, 2) == pytest.approx(2 * 40 / 800)


def _row(variant: str, n1: float, n2: float, rate: float) -> dict[str, object]:
    return {
        "placement": "cross-node",
        "variant": variant,
        "us_per_conn": {"node1": n1, "node2": n2},
        "per_second": rate,
        "plain_per_second": 1000.0,
    }


def test_summary_medians_and_this_over_base() -> None:
    rows = [
        _row("base", 1000, 1200, 300),
        _row("base", 1100, 1400, 320),
        _row("this", 800, 900, 400),
        _row("this", 700, 1000, 420),
    ]
    s = summarize(rows)["cross-node"]
    assert s["base"]["node1"] == pytest.approx(1050)
    assert s["this"]["both"] == pytest.approx(1700)
    assert s["this/base"]["both"] == pytest.approx(1700 / 2350)
    assert s["this/base"]["per_second"] == pytest.approx(410 / 310)


def test_profile_areas_and_steps() -> None:
    stats: dict[tuple[str, int, str], tuple[int, int, float, float, Any]] = {
        ("/x/ztunnel/proxy/outbound.py", 10, "decide"): (1000, 1000, 0.010, 0.020, {}),
        ("/venv/site-packages/structlog/_base.py", 1, "f"): (1000, 1000, 0.030, 0.030, {}),
        ("~", 0, "<method 'write' of '_ssl._SSLSocket' objects>"): (1000, 1000, 0.005, 0.005, {}),
    }
    assert area_of("/x/meshcore/hbone/conn.py") == "meshcore.hbone"
    assert area_of("~") == "builtins (syscalls, ssl, C)"
    areas = dict(by_area(stats, 1000))
    assert areas["structlog"] == pytest.approx(30.0)
    assert areas["ztunnel"] == pytest.approx(10.0)
    got = {label: (calls, us) for label, calls, us in steps(stats, 1000)}
    calls, us = got["client: outbound decision"]
    assert calls == pytest.approx(1.0) and us == pytest.approx(20.0)
