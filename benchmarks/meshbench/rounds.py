"""Rounds of latency measurements on a shared machine, as pure decisions: the spread of a
metric over rounds, whether a round's `none` baseline was itself disturbed (and so the
round is repeated), whether the load generator was saturated, and where each process is
pinned. mesh_bench.py does the I/O; report.py renders what these decide.

Why: on a machine shared with other work, one round's tail says more about the machine
than about the mesh. Every scenario is measured once per round, rounds are interleaved,
and a round whose no-mesh baseline is far above the run's typical baseline is flagged,
kept in the record, left out of the medians and measured again (a bounded number of times).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

SATURATED_CORES = 0.8  # the load generator is one thread: above this its figures are its own
SETTLE_CORES = 0.1  # every live proxy together, between steps: below this the mesh is idle
SETTLE_TIMEOUT = 10.0  # seconds a step waits at most for the proxies to go idle


@dataclass(frozen=True, slots=True)
class Spread:
    """The median of a metric over rounds and the range it came from."""

    median: float
    low: float
    high: float
    n: int

    @property
    def width(self) -> float:
        return self.high - self.low

    def overlaps(self, other: Spread) -> bool:
        """Whether two runs' ranges share a value: quick and full agree within their spread."""
        return self.low <= other.high and other.low <= self.high


def spread(values: Iterable[float]) -> Spread | None:
    vs = sorted(values)
    if not vs:
        return None
    return Spread(statistics.median(vs), vs[0], vs[-1], len(vs))


@dataclass(frozen=True, slots=True)
class DisturbanceRule:
    """When a round's `none` p99 (one placement, one rate) counts as disturbed.

    Relative: more than `ratio` times the median of the other rounds' accepted values AND
    more than `min_excess_ms` above it (so sub-0.1 ms jitter on a 0.2 ms baseline is not a
    disturbance). Absolute: above `ceiling_ms` whatever the others say (two plain pods over
    veths answer 1 KB in well under a millisecond; 5 ms is the machine, not the path)."""

    ratio: float = 2.0
    min_excess_ms: float = 0.25
    ceiling_ms: float = 5.0
    max_repeats: int = 2  # per round, placement and rate

    def __post_init__(self) -> None:
        if self.ratio <= 1.0 or self.min_excess_ms < 0 or self.ceiling_ms <= 0:
            raise ValueError("disturbance rule: ratio > 1, min_excess_ms >= 0, ceiling_ms > 0")
        if not 0 <= self.max_repeats <= 5:
            raise ValueError("disturbance rule: max_repeats must be 0..5")


DEFAULT_RULE = DisturbanceRule()


def disturbed(value: float, others: Iterable[float], rule: DisturbanceRule = DEFAULT_RULE) -> str:
    """Why `value` (a `none` p99 in ms) is a disturbed baseline, or "" if it is not.
    `others`: the same placement's and rate's values of the other rounds (accepted ones)."""
    if value > rule.ceiling_ms:
        return f"none p99 {value:.3f} ms > {rule.ceiling_ms:g} ms"
    rest = list(others)
    if not rest:
        return ""
    typical = statistics.median(rest)
    if value > rule.ratio * typical and value - typical > rule.min_excess_ms:
        return f"none p99 {value:.3f} ms > {rule.ratio:g} x {typical:.3f} ms (other rounds)"
    return ""


def flag_rounds(
    values: Mapping[int, float], rule: DisturbanceRule = DEFAULT_RULE
) -> dict[int, str]:
    """Round -> reason, for each round whose value is disturbed against the others."""
    out: dict[int, str] = {}
    for rnd, v in values.items():
        why = disturbed(v, [w for r, w in values.items() if r != rnd], rule)
        if why:
            out[rnd] = why
    return out


@dataclass(frozen=True, slots=True)
class RoundVerdict:
    """What one round of one slice (placement and rate) counts: the attempt whose figures
    enter the medians, the attempts left out and why, and the next attempt to measure."""

    accepted: int | None  # None while a repeat is still to come
    excluded: dict[int, str] = field(default_factory=dict)  # attempt -> reason
    repeat: int | None = None  # the attempt to measure next, if any
    kept_disturbed: str = ""  # accepted although disturbed: out of repeats


Attempts = Mapping[int, Mapping[int, float]]  # round -> attempt -> none p99 (ms)


def judge(
    by_round: Attempts, rule: DisturbanceRule = DEFAULT_RULE, final: bool = False
) -> dict[int, RoundVerdict]:
    """Per round, which attempt counts. Each round's attempts are judged in order against
    the median of the other rounds' best (lowest) attempt: the first one not disturbed is
    accepted; while none is and repeats are left, the next attempt is asked for; out of
    repeats (or `final`: the run is over), the lowest is kept and says so."""
    best = {r: min(a.values()) for r, a in by_round.items() if a}
    out: dict[int, RoundVerdict] = {}
    for rnd, attempts in by_round.items():
        others = [v for r, v in best.items() if r != rnd]
        excluded: dict[int, str] = {}
        accepted: int | None = None
        for att in sorted(attempts):
            why = disturbed(attempts[att], others, rule)
            if not why:
                accepted = att
                break
            excluded[att] = why
        if accepted is not None or not attempts:
            out[rnd] = RoundVerdict(accepted, excluded)
        elif len(attempts) <= rule.max_repeats and not final:
            out[rnd] = RoundVerdict(None, excluded, repeat=max(attempts) + 1)
        else:
            keep = min(attempts, key=lambda a: attempts[a])
            why = excluded.pop(keep)
            out[rnd] = RoundVerdict(
                keep, excluded, kept_disturbed=f"{why}; kept: no repeat left (the least disturbed)"
            )
    return out


