"""Do two mesh_bench runs agree? `python -m meshbench.compare A/results.json B/results.json`
(cwd benchmarks/) prints, for every latency and cost metric both runs measured per round
at a rate both used, each run's median and min..max over its counted rounds and whether
the ranges overlap (`rounds.Spread.overlaps`): quick against full, pinned against not, or
today against yesterday. A metric whose ranges do not overlap differs by more than either
run's own spread. The targets judged on a median of rounds (an added p99, the tunnel's
CPU, the churn ratios against sidecar-haproxy) are compared the same way, as scenario
`target`. Comparing is pure (`compare`); only `main` reads files.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .report import aggregate, scenario_order, spreads, targets
from .rounds import Spread

METRICS = (
    "p50_ms",
    "p99_ms",
    "p999_ms",
    "cpu_s_per_1000",
    "client_cores",
    "conn_per_s",
    "handshakes_per_s",
)


@dataclass(frozen=True, slots=True)
class Row:
    scenario: str
    placement: str
    metric: str
    a: Spread
    b: Spread

    @property
    def agree(self) -> bool:
        return self.a.overlaps(self.b)


def compare(runs_a: list[dict[str, Any]], runs_b: list[dict[str, Any]]) -> list[Row]:
    sa, sb = spreads(runs_a), spreads(runs_b)
    out: list[Row] = []
    keys = set(sa) & set(sb)
    order = scenario_order({s for s, _ in keys})
    for key in sorted(keys, key=lambda k: (k[1], order.index(k[0]))):
        for metric in sorted(set(sa[key]) & set(sb[key])):
            if metric.split("@")[0] in METRICS:
                out.append(Row(key[0], key[1], metric, sa[key][metric], sb[key][metric]))
    return out + compare_targets(runs_a, runs_b)


def compare_targets(runs_a: list[dict[str, Any]], runs_b: list[dict[str, Any]]) -> list[Row]:
    """The targets both runs judged on a median of rounds, side by side."""

    def judged(runs: list[dict[str, Any]]) -> dict[tuple[str, str], Spread]:
        return {
            (t.placement, t.name): t.spread
            for t in targets(aggregate(runs), runs=runs)
            if t.spread is not None
        }

    ta, tb = judged(runs_a), judged(runs_b)
    return [
        Row("target", pl, name, ta[(pl, name)], tb[(pl, name)])
        for pl, name in sorted(ta.keys() & tb.keys())
    ]


def render(rows: list[Row]) -> str:
    def cell(s: Spread) -> str:
        return f"{s.median:.3f} ({s.low:.3f}..{s.high:.3f}, n={s.n})"

    lines = [
        "| scenario | placement | metric | A | B | ranges overlap |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.scenario} | {r.placement} | {r.metric} | {cell(r.a)} | {cell(r.b)} "
            f"| {'yes' if r.agree else '**no**'} |"
        )
    return "\n".join(lines)


def _runs(path: Path) -> list[dict[str, Any]]:
    doc = json.loads(path.read_text(encoding="utf-8"))
    runs = doc.get("runs") if isinstance(doc, dict) else None
    if not isinstance(runs, list):
        raise ValueError(f"{path}: not a mesh_bench results.json (no 'runs' list)")
    return runs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    a = ap.parse_args(argv)
    try:
        rows = compare(_runs(a.a), _runs(a.b))
    except (OSError, ValueError) as e:
        print(f"compare: {e}", file=sys.stderr)
        return 2
    print(render(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
