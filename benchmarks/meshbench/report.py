"""From the raw results of one run to the report: aggregation, ratios, targets and tables
are pure (tested on hand-made documents); `write_plots` and `write_report` do the I/O.

The raw document (results.json) is:
  {"benchmark": "mesh_bench", "params": {...}, "host": {...},
   "runs": [{"scenario", "placement", "round", "error"?,
             "idle": {role: {"rss_kb"}},
             "bulk": {"gbit_per_s", ...},
             "http": {"<rate>": {"latency_ms": {...}, "achieved_rps", "answered",
                                 "unanswered", "hist_ns": {...}, "costs": {role: {...}}}},
             "connect": {"per_second", "tunnel_opened_per_second"?, ...} | {"error"},
             "handshake"?: {"handshakes_per_second", "client_cpu_cores",
                            "server_cpu_ms_per_handshake", ...} | {"error"},
             "conns": {"opened", "bytes_per_connection", ...}}],
   (round 0's record holds everything measured once; a later round's, its latency steps,
   "connect" and "handshake")
   "skipped": [{"scenario", "reason"}], "notes": [str], "earlier": {"rbac_check": {...}, ...}}
Only ratios within one run mean anything (the machines are shared); the report says so.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import round_table
from .hist import Histogram
from .rounds import Spread, spread

BASELINE = "none"
SIDECAR = "sidecar"
AMBIENT = "ambient"
RELAY = "relay"
WAYPOINT = "ambient-waypoint"
HAPROXY = "sidecar-haproxy"
WAYPOINT_ROLE = "waypoint"  # the waypoint process's role among a run's proxies
REF_RATE = 1000  # the rate the latency and CPU targets speak of
ORDER = ("none", "ambient", "relay", "sidecar", "sidecar-haproxy", "ambient-waypoint")
PLACEMENTS = ("cross-node", "same-node")

Agg = dict[tuple[str, str], dict[str, float]]  # (scenario, placement) -> metric -> value


# --- flattening and aggregation -----------------------------------------------------------


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def flatten(run: dict[str, Any]) -> dict[str, float]:
    """One measured run as flat metrics (absent or failed figures are left out)."""
    out: dict[str, float] = {}

    def put(key: str, v: Any, scale: float = 1.0) -> None:
        n = _num(v)
        if n is not None:
            out[key] = n * scale

    put("bulk_gbit", run.get("bulk", {}).get("gbit_per_s"))
    idle = run.get("idle", {})
    rss = [_num(r.get("rss_kb")) for r in idle.values()]
    if rss and all(r is not None for r in rss):
        out["idle_rss_mb"] = sum(r for r in rss if r is not None) / 1024
        out["idle_rss_mb_max_proxy"] = max(r for r in rss if r is not None) / 1024
    put("waypoint_idle_rss_mb", idle.get(WAYPOINT_ROLE, {}).get("rss_kb"), 1 / 1024)
    for rate, ph in run.get("http", {}).items():
        if not isinstance(ph, dict) or ph.get("excluded"):
            continue  # a round whose baseline was disturbed: recorded, not counted
        lat = ph.get("latency_ms", {})
        for p in ("p50", "p90", "p99", "p999"):
            put(f"{p}_ms@{rate}", lat.get(p))
        put(f"achieved_rps@{rate}", ph.get("achieved_rps"))
        put(f"unanswered@{rate}", ph.get("unanswered"))
        put(f"client_cores@{rate}", ph.get("client_cpu_cores"))
        c = ph.get("costs", {})
        put(f"cpu_s_per_1000@{rate}", c.get("total", {}).get("cpu_s_per_1000_req"))
        put(f"rss_mb@{rate}", c.get("total", {}).get("rss_kb"), 1 / 1024)
        tunnel = [_num(v.get("cpu_s_per_1000_req")) for k, v in c.items() if k.startswith("tunnel")]
        if tunnel and all(t is not None for t in tunnel):
            out[f"tunnel_cpu_s_per_1000_max@{rate}"] = max(t for t in tunnel if t is not None)
        # The waypoint alone: CPU seconds per 1000 requests is vCPU per 1000 rps.
        wp = c.get(WAYPOINT_ROLE, {})
        put(f"waypoint_cpu_s_per_1000@{rate}", wp.get("cpu_s_per_1000_req"))
        put(f"waypoint_rss_mb@{rate}", wp.get("rss_kb"), 1 / 1024)
    conn = run.get("connect", {})
    put("conn_per_s", conn.get("per_second"))
    put("tunnel_opened_per_s", conn.get("tunnel_opened_per_second"))
    put("conn_failed", conn.get("failed"))
    put("connect_client_cores", conn.get("client_cpu_cores"))
    times = conn.get("conn_ms") or {}
    put("conn_ms_p50", times.get("p50"))
    put("conn_ms_p99", times.get("p99"))
    put("server_accepts_per_conn", conn.get("server_accepts_per_conn"))
    hs = run.get("handshake") or {}
    put("handshakes_per_s", hs.get("handshakes_per_second"))
    put("handshake_client_cores", hs.get("client_cpu_cores"))
    put("handshake_server_cpu_ms", hs.get("server_cpu_ms_per_handshake"))
    put("kb_per_conn", run.get("conns", {}).get("bytes_per_connection"), 1 / 1024)
    return out


def collect(runs: Iterable[dict[str, Any]]) -> dict[tuple[str, str], dict[str, list[float]]]:
    """Per scenario and placement, each metric's values over the counted rounds."""
    acc: dict[tuple[str, str], dict[str, list[float]]] = {}
    for run in runs:
        if run.get("error"):
            continue
        key = (str(run["scenario"]), str(run["placement"]))
        for m, v in flatten(run).items():
            acc.setdefault(key, {}).setdefault(m, []).append(v)
    return acc


