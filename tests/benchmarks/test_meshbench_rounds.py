"""Rounds on a shared machine: the spread over rounds, the disturbed-baseline rule and its
repeats, the saturation flag, the CPU layout, and how the report counts and shows rounds
(hand-made results, no cluster)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import meshbench.report as report
import meshbench.round_table as round_table
import meshbench.rounds as rounds
from meshbench.rounds import DisturbanceRule, Spread


def test_spread_is_the_median_and_the_range() -> None:
    assert rounds.spread([]) is None
    sp = rounds.spread([0.9, 0.5, 0.6])
    assert sp == Spread(0.6, 0.5, 0.9, 3)
    assert sp.width == pytest.approx(0.4)
    assert rounds.spread([1.0, 3.0]) == Spread(2.0, 1.0, 3.0, 2)


def test_runs_agree_where_their_ranges_overlap() -> None:
    quick, full = Spread(0.6, 0.5, 0.7, 2), Spread(0.65, 0.62, 0.9, 3)
    assert quick.overlaps(full) and full.overlaps(quick)
    assert not Spread(1.0, 0.9, 1.1, 2).overlaps(Spread(0.5, 0.4, 0.6, 3))


@pytest.mark.parametrize(
    ("value", "others", "flagged"),
    [
        (0.6, [0.6, 0.7], False),
        (2.5, [0.6, 0.7], True),  # > 2x the median and 1.85 ms above it
        (0.5, [0.2, 0.2], True),  # 2.5x and 0.3 ms above: over the 0.25 ms floor
        (0.3, [0.1, 0.1], False),  # 3x, but 0.2 ms: jitter, not a disturbance
        (10.3, [], True),  # one round only: the absolute ceiling still applies
        (4.0, [], False),
        (1.3, [0.6], True),
    ],
)
def test_disturbance_rule(value: float, others: list[float], flagged: bool) -> None:
    rule = DisturbanceRule(ratio=2.0, min_excess_ms=0.25, ceiling_ms=5.0)
    got = rounds.disturbed(value, others, rule)
    assert bool(got) is flagged, got


def test_disturbance_rule_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="ratio"):
        DisturbanceRule(ratio=1.0)
    with pytest.raises(ValueError, match="max_repeats"):
        DisturbanceRule(max_repeats=9)


def test_flag_rounds_compares_each_round_with_the_others() -> None:
    assert rounds.flag_rounds({0: 0.6, 1: 0.62, 2: 2.5}).keys() == {2}
    assert rounds.flag_rounds({0: 0.6, 1: 0.62}) == {}


def test_a_disturbed_round_is_repeated_then_the_repeat_counts() -> None:
    rule = DisturbanceRule(max_repeats=2)
    first = {0: {0: 0.6}, 1: {0: 0.65}, 2: {0: 2.5}}
    assert rounds.repeat_plan(first, rule) == [(2, 1)]
    second = {0: {0: 0.6}, 1: {0: 0.65}, 2: {0: 2.5, 1: 0.7}}
    assert rounds.repeat_plan(second, rule) == []
    v = rounds.judge(second, rule)[2]
    assert v.accepted == 1 and set(v.excluded) == {0} and not v.kept_disturbed


def test_repeats_are_bounded_and_the_least_disturbed_is_kept() -> None:
    rule = DisturbanceRule(max_repeats=2)
    bad = {0: {0: 0.6}, 1: {0: 0.6}, 2: {0: 3.0, 1: 2.0, 2: 2.8}}
    assert rounds.repeat_plan(bad, rule) == []  # two repeats done: no third
    v = rounds.judge(bad, rule)[2]
    assert v.accepted == 1 and set(v.excluded) == {0, 2}
    assert "no repeat left" in v.kept_disturbed
    # Before the repeats are used up, the same round asks for one more.
    assert rounds.repeat_plan({0: {0: 0.6}, 1: {0: 0.6}, 2: {0: 3.0, 1: 2.0}}, rule) == [(2, 2)]
    # At the end of the run (final), a pending repeat is not waited for.
    final = rounds.judge({0: {0: 0.6}, 1: {0: 0.6}, 2: {0: 3.0}}, rule, final=True)[2]
    assert final.accepted == 0 and final.kept_disturbed


def test_saturation_flag() -> None:
    assert rounds.saturated(0.95)
    assert not rounds.saturated(0.5)
    assert not rounds.saturated(None)
    assert rounds.saturated(0.6, limit=0.5)


def test_pin_plan() -> None:
    assert rounds.pin_plan("off", [0, 1]) == {}
    assert rounds.pin_plan("split", [0]) == {}  # one CPU: nothing to split
    plan = rounds.pin_plan("split", [3, 1])
    assert plan == {"loadgen": {1}, "server": {3}, "proxy": {1, 3}}
    assert "loadgen on CPU 1" in rounds.describe_plan(plan)
    assert "not pinned" in rounds.describe_plan({})
    with pytest.raises(ValueError, match="pin layout"):
        rounds.pin_plan("nodes", [0, 1])


# --- the report over rounds ---------------------------------------------------------------


def step(
    scenario: str,
    rnd: int,
    p99: float,
    *,
    attempt: int = 0,
    placement: str = "cross-node",
    cpu: float | None = 0.05,
    cores: float = 0.3,
) -> dict[str, Any]:
    return {
        "scenario": scenario,
        "placement": placement,
        "round": rnd,
        "attempt": attempt,
        "http": {
            "1000": {
                "latency_ms": {"p50": p99 / 3, "p90": p99 / 2, "p99": p99, "p999": p99 * 2},
                "achieved_rps": 1000.0,
                "unanswered": 0,
                "client_cpu_cores": cores,
                "costs": {
                    "total": {"cpu_s_per_1000_req": cpu},
                    **({"tunnel-node1": {"cpu_s_per_1000_req": cpu}} if cpu else {}),
                },
            }
        },
    }


def three_rounds() -> list[dict[str, Any]]:
    """none and ambient over three rounds; round 3's baseline disturbed, then repeated."""
    runs = [
        step("none", 0, 0.60, cpu=None),
        step("ambient", 0, 0.70),
        step("none", 1, 0.62, cpu=None),
        step("ambient", 1, 0.74, cores=0.95),
        step("none", 2, 2.50, cpu=None),
        step("ambient", 2, 2.70),
        step("none", 2, 0.64, attempt=1, cpu=None),
        step("ambient", 2, 0.72, attempt=1),
    ]
    rounds.mark_slices(runs, "cross-node", "1000")
    return runs


