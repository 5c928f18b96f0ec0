"""The soak run's figures, pure: is a series flat (least-squares slope after a warm-up,
judged against the spread of its residuals), latency percentiles per interval, and the
targets met or not. Tested on hand-made series; the harness and the report call it.

"Flat" means the growth the fitted line predicts over the judged span is within the noise
band: NOISE_K times the residuals' standard deviation; the targets ask for no growth beyond
it (a fall is memory given back, not a leak). A steady leak has small residuals
around a steep line, so its growth leaves the band; RSS that moves up and down (allocator
arenas, bursts of connections in flight) widens the band instead of reading as a trend.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from meshbench.hist import Histogram

NOISE_K = 2.0  # band = NOISE_K x residual standard deviation (about 95% of the noise)
MIN_POINTS = 4  # fewer samples after the warm-up: no verdict
RATE_MET = 0.99  # the new-connection target is met at >= 99% of the requested rate
GENERATOR_BUSY = 0.9  # the load generator's cores busy above which its figures are suspect


@dataclass(frozen=True, slots=True)
class Trend:
    """A least-squares line through (t, y) after the warm-up."""

    points: int
    span_s: float  # last t - first t of the judged points
    slope_per_min: float  # y units per minute
    intercept: float  # y at t = 0
    growth: float  # slope x span: what the line says the series grew over the judged span
    noise: float  # NOISE_K x residual standard deviation
    slope_stderr_per_min: float
    first: float  # the first and last judged values, for the reader
    last: float

    @property
    def flat(self) -> bool:
        return abs(self.growth) <= self.noise

    @property
    def grows(self) -> bool:
        """Up by more than the noise: a leak. (Down by more is not one: memory given back.)"""
        return self.growth > self.noise


def fit(ts: Sequence[float], ys: Sequence[float]) -> Trend | None:
    """Ordinary least squares of ys on ts; None with fewer than MIN_POINTS points or no
    spread in time."""
    if len(ts) != len(ys):
        raise ValueError(f"fit: {len(ts)} times but {len(ys)} values")
    n = len(ts)
    if n < MIN_POINTS:
        return None
    mt = math.fsum(ts) / n
    my = math.fsum(ys) / n
    sxx = math.fsum((t - mt) ** 2 for t in ts)
    if sxx <= 0.0:
        return None
    sxy = math.fsum((t - mt) * (y - my) for t, y in zip(ts, ys, strict=True))
    slope = sxy / sxx
    intercept = my - slope * mt
    resid = [y - (intercept + slope * t) for t, y in zip(ts, ys, strict=True)]
    ssr = math.fsum(r * r for r in resid)
    dof = n - 2
    sd = math.sqrt(ssr / dof) if dof > 0 else 0.0
    stderr = sd / math.sqrt(sxx)
    span = max(ts) - min(ts)
    return Trend(
        points=n,
        span_s=span,
        slope_per_min=slope * 60.0,
        intercept=intercept,
        growth=slope * span,
        noise=NOISE_K * sd,
        slope_stderr_per_min=stderr * 60.0,
        first=float(ys[0]),
        last=float(ys[-1]),
    )


def after_warmup(
    ts: Sequence[float], ys: Sequence[float | None], warmup_s: float
) -> tuple[list[float], list[float]]:
    """The (t, y) pairs at or after `warmup_s` whose value was measured."""
    keep = [(t, y) for t, y in zip(ts, ys, strict=True) if t >= warmup_s and y is not None]
    return [t for t, _ in keep], [float(y) for _, y in keep]


def trend_after_warmup(
    ts: Sequence[float], ys: Sequence[float | None], warmup_s: float
) -> Trend | None:
    t, y = after_warmup(ts, ys, warmup_s)
    return fit(t, y)


# --- latency per interval ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Percentiles:
    count: int
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None


def percentiles(h: Histogram) -> Percentiles:
    """p50, p99 and max in ms of a histogram of nanoseconds; None when it is empty."""
    if h.total == 0:
        return Percentiles(0, None, None, None)
    return Percentiles(h.total, h.percentile(50.0) / 1e6, h.percentile(99.0) / 1e6, h.max / 1e6)


def per_interval(hists: Sequence[Mapping[str, object]]) -> list[Percentiles]:
    """Each interval's histogram (Histogram.to_json) read back as its percentiles."""
    return [percentiles(Histogram.from_json(dict(doc))) for doc in hists]