def spreads(runs: Iterable[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Spread]]:
    """Per scenario and placement, each metric's median and min..max over counted rounds."""
    out: dict[tuple[str, str], dict[str, Spread]] = {}
    for k, ms in collect(runs).items():
        for m, vs in ms.items():
            sp = spread(vs)
            if sp is not None:
                out.setdefault(k, {})[m] = sp
    return out


def _by_round(
    runs: Iterable[dict[str, Any]], placement: str, metric: str
) -> dict[tuple[str, int, int], float]:
    """`metric` of every counted run of `placement`, by (scenario, round, attempt): the
    runs of one round and attempt were measured side by side."""
    got: dict[tuple[str, int, int], float] = {}
    for run in runs:
        if run.get("error") or run.get("placement") != placement:
            continue
        v = flatten(run).get(metric)
        if v is not None:
            got[(str(run["scenario"]), int(run.get("round", 0)), int(run.get("attempt", 0)))] = v
    return got


def paired_added(
    runs: Iterable[dict[str, Any]], scenario: str, base: str, placement: str, rate: str
) -> list[float]:
    """The p99 `scenario` adds over `base` in each counted round (same round and attempt:
    both were measured side by side, under the same load of the machine)."""
    p99 = _by_round(runs, placement, f"p99_ms@{rate}")
    return [
        v - p99[(base, r, a)]
        for (s, r, a), v in sorted(p99.items())
        if s == scenario and (base, r, a) in p99
    ]


def aggregate(runs: Iterable[dict[str, Any]]) -> Agg:
    """Per scenario and placement, the median over rounds of each metric; for idle RSS the
    smallest (older documents: the round in which the placement ran first saw the proxies
    cold)."""
    acc = collect(runs)
    return {
        k: {
            m: (min(vs) if m.startswith("idle_rss") else statistics.median(vs))
            for m, vs in ms.items()
        }
        for k, ms in acc.items()
    }


def merged_hists(runs: Iterable[dict[str, Any]], rate: str) -> dict[tuple[str, str], Histogram]:
    out: dict[tuple[str, str], Histogram] = {}
    for run in runs:
        ph = run.get("http", {}).get(rate)
        if run.get("error") or not ph or "hist_ns" not in ph or ph.get("excluded"):
            continue
        key = (str(run["scenario"]), str(run["placement"]))
        out.setdefault(key, Histogram()).merge(Histogram.from_json(ph["hist_ns"]))
    return out