def test_mark_slices_leaves_the_whole_disturbed_slice_out() -> None:
    runs = three_rounds()
    excluded = [
        (r["scenario"], r["round"], r["attempt"]) for r in runs if r["http"]["1000"].get("excluded")
    ]
    assert sorted(excluded) == [("ambient", 2, 0), ("none", 2, 0)]
    agg = report.aggregate(runs)
    assert agg[("none", "cross-node")]["p99_ms@1000"] == pytest.approx(0.62)
    assert agg[("ambient", "cross-node")]["p99_ms@1000"] == pytest.approx(0.72)


def test_added_p99_is_the_median_of_per_round_differences() -> None:
    runs = three_rounds()
    diffs = report.paired_added(runs, "ambient", "none", "cross-node", "1000")
    assert diffs == pytest.approx([0.10, 0.12, 0.08])
    ts = {t.name: t for t in report.targets(report.aggregate(runs), runs=runs)}
    added = ts["ambient added p99 at 1000 rps"]
    assert added.value == pytest.approx(0.10)
    assert added.met is True
    assert added.spread is not None and added.spread.low == pytest.approx(0.08)
    assert added.spread.n == 3
    tunnel = ts["tunnel vCPU per 1000 rps (busiest tunnel)"]
    assert tunnel.value == pytest.approx(0.05) and tunnel.spread is not None


def test_report_shows_rounds_spread_disturbed_and_saturated() -> None:
    runs = three_rounds()
    doc = {"time": "now", "params": {"mode": "full", "rounds": 3}, "runs": runs,
           "cpu_layout": "not pinned (the scheduler places every process)"}  # fmt: skip
    md = report.render(doc, [])
    assert "## Rounds, spread and the machine" in md
    assert "| cross-node | 1000 | 0.620 | 0.600..0.640 | 3 |" in md
    assert "cross-node 1000 rps round 3: baseline disturbed" in md
    assert "ambient cross-node 1000 rps round 2: load generator at 0.95 cores" in md
    assert "CPU layout (the same for every scenario): not pinned" in md
    rows = [ln for ln in md.splitlines() if ln.startswith("| cross-node | 1000 | none | p99 ms")]
    assert rows == ["| cross-node | 1000 | none | p99 ms | 0.600 | 0.620 | ~~2.500~~ / 0.640 "
                    "| 0.620 | 0.600..0.640 |"]  # fmt: skip
    added = next(ln for ln in md.splitlines() if "| ambient | added p99 over none ms" in ln)
    assert "| +0.100 | +0.080..+0.120 |" in added
    # The per-metric tables carry the spread beside each median measured in rounds.
    p99_table = md.split("## p99 latency at 1000 rps")[1].split("##")[0]
    assert "0.720 (0.700..0.740)" in p99_table
    for table in [t for t in md.split("\n\n") if t.startswith("|")]:
        assert len({ln.count("|") for ln in table.splitlines()}) == 1, table