def repeat_plan(by_round: Attempts, rule: DisturbanceRule = DEFAULT_RULE) -> list[tuple[int, int]]:
    """(round, attempt) of each repeat still to measure."""
    return [(r, v.repeat) for r, v in sorted(judge(by_round, rule).items()) if v.repeat is not None]


BASELINE = "none"


def _p99(phase: Any) -> float | None:
    if not isinstance(phase, dict) or phase.get("error"):
        return None
    v = phase.get("latency_ms", {}).get("p99")
    return float(v) if isinstance(v, int | float) else None


def baseline_attempts(runs: Iterable[dict[str, Any]], placement: str, rate: str) -> Attempts:
    """The `none` p99 of every round and attempt of one slice, from results.json's runs."""
    out: dict[int, dict[int, float]] = {}
    for run in runs:
        if run.get("scenario") != BASELINE or run.get("placement") != placement:
            continue
        v = _p99(run.get("http", {}).get(rate))
        if v is not None:
            out.setdefault(int(run.get("round", 0)), {})[int(run.get("attempt", 0))] = v
    return out


def mark_slices(
    runs: Iterable[dict[str, Any]], placement: str, rate: str, rule: DisturbanceRule = DEFAULT_RULE
) -> dict[int, RoundVerdict]:
    """Write the verdicts into every scenario's rate entry of the slice: `excluded` (the
    reason) on attempts left out of the medians, `disturbed_kept` on one kept anyway. The
    whole slice goes: a disturbance of the machine hit every row measured beside it."""
    runs = list(runs)
    verdicts = judge(baseline_attempts(runs, placement, rate), rule, final=True)
    for run in runs:
        ph = run.get("http", {}).get(rate)
        v = verdicts.get(int(run.get("round", 0)))
        if run.get("placement") != placement or not isinstance(ph, dict) or v is None:
            continue
        att = int(run.get("attempt", 0))
        ph.pop("excluded", None)
        ph.pop("disturbed_kept", None)
        if att in v.excluded:
            ph["excluded"] = v.excluded[att]
        elif att == v.accepted and v.kept_disturbed:
            ph["disturbed_kept"] = v.kept_disturbed
    return verdicts


def saturated(cores: float | None, limit: float = SATURATED_CORES) -> bool:
    """The load generator's CPU over a rate step (cores busy) above `limit`: its latency
    figures include its own queueing and are not the proxy's."""
    return cores is not None and cores > limit


def settled(cpu_s: float, seconds: float, limit: float = SETTLE_CORES) -> bool:
    """Whether the proxies of every live scenario, together, spent less than `limit` cores
    over a short look (`cpu_s` CPU seconds in `seconds`). All scenarios stay up for the
    whole run, so one that was driven past its capacity (a waypoint at 1000 rps) may still
    be working off its queue when the next scenario's step starts; that next step waits."""
    return seconds > 0 and cpu_s / seconds < limit


# --- CPU pinning ---------------------------------------------------------------------------

PIN_LAYOUTS = ("off", "split")
LOADGEN, SERVER, PROXY = "loadgen", "server", "proxy"


PinPlan = dict[str, frozenset[int]]


def pin_plan(layout: str, cpus: Iterable[int]) -> PinPlan:
    """Which CPUs each kind of process may run on; empty: nothing is pinned.

    `split` (2 or more CPUs): the load generator on the first CPU, the server app on the
    second, the proxies on all of them. The generator and the server each keep a core of
    their own, so neither queues behind the other; the proxies, whose cost is the
    measurement, go wherever the scheduler finds room. The same for every scenario, so
    `none` and the meshes see one layout."""
    if layout not in PIN_LAYOUTS:
        raise ValueError(f"pin layout {layout!r}: one of {', '.join(PIN_LAYOUTS)}")
    cs = sorted(set(cpus))
    if layout == "off" or len(cs) < 2:
        return {}
    return {LOADGEN: frozenset({cs[0]}), SERVER: frozenset({cs[1]}), PROXY: frozenset(cs)}


def describe_plan(plan: Mapping[str, frozenset[int]]) -> str:
    if not plan:
        return "not pinned (the scheduler places every process)"
    return ", ".join(
        f"{kind} on CPU {','.join(str(c) for c in sorted(plan[kind]))}"
        for kind in (LOADGEN, SERVER, PROXY)
        if kind in plan
    )