def scenario_order(names: Iterable[str]) -> list[str]:
    known = [n for n in ORDER if n in set(names)]
    return known + sorted(set(names) - set(ORDER))


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


# --- targets (issue 5 item 5) ----------------------------------------------------------------


# The phases measured in every round besides the latency steps, each recorded on its own:
# one that fails leaves its error there and the round's other figures stand.
CHURN_PHASES = ("connect", "handshake")


def paired_ratio(
    runs: Iterable[dict[str, Any]], scenario: str, base: str, placement: str, metric: str
) -> list[float]:
    """`scenario`'s `metric` over `base`'s in each round that has both (the two were
    measured back to back in that round, under the same load of the machine)."""
    got = _by_round(runs, placement, metric)
    return [
        v / got[(base, r, a)]
        for (s, r, a), v in sorted(got.items())
        if s == scenario and got.get((base, r, a))
    ]


def _paired(
    runs: list[dict[str, Any]] | None,
    agg: Agg,
    scenario: str,
    base: str,
    placement: str,
    metric: str,
) -> tuple[float | None, Spread | None]:
    """The median of the per-round ratios and their spread; without runs (or without a
    round that has both), the ratio of the two medians."""
    sp = spread(paired_ratio(runs, scenario, base, placement, metric)) if runs else None
    if sp is not None:
        return sp.median, sp
    a, b = agg.get((scenario, placement), {}), agg.get((base, placement), {})
    return ratio(a.get(metric), b.get(metric)), None


@dataclass(frozen=True, slots=True)
class TargetResult:
    name: str
    placement: str
    value: float | None  # the measured ratio or figure
    limit: float
    at_least: bool  # True: value >= limit is met; False: value <= limit is met
    unit: str
    spread: Spread | None = None  # over rounds, when the value is a median of rounds

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        return self.value >= self.limit if self.at_least else self.value <= self.limit


def targets(
    agg: Agg, rate: int = REF_RATE, runs: list[dict[str, Any]] | None = None
) -> list[TargetResult]:
    """The targets, judged on medians over rounds. Given the runs, an added p99 is the
    median of the per-round differences (each round's pair measured side by side);
    without, the difference of the two medians."""
    out: list[TargetResult] = []
    r = str(rate)
    sps = spreads(runs) if runs else {}
    for pl in PLACEMENTS:
        amb, none = agg.get((AMBIENT, pl)), agg.get((BASELINE, pl))
        if amb is None:
            out.extend(waypoint_targets(agg, pl, rate, runs))
            continue
        rel, side = agg.get((RELAY, pl), {}), agg.get((SIDECAR, pl))
        base = none or {}

        def t(
            name: str,
            v: float | None,
            limit: float,
            at_least: bool,
            unit: str,
            pl: str = pl,
            sp: Spread | None = None,
        ) -> None:
            out.append(TargetResult(name, pl, v, limit, at_least, unit, sp))

        t(
            "ambient / relay throughput",
            ratio(amb.get("bulk_gbit"), rel.get("bulk_gbit")),
            0.7,
            True,
            "x",
        )
        t(
            "ambient / none throughput",
            ratio(amb.get("bulk_gbit"), base.get("bulk_gbit")),
            0.3,
            True,
            "x",
        )
        added = _added(runs, AMBIENT, BASELINE, pl, r, agg)
        added_sp = spread(paired_added(runs, AMBIENT, BASELINE, pl, r)) if runs else None
        t(f"ambient added p99 at {rate} rps", added, 0.15, False, "ms", sp=added_sp)
        if side is not None:
            side_added = _added(runs, SIDECAR, BASELINE, pl, r, agg)
            # Below zero, ambient's added latency is lost in the noise: count it as none.
            lat_ratio = (
                ratio(max(0.0, added), side_added)
                if added is not None and side_added is not None and side_added > 0
                else None
            )
            t("ambient / sidecar added p99", lat_ratio, 0.5, False, "x")
            cpu = ratio(amb.get(f"cpu_s_per_1000@{r}"), side.get(f"cpu_s_per_1000@{r}"))
            t("ambient / sidecar CPU per 1000 req", cpu, 0.5, False, "x")
        t(
            "tunnel vCPU per 1000 rps (busiest tunnel)",
            amb.get(f"tunnel_cpu_s_per_1000_max@{r}"),
            0.1,
            False,
            "vCPU",
            sp=sps.get((AMBIENT, pl), {}).get(f"tunnel_cpu_s_per_1000_max@{r}"),
        )
        hap = agg.get((HAPROXY, pl))
        if hap is not None:
            # Connection setup against the HAProxy sidecar pair (mTLS between them): the
            # pace a user's short connections meet, and the CPU both meshes spend.
            conn, conn_sp = _paired(runs, agg, AMBIENT, HAPROXY, pl, "conn_per_s")
            t("ambient / sidecar-haproxy new connections per second", conn, 0.7, True, "x",
              sp=conn_sp)  # fmt: skip
            t(
                "ambient / sidecar-haproxy proxy CPU per 1000 req",
                ratio(amb.get(f"cpu_s_per_1000@{r}"), hap.get(f"cpu_s_per_1000@{r}")),
                1.0,
                False,
                "x",
            )
            hs, hs_sp = _paired(runs, agg, AMBIENT, HAPROXY, pl, "handshakes_per_s")
            t("ambient / sidecar-haproxy new mTLS handshakes per second", hs, 1.0, True, "x",
              sp=hs_sp)  # fmt: skip
        t("tunnel idle RSS (largest tunnel)", amb.get("idle_rss_mb_max_proxy"), 40.0, False, "MB")
        t("memory per open connection (all tunnels)", amb.get("kb_per_conn"), 8.0, False, "KB")
        out.extend(waypoint_targets(agg, pl, rate, runs))
    return out