SATURATED_HEAD = (
    "saturated (> 0.8 core over a rate step, or per process over a new-connection phase)"
)


def test_a_saturated_generator_in_a_churn_phase_is_named() -> None:
    """A connect() that searches far for a free port (TIME-WAIT sockets toward the same
    server) burns the generator's CPU: its rate is then the generator's."""
    busy = {"scenario": "ambient", "placement": "same-node", "round": 2,
            "connect": {"per_second": 790.0, "client_cpu_cores": 1.56},
            # Four processes may use both cores: not judged by the one-core rule.
            "handshake": {"handshakes_per_second": 650.0, "client_cpu_cores": 1.2}}  # fmt: skip
    calm = {"scenario": "ambient", "placement": "same-node", "round": 1,
            "connect": {"per_second": 3300.0, "client_cpu_cores": 0.3}}  # fmt: skip
    failed = {"scenario": "none", "placement": "same-node", "round": 0,
              "connect": {"error": "BenchError: x"}}  # fmt: skip
    # A generator of two processes is judged per process: 1.5 cores is two busy ones, not
    # a saturated one; 1.7 is.
    two = {"scenario": "none", "placement": "cross-node", "round": 0,
           "connect": {"per_second": 15000.0, "client_cpu_cores": 1.5, "procs": 2}}  # fmt: skip
    two_full = {"scenario": "none", "placement": "cross-node", "round": 1,
                "connect": {"per_second": 9000.0, "client_cpu_cores": 1.7, "procs": 2}}  # fmt: skip
    notes = round_table.churn_saturation_notes([busy, calm, failed, two, two_full])
    assert notes == [
        "ambient same-node new connections round 3 (790/s): load generator at 1.56 cores "
        "(> 0.8): saturated, the rate is the generator's",
        "none cross-node new connections round 2 (9000/s): load generator at 1.70 cores "
        "(> 1.6, 0.8 for each of 2 processes): saturated, the rate is the generator's",
    ]
    md = report.render({"runs": [busy, calm], "params": {}}, [])
    assert SATURATED_HEAD + ":" in md
    assert "- ambient same-node new connections round 3 (790/s)" in md


def test_saturation_and_disturbance_notes_are_empty_on_a_quiet_run() -> None:
    runs = [step("none", 0, 0.6, cpu=None), step("none", 1, 0.61, cpu=None)]
    rounds.mark_slices(runs, "cross-node", "1000")
    assert round_table.disturbed_notes(runs) == []
    assert round_table.saturation_notes(runs) == []
    md = report.render({"runs": runs, "params": {}}, [])
    assert "Disturbed baselines: none." in md and SATURATED_HEAD + ": never" in md


def test_compare_two_runs_by_their_ranges(tmp_path: Path) -> None:
    import meshbench.compare as compare

    a = three_rounds()
    b = [step("none", 0, 0.63, cpu=None), step("none", 1, 0.66, cpu=None),
         step("ambient", 0, 1.5), step("ambient", 1, 1.6)]  # fmt: skip
    rows = {(r.scenario, r.metric): r for r in compare.compare(a, b)}
    assert rows[("none", "p99_ms@1000")].agree  # 0.60..0.64 against 0.63..0.66
    assert not rows[("ambient", "p99_ms@1000")].agree  # 0.70..0.74 against 1.5..1.6
    assert ("none", "bulk_gbit") not in rows  # one-off metrics have no spread to compare
    # Targets judged on a median of rounds are compared too: added p99 0.08..0.12 ms in A,
    # 0.87..0.94 in B.
    added = rows[("target", "ambient added p99 at 1000 rps")]
    assert added.placement == "cross-node" and not added.agree
    assert added.a.low == pytest.approx(0.08) and added.b.high == pytest.approx(0.94)
    md = compare.render(list(rows.values()))
    assert "| ambient | cross-node | p99_ms@1000 |" in md and "**no**" in md
    bad = tmp_path / "x.json"
    bad.write_text("[]")
    assert compare.main([str(bad), str(bad)]) == 2


def test_settled_and_cpu_delta() -> None:
    import meshbench.costs as costs

    assert rounds.settled(0.01, 0.25)  # 0.04 cores
    assert not rounds.settled(0.2, 0.25)  # 0.8 cores: a proxy still working off a queue
    assert not rounds.settled(0.0, 0.0)
    # A pid gone between the samples counts for nothing; time never runs backwards.
    assert costs.cpu_delta({1: 1.0, 2: 5.0, 3: 2.0}, {1: 1.5, 3: 1.0}) == pytest.approx(0.5)
