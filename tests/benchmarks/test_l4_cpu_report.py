"""l4_datapath's pure parts: medians over rounds with a process gone, and the CPU table."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from l4_datapath import format_cpu, median_results


def _round(user: float, with_relay_cpu: bool = True) -> dict[str, dict[str, dict[str, float]]]:
    cpu = {"client-side.user_s_per_gb": user, "client-side.system_s_per_gb": 0.5}
    return {
        "tunnel": {"throughput": {"gbit_per_s": user}, "cpu_per_gb": dict(cpu)},
        "relay": {"throughput": {"gbit_per_s": 1.0}, "cpu_per_gb": cpu if with_relay_cpu else {}},
    }


def test_medians_leave_out_a_figure_missing_from_a_round_instead_of_failing() -> None:
    out = median_results([_round(1.0), _round(3.0, with_relay_cpu=False), _round(2.0)])
    assert out["tunnel"]["cpu_per_gb"]["client-side.user_s_per_gb"] == 2.0
    assert out["relay"]["cpu_per_gb"] == {}  # one round had none: no made-up median
    assert out["relay"]["throughput"]["gbit_per_s"] == 1.0


def test_the_cpu_table_has_a_row_per_path_and_process_with_user_and_system() -> None:
    table = format_cpu(median_results([_round(1.25)]))
    rows = [line.split() for line in table.splitlines()[2:]]
    assert rows[0][:5] == ["tunnel", "client-side", "1.25", "0.50", "1.75"]
    assert rows[1][:2] == ["relay", "client-side"]