def _added(
    runs: list[dict[str, Any]] | None, scenario: str, base: str, pl: str, r: str, agg: Agg
) -> float | None:
    if runs is not None:
        sp = spread(paired_added(runs, scenario, base, pl, r))
        return None if sp is None else sp.median
    return _diff(
        agg.get((scenario, pl), {}).get(f"p99_ms@{r}"), agg.get((base, pl), {}).get(f"p99_ms@{r}")
    )


def waypoint_targets(
    agg: Agg, pl: str, rate: int = REF_RATE, runs: list[dict[str, Any]] | None = None
) -> list[TargetResult]:
    """The waypoint's targets in one placement (none without an ambient-waypoint row):
    its own CPU per 1000 rps, the p99 it adds over ambient L4, its idle RSS."""
    wp = agg.get((WAYPOINT, pl))
    if wp is None:
        return []
    r = str(rate)
    cpu_sp = spreads(runs).get((WAYPOINT, pl), {}) if runs else {}
    added_sp = spread(paired_added(runs, WAYPOINT, AMBIENT, pl, r)) if runs else None
    return [
        TargetResult(
            "waypoint vCPU per 1000 rps", pl, wp.get(f"waypoint_cpu_s_per_1000@{r}"), 0.25,
            False, "vCPU", cpu_sp.get(f"waypoint_cpu_s_per_1000@{r}"),
        ),
        TargetResult(
            f"waypoint added p99 over ambient L4 at {rate} rps", pl,
            _added(runs, WAYPOINT, AMBIENT, pl, r, agg), 1.0, False, "ms", added_sp,
        ),
        TargetResult("waypoint idle RSS", pl, wp.get("waypoint_idle_rss_mb"), 60.0, False, "MB"),
    ]  # fmt: skip


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


# --- Markdown ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Metric:
    key: str
    title: str
    unit: str
    fmt: str = ".3f"