def merged(hists: Sequence[Mapping[str, object]], skip: int = 0) -> Percentiles:
    """The percentiles of all intervals from index `skip` on, as one histogram."""
    total = Histogram()
    for doc in hists[skip:]:
        total.merge(Histogram.from_json(dict(doc)))
    return percentiles(total)


# --- rates and errors -------------------------------------------------------------------------


def add_counts(into: dict[str, int], more: Mapping[str, int]) -> dict[str, int]:
    for kind, n in more.items():
        into[kind] = into.get(kind, 0) + int(n)
    return into


def achieved_ratio(ok: int, seconds: float, target_rate: float) -> float | None:
    """Completed new connections per second over the target rate."""
    if seconds <= 0 or target_rate <= 0:
        return None
    return ok / seconds / target_rate


def busy_cores(cpu_before: float | None, cpu_after: float | None, seconds: float) -> float | None:
    """CPU seconds spent over wall seconds: how many cores the process kept busy."""
    if cpu_before is None or cpu_after is None or seconds <= 0:
        return None
    return max(0.0, cpu_after - cpu_before) / seconds


# --- targets ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    met: bool | None  # None: not measured (too few samples, a process gone)
    measured: str  # the figure, worded for the report
    wanted: str


def _flat_target(name: str, trend: Trend | None, unit: str, scale: float) -> Target:
    if trend is None:
        return Target(name, None, "too few samples after the warm-up", "flat")
    return Target(
        name,
        not trend.grows,
        f"{trend.growth * scale:+.2f} {unit} over {trend.span_s:.0f} s "
        f"(slope {trend.slope_per_min * scale:+.3f} {unit}/min), "
        f"noise band +/-{trend.noise * scale:.2f} {unit}",
        "no growth beyond the noise band",
    )


def rss_target(role: str, trend: Trend | None, late: Trend | None = None) -> Target:
    """RSS in kB in, MB out. `late`, the fit of the judged span's second half, is told
    beside the verdict, which it does not change: growth that slows to nothing (the
    allocators reaching their high mark) and growth that goes on (a leak) can have the
    same line over the whole span."""
    base = _flat_target(f"{role}: RSS flat", trend, "MB", 1 / 1024)
    if trend is None or late is None:
        return base
    scale = 1 / 1024
    return Target(
        base.name,
        base.met,
        f"{base.measured}; second half {late.growth * scale:+.2f} MB over {late.span_s:.0f} s "
        f"(slope {late.slope_per_min * scale:+.3f} MB/min)",
        base.wanted,
    )


def second_half(ts: Sequence[float], ys: Sequence[float | None], warmup_s: float) -> Trend | None:
    """The fit of the points after the warm-up, from the middle of their span on."""
    t, _ = after_warmup(ts, ys, warmup_s)
    if not t:
        return None
    return trend_after_warmup(ts, ys, (t[0] + t[-1]) / 2)


def fd_target(role: str, trend: Trend | None, at_warmup: int | None, at_end: int | None) -> Target:
    base = _flat_target(f"{role}: no fd growth", trend, "fds", 1.0)
    if at_warmup is None or at_end is None:
        return base
    return Target(
        base.name, base.met, f"{at_warmup} after warm-up, {at_end} at end; {base.measured}",
        base.wanted,
    )  # fmt: skip


def errors_target(new_errors: Mapping[str, int], held_errors: Mapping[str, int]) -> Target:
    n_new, n_held = sum(new_errors.values()), sum(held_errors.values())
    kinds = ", ".join(f"{k} {v}" for k, v in sorted({**new_errors, **held_errors}.items()) if v)
    measured = f"{n_new} on new connections, {n_held} on held ones" + (
        f" ({kinds})" if kinds else ""
    )
    return Target("zero errors", n_new + n_held == 0, measured, "0")


def held_target(requested: int, opened: int, alive_end: int | None) -> Target:
    alive = "n/a" if alive_end is None else str(alive_end)
    return Target(
        "held connections all open and alive",
        opened == requested and alive_end == requested,
        f"{opened} of {requested} opened, {alive} alive at the end",
        str(requested),
    )


def rate_target(target_rate: float, ok: int, seconds: float, missed: int) -> Target:
    ratio = achieved_ratio(ok, seconds, target_rate)
    if ratio is None:
        return Target("new connections per second", None, "no timed run", f"{target_rate:g}/s")
    return Target(
        "new connections per second",
        ratio >= RATE_MET,
        f"{ok / seconds:.0f}/s ({ratio:.0%} of the target; {missed} scheduled starts missed)",
        f"{target_rate:g}/s",
    )
