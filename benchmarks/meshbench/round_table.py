"""The report's per-round view of the latency steps (pure): every round's value of each
percentile and cost, the median over the counted rounds and its spread, the rounds left
out for a disturbed baseline (and their repeats), and the rate steps whose load generator
was saturated. Reads results.json's runs as report.py documents them; a rate entry may
carry `excluded` (left out of the medians, with the reason), `disturbed_kept` (counted
though disturbed: no repeat left) and `client_cpu_cores` (the generator's own CPU).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .rounds import SATURATED_CORES, saturated, spread

BASELINE = "none"

Phase = dict[str, Any]


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


@dataclass(frozen=True, slots=True)
class RoundMetric:
    title: str
    fmt: str
    value: Callable[[Phase], float | None]


def _lat(p: str) -> Callable[[Phase], float | None]:
    return lambda ph: _num(ph.get("latency_ms", {}).get(p))


ROUND_METRICS = (
    RoundMetric("p50 ms", ".3f", _lat("p50")),
    RoundMetric("p99 ms", ".3f", _lat("p99")),
    RoundMetric("p99.9 ms", ".3f", _lat("p999")),
    RoundMetric(
        "proxy CPU s per 1000 req",
        ".3f",
        lambda ph: _num(ph.get("costs", {}).get("total", {}).get("cpu_s_per_1000_req")),
    ),
    RoundMetric("load generator cores", ".2f", lambda ph: _num(ph.get("client_cpu_cores"))),
)


@dataclass(frozen=True, slots=True)
class Step:
    """One rate step of one scenario: which round and attempt, and what it measured."""

    scenario: str
    placement: str
    rate: str
    rnd: int
    attempt: int
    phase: Phase

    @property
    def counted(self) -> bool:
        return not self.phase.get("excluded") and not self.phase.get("error")


def steps(runs: Iterable[dict[str, Any]]) -> list[Step]:
    out: list[Step] = []
    for run in runs:
        if run.get("error") and not run.get("http"):
            continue
        for rate, ph in run.get("http", {}).items():
            if isinstance(ph, dict):
                out.append(
                    Step(
                        str(run["scenario"]),
                        str(run["placement"]),
                        str(rate),
                        int(run.get("round", 0)),
                        int(run.get("attempt", 0)),
                        ph,
                    )
                )
    return sorted(out, key=lambda s: (s.placement, float(s.rate), s.scenario, s.rnd, s.attempt))


def _fmt_attempt(v: float | None, st: Step, fmt: str) -> str:
    if st.phase.get("error"):
        return "failed"
    cell = "n/a" if v is None else format(v, fmt)
    if st.phase.get("excluded"):
        return f"~~{cell}~~"
    if st.phase.get("disturbed_kept"):
        return f"{cell}!"
    return cell


def per_round_table(runs: list[dict[str, Any]], order: Callable[[Iterable[str]], list[str]]) -> str:
    """A row per placement, rate, scenario and metric: each round's value (attempts of one
    round joined by ` / `; ~~struck~~: left out, its baseline disturbed; `!`: kept though
    disturbed), then the median over counted rounds and min..max. Empty without steps."""
    all_steps = steps(runs)
    if not all_steps:
        return ""
    n_rounds = max(s.rnd for s in all_steps) + 1
    head = ["placement", "rps", "scenario", "metric"]
    head += [f"round {r + 1}" for r in range(n_rounds)] + ["median", "min..max"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    groups: dict[tuple[str, str, str], list[Step]] = {}
    for s in all_steps:
        groups.setdefault((s.placement, s.rate, s.scenario), []).append(s)
    keys = sorted({(p, r) for p, r, _ in groups}, key=lambda k: (k[0], float(k[1])))
    for pl, rate in keys:
        names = order({s for p, r, s in groups if (p, r) == (pl, rate)})
        base = {(s.rnd, s.attempt): s for s in groups.get((pl, rate, BASELINE), [])}
        for name in names:
            group = groups[(pl, rate, name)]
            metrics = [(m.title, m.fmt, _of_step(m)) for m in ROUND_METRICS]
            if name != BASELINE and base:
                metrics.append(("added p99 over none ms", "+.3f", _added_fn(base)))
            for title, fmt, get in metrics:
                cells = [pl, rate, name, title]
                for r in range(n_rounds):
                    att = [s for s in group if s.rnd == r]
                    cells.append(" / ".join(_fmt_attempt(get(s), s, fmt) for s in att) or "-")
                vals = [v for s in group if s.counted and (v := get(s)) is not None]
                sp = spread(vals)
                cells.append("n/a" if sp is None else format(sp.median, fmt))
                cells.append(
                    "n/a" if sp is None else f"{format(sp.low, fmt)}..{format(sp.high, fmt)}"
                )
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _of_step(m: RoundMetric) -> Callable[[Step], float | None]:
    return lambda st: m.value(st.phase)


def _added_fn(base: dict[tuple[int, int], Step]) -> Callable[[Step], float | None]:
    def added(st: Step) -> float | None:
        b = base.get((st.rnd, st.attempt))
        mine, theirs = _lat("p99")(st.phase), None if b is None else _lat("p99")(b.phase)
        return None if mine is None or theirs is None else mine - theirs

    return added


def disturbed_notes(runs: list[dict[str, Any]]) -> list[str]:
    """One line per slice left out or kept although disturbed (read from `none`'s rows)."""
    out: list[str] = []
    for s in steps(runs):
        if s.scenario != BASELINE:
            continue
        where = f"{s.placement} {s.rate} rps round {s.rnd + 1}"
        where += f" (repeat {s.attempt})" if s.attempt else ""
        if s.phase.get("excluded"):
            out.append(
                f"{where}: baseline disturbed ({s.phase['excluded']}): left out of the medians"
            )
        elif s.phase.get("disturbed_kept"):
            out.append(f"{where}: baseline disturbed ({s.phase['disturbed_kept']})")
    return out


def saturation_notes(runs: list[dict[str, Any]]) -> list[str]:
    """One line per rate step whose load generator was above SATURATED_CORES."""
    out: list[str] = []
    for s in steps(runs):
        cores = _num(s.phase.get("client_cpu_cores"))
        if saturated(cores):
            out.append(
                f"{s.scenario} {s.placement} {s.rate} rps round {s.rnd + 1}: load generator "
                f"at {cores:.2f} cores (> {SATURATED_CORES:g}): saturated, its latency is "
                "the generator's, not the proxy's"
            )
    return out


def _limit(procs: int) -> str:
    if procs == 1:
        return f"{SATURATED_CORES:g}"
    return f"{SATURATED_CORES * procs:g}, {SATURATED_CORES:g} for each of {procs} processes"


def churn_saturation_notes(runs: list[dict[str, Any]]) -> list[str]:
    """One line per new-connection phase whose load generator was above SATURATED_CORES:
    its rate is then the generator's, not the proxy's (the threads of each of its processes
    share one interpreter, and a connect() searching for a free port among many TIME-WAIT
    sockets costs the generator, not the proxy). Judged per process: `procs` processes may
    use that many cores. The handshake phase's generator does CPU work of its own (each
    attempt a handshake): its CPU is reported, not judged by this rule."""
    out: list[str] = []
    for run in runs:
        phase = run.get("connect")
        if not isinstance(phase, dict):
            continue
        cores = _num(phase.get("client_cpu_cores"))
        procs = max(1, int(_num(phase.get("procs")) or 1))
        if saturated(cores, SATURATED_CORES * procs):
            rate = _num(phase.get("per_second"))
            at = f" ({rate:.0f}/s)" if rate is not None else ""
            out.append(
                f"{run['scenario']} {run['placement']} new connections round "
                f"{int(run.get('round', 0)) + 1}{at}: load generator at {cores:.2f} cores "
                f"(> {_limit(procs)}): saturated, the rate is the generator's"
            )
    return out