def metrics_for(rates: Iterable[str]) -> list[Metric]:
    ms = [Metric("bulk_gbit", "Single-connection throughput", "Gbit/s", ".2f")]
    for r in rates:
        ms += [
            Metric(f"p50_ms@{r}", f"p50 latency at {r} rps", "ms"),
            Metric(f"p99_ms@{r}", f"p99 latency at {r} rps", "ms"),
            Metric(f"p999_ms@{r}", f"p99.9 latency at {r} rps", "ms"),
            Metric(f"achieved_rps@{r}", f"Achieved rate at {r} rps", "req/s", ".0f"),
            Metric(
                f"client_cores@{r}",
                f"Load generator CPU at {r} rps (cores busy; above 0.8 it is saturated)",
                "cores",
                ".2f",
            ),
            Metric(f"cpu_s_per_1000@{r}", f"Proxy CPU per 1000 requests at {r} rps", "CPU s"),
            Metric(f"rss_mb@{r}", f"Proxy RSS after {r} rps", "MB", ".1f"),
            Metric(
                f"waypoint_cpu_s_per_1000@{r}",
                f"Waypoint CPU per 1000 requests at {r} rps (= vCPU per 1000 rps)",
                "CPU s",
            ),
            Metric(f"waypoint_rss_mb@{r}", f"Waypoint RSS after {r} rps", "MB", ".1f"),
        ]
    ms += [
        Metric("idle_rss_mb", "Proxy RSS, idle (all proxies)", "MB", ".1f"),
        Metric("waypoint_idle_rss_mb", "Waypoint RSS, idle", "MB", ".1f"),
        Metric("conn_per_s", "New connections per second", "conn/s", ".0f"),
        Metric(
            "conn_failed",
            "New connection attempts that failed (kinds: results.json, connect.errors)",
            "attempts",
            ".0f",
        ),
        Metric(
            "connect_client_cores",
            "Load generator CPU during the new connections (cores busy, all its processes; "
            "above 0.8 per process it is saturated)",
            "cores",
            ".2f",
        ),
        Metric(
            "conn_ms_p50",
            "Time of one new connection, connect to the whole answer, with all in flight, p50",
            "ms",
            ".2f",
        ),
        Metric("conn_ms_p99", "The same, p99", "ms", ".2f"),
        Metric(
            "server_accepts_per_conn",
            "Connections accepted in the server pod per new client connection (1: each "
            "reaches the app as its own; near 0: a proxy before the app re-uses its own)",
            "accepts",
            ".2f",
        ),
        Metric(
            "tunnel_opened_per_s",
            "Connections the source tunnel opened per second",
            "conn/s",
            ".0f",
        ),
        Metric(
            "handshakes_per_s",
            "New mTLS handshakes per second (HBONE CONNECT answered)",
            "handshakes/s",
            ".0f",
        ),
        Metric(
            "handshake_client_cores",
            "Load generator CPU during the handshakes (cores busy)",
            "cores",
            ".2f",
        ),
        Metric(
            "handshake_server_cpu_ms",
            "Server-side proxy CPU per new mTLS handshake",
            "CPU ms",
            ".2f",
        ),
        Metric("kb_per_conn", "Proxy memory per open idle connection", "KB", ".2f"),
    ]
    return ms


def _cell(v: float | None, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def _spread_cell(v: float | None, sp: Spread | None, fmt: str) -> str:
    """The median, and min..max beside it when rounds differ."""
    if v is None or sp is None or sp.n < 2:
        return _cell(v, fmt)
    return f"{format(v, fmt)} ({format(sp.low, fmt)}..{format(sp.high, fmt)})"


def metric_table(
    agg: Agg,
    m: Metric,
    placements: list[str],
    sps: dict[tuple[str, str], dict[str, Spread]] | None = None,
) -> str:
    """One metric, a row per scenario; with `sps`, a median of several rounds (the latency
    steps, new connections, handshakes) carries its min..max over them."""
    names = scenario_order({s for s, _ in agg})
    has_sidecar = any((SIDECAR, p) in agg for p in placements)
    head = ["scenario"]
    for p in placements:
        head += [f"{p} ({m.unit})", "x none"] + (["x sidecar"] if has_sidecar else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in names:
        row = [s]
        for p in placements:
            v = agg.get((s, p), {}).get(m.key)
            sp = (sps or {}).get((s, p), {}).get(m.key)
            row += [
                _spread_cell(v, sp, m.fmt),
                _cell(ratio(v, agg.get((BASELINE, p), {}).get(m.key)), ".2f"),
            ]
            if has_sidecar:
                side = agg.get((SIDECAR, p), {}).get(m.key) if s == AMBIENT else None
                row.append(_cell(ratio(v, side), ".2f"))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def targets_table(ts: list[TargetResult]) -> str:
    lines = [
        "| target | placement | measured (median) | spread over rounds | limit | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for t in ts:
        verdict = {True: "met", False: "**not met**", None: "not measured"}[t.met]
        op = ">=" if t.at_least else "<="
        sp = (
            f"{t.spread.low:.3f}..{t.spread.high:.3f} ({t.spread.n} rounds)"
            if t.spread is not None and t.spread.n > 1
            else ""
        )
        lines.append(
            f"| {t.name} | {t.placement} | {_cell(t.value, '.3f')} {t.unit} | {sp} "
            f"| {op} {t.limit:g} {t.unit} | {verdict} |"
        )
    return "\n".join(lines)


def waypoint_table(agg: Agg, rates: Iterable[str], placements: list[str]) -> str:
    """The waypoint (L7) beside ambient (L4) and the L7 sidecar pair, per placement and
    rate: latency percentiles, the p99 the waypoint adds over ambient, its CPU and RSS.
    Empty when no ambient-waypoint row was measured."""
    if not any(s == WAYPOINT for s, _ in agg):
        return ""
    head = [
        "placement", "rps", "scenario", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms",
        "added p99 over ambient ms", "waypoint vCPU per 1000 rps", "waypoint RSS MB",
    ]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for pl in placements:
        amb = agg.get((AMBIENT, pl), {})
        for r in rates:
            for s in (AMBIENT, WAYPOINT, HAPROXY):
                m = agg.get((s, pl))
                if m is None:
                    continue
                p99 = m.get(f"p99_ms@{r}")
                added = _diff(p99, amb.get(f"p99_ms@{r}")) if s != AMBIENT else None
                cells = [
                    pl, r, s,
                    *(_cell(m.get(f"{p}_ms@{r}"), ".3f") for p in ("p50", "p90", "p99", "p999")),
                    _cell(added, "+.3f"),
                    _cell(m.get(f"waypoint_cpu_s_per_1000@{r}"), ".3f"),
                    _cell(m.get(f"waypoint_rss_mb@{r}"), ".1f"),
                ]  # fmt: skip
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def earlier_section(earlier: dict[str, Any]) -> str:
    lines: list[str] = []
    rb = earlier.get("rbac_check")
    if isinstance(rb, dict) and isinstance(rb.get("evaluate"), dict):
        lines += [
            f"Policy checks (rbac_check, {rb.get('policies')} policies): build "
            f"{_cell(_num(rb.get('build_ms')), '.0f')} ms; per check:",
            "",
            "| request | median µs | p99 µs |",
            "|---|---|---|",
        ]
        for name, r in rb["evaluate"].items():
            lines.append(
                f"| {name} | {_cell(_num(r.get('median_us')), '.2f')} "
                f"| {_cell(_num(r.get('p99_us')), '.2f')} |"
            )
        lines.append("")
    sl = earlier.get("state_load")
    if isinstance(sl, dict) and isinstance(sl.get("rows"), list):
        lines += [
            "Workload store (state_load):",
            "",
            "| workloads | format | figures |",
            "|---|---|---|",
        ]
        for row in sl["rows"]:
            figures = ", ".join(
                f"{k} {v:.3g}"
                for k, v in row.items()
                if k not in ("workloads", "format") and isinstance(v, int | float)
            )
            lines.append(f"| {row.get('workloads')} | {row.get('format')} | {figures} |")
        lines.append("")
    for name, v in earlier.items():
        if isinstance(v, dict) and "error" in v:
            lines.append(f"{name}: not run ({v['error']})")
    return "\n".join(lines) if lines else "(not run)"


def rounds_section(doc: dict[str, Any], placements: list[str], rates: list[str]) -> list[str]:
    """How far this run's figures can be trusted: the CPU layout, the baseline's spread
    over rounds (the yardstick for comparing runs), disturbed rounds, saturated steps."""
    runs = doc.get("runs", [])
    sps = spreads(runs)
    lines = [
        "## Rounds, spread and the machine",
        "",
        f"CPU layout (the same for every scenario): {doc.get('cpu_layout', 'not recorded')}.",
        "",
        "Spread of the `none` baseline's p99 over the counted rounds (median, min..max). "
        "Another run (quick against full, or a later one) agrees with this one where their "
        "min..max ranges overlap; a difference smaller than these ranges is the machine's.",
        "",
        "| placement | rps | none p99 median ms | min..max ms | rounds |",
        "|---|---|---|---|---|",
    ]
    for pl in placements:
        for r in rates:
            sp = sps.get((BASELINE, pl), {}).get(f"p99_ms@{r}")
            if sp is not None:
                lines.append(
                    f"| {pl} | {r} | {sp.median:.3f} | {sp.low:.3f}..{sp.high:.3f} | {sp.n} |"
                )
    flagged = round_table.disturbed_notes(runs)
    lines += ["", "Disturbed baselines:" if flagged else "Disturbed baselines: none.", ""]
    lines += [f"- {n}" for n in flagged] + ([""] if flagged else [])
    sat = round_table.saturation_notes(runs) + round_table.churn_saturation_notes(runs)
    head = (
        "Load generator saturated (> 0.8 core over a rate step, or per process over a "
        "new-connection phase)"
    )
    lines += [f"{head}:" if sat else f"{head}: never.", ""]
    lines += [f"- {n}" for n in sat] + ([""] if sat else [])
    return lines


def _interpreter(doc: dict[str, Any]) -> str:
    """'Python 3.11.2 (/usr)': the version and where its build lives (runs before the prefix
    was recorded give the version alone)."""
    host = doc.get("host", {})
    prefix = host.get("python_prefix")
    return f"Python {host.get('python', '?')}" + (f" ({prefix})" if prefix else "")


def render(doc: dict[str, Any], plots: list[str]) -> str:
    runs = doc.get("runs", [])
    agg = aggregate(runs)
    sps = spreads(runs)
    placements = [p for p in PLACEMENTS if any(k[1] == p for k in agg)]
    rates = sorted({r for run in runs for r in run.get("http", {})}, key=float)
    params = doc.get("params", {})
    out = [
        "# Mesh cost benchmark",
        "",
        f"Run {doc.get('time', '?')} on {doc.get('host', {}).get('cpus', '?')} CPUs, "
        f"kernel {doc.get('host', {}).get('kernel', '?')}, {_interpreter(doc)}; "
        f"mode `{params.get('mode', '?')}`, {params.get('rounds', '?')} round(s), "
        "medians over rounds. Only ratios within this run compare (shared, noisy machine).",
        f"Command: `{doc.get('command', '?')}`",
        "",
        "## Targets",
        "",
        targets_table(targets(agg, runs=runs)),
        "",
        *rounds_section(doc, placements, rates),
    ]
    wp = waypoint_table(agg, rates, placements)
    if wp:
        idle = ", ".join(
            f"{pl} {_cell(agg.get((WAYPOINT, pl), {}).get('waypoint_idle_rss_mb'), '.1f')} MB"
            for pl in placements
        )
        out += [
            "## Waypoint (L7) beside ambient (L4) and sidecar-haproxy",
            "",
            f"Waypoint idle RSS: {idle}.",
            "",
            wp,
            "",
        ]
    for m in metrics_for(rates):
        if not any(m.key in v for v in agg.values()):
            continue
        out += [f"## {m.title}", "", metric_table(agg, m, placements, sps), ""]
    per_round = round_table.per_round_table(runs, scenario_order)
    if per_round:
        out += [
            "## Latency and cost per round",
            "",
            "Each round's value (a round's repeats joined by ` / `; ~~struck~~: left out, "
            "its `none` baseline was disturbed; `!`: kept though disturbed, no repeat left), "
            "the median over the counted rounds and their min..max.",
            "",
            per_round,
            "",
        ]
    notes = [f"- {s['scenario']}: skipped ({s['reason']})" for s in doc.get("skipped", [])]
    notes += [
        f"- {r['scenario']} {r['placement']} round {r.get('round')}: failed ({r['error']})"
        for r in runs
        if r.get("error")
    ]
    notes += [
        f"- {r['scenario']} {r['placement']} round {r.get('round')}: {phase} failed "
        f"({r[phase]['error']})"
        for r in runs
        for phase in CHURN_PHASES
        if isinstance(r.get(phase), dict) and r[phase].get("error")
    ]
    notes += [
        f"- {r['scenario']} {r['placement']} round {r.get('round')}: proxy process(es) "
        f"{', '.join(r['dead_proxies'])} gone by the end of the run (figures after that "
        "moment are missing)"
        for r in runs
        if r.get("dead_proxies")
    ]
    notes += [f"- {n}" for n in doc.get("notes", [])]
    if notes:
        out += ["## Notes", "", *notes, ""]
    out += ["## Earlier benchmarks", "", earlier_section(doc.get("earlier", {})), ""]
    if plots:
        out += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(out)


# --- plots ------------------------------------------------------------------------------------


def write_plots(doc: dict[str, Any], outdir: Path) -> list[str]:
    """Write the PNGs; returns their names (relative to outdir): latency CDF per placement,
    CPU and memory per 1000 requests, throughput and connection rate bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = doc.get("runs", [])
    agg = aggregate(runs)
    rates = sorted({r for run in runs for r in run.get("http", {})}, key=float)
    ref = str(REF_RATE) if str(REF_RATE) in rates else (rates[-1] if rates else None)
    names = scenario_order({s for s, _ in agg})
    placements = [p for p in PLACEMENTS if any(k[1] == p for k in agg)]
    written: list[str] = []

    if ref is not None:
        hists = merged_hists(runs, ref)
        for pl in placements:
            fig, ax = plt.subplots(figsize=(7, 4.5))
            for s in names:
                h = hists.get((s, pl))
                if h is None or h.total == 0:
                    continue
                xs, ys = zip(*h.cdf(), strict=True)
                ax.step(xs, ys, where="post", label=s)
            ax.set_xscale("log")
            ax.set_xlabel("latency (ms, from the intended send time)")
            ax.set_ylabel("fraction of requests")
            ax.set_title(f"Latency CDF, {ref} rps, {pl}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
            name = f"latency_cdf_{pl}.png"
            fig.savefig(outdir / name, dpi=100, bbox_inches="tight")
            plt.close(fig)
            written.append(name)

    def bars(
        title: str, ylabel: str, fname: str, value: Callable[[str, str], float | None]
    ) -> None:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        width = 0.8 / max(1, len(placements))
        for i, pl in enumerate(placements):
            ys = [value(s, pl) or 0.0 for s in names]
            ax.bar([x + i * width for x in range(len(names))], ys, width, label=pl)
        ax.set_xticks([x + width * (len(placements) - 1) / 2 for x in range(len(names))])
        ax.set_xticklabels(names)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend()
        fig.savefig(outdir / fname, dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(fname)

    def get(key: str) -> Callable[[str, str], float | None]:
        return lambda s, pl: agg.get((s, pl), {}).get(key)

    if ref is not None:
        bars(
            f"Proxy CPU per 1000 requests ({ref} rps)",
            "CPU seconds",
            "cpu_per_1000.png",
            get(f"cpu_s_per_1000@{ref}"),
        )
        bars(f"Proxy RSS after {ref} rps", "MB", "memory.png", get(f"rss_mb@{ref}"))
    bars("Single-connection throughput", "Gbit/s", "throughput.png", get("bulk_gbit"))
    bars("New connections per second", "conn/s", "connections.png", get("conn_per_s"))
    return written


def write_report(doc: dict[str, Any], outdir: Path) -> Path:
    plots = write_plots(doc, outdir)
    path = outdir / "report.md"
    path.write_text(render(doc, plots), encoding="utf-8")
    return path
