"""From a soak run's raw document to its summary, report.md and plots. `summarize` and
`render` are pure (tested on hand-made documents); `write_plots` and `write_report` do the I/O.

The raw document (results.json) is:
  {"benchmark": "soak", "params": {...}, "limits": {...}, "idle": {role: sample},
   "held_phase": {"requested", "opened", "errors", "seconds"}, "after_held": {role: sample},
   "timeline": [{"t", "alive", "in_flight", "new": {...}, "held": {...}, "gen_cpu_s",
                 "proxies": {role: {"rss_kb", "fds", "cpu_s"}}}],
   "end": {...}, "at_end": {role: sample}, "after_close": {role: sample}, "notes": [str],
   "tcp_counters": {"churn": {namespace: {"Section.Counter": gained}}, "softnet_dropped"}}
where a sample is {"rss_kb", "fds", "cpu_s"} (None when the process is gone).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import analysis, tcpstats
from .analysis import Percentiles, Target, Trend

PLOTS = ("rss.png", "fds.png", "errors.png", "latency.png", "rate.png", "cpu.png")
MAX_TABLE_ROWS = 30


def _series(timeline: Sequence[Mapping[str, Any]], role: str, key: str) -> list[float | None]:
    out: list[float | None] = []
    for e in timeline:
        s = e.get("proxies", {}).get(role)
        v = s.get(key) if isinstance(s, Mapping) else None
        out.append(float(v) if isinstance(v, int | float) else None)
    return out


def _rates(doc: Mapping[str, Any]) -> list[dict[str, float | None]]:
    """Per interval: its length, new connections completed per second, the generator's and
    each tunnel's cores busy (the first interval's from the samples taken as it began)."""
    timeline: Sequence[Mapping[str, Any]] = doc.get("timeline", [])
    out: list[dict[str, float | None]] = []
    prev_t, prev_gen = 0.0, doc.get("held_phase", {}).get("cpu_s")
    prev_host = doc.get("after_held_host_cpu_s")
    prev_cpu: dict[str, float | None] = {
        role: s.get("cpu_s") if isinstance(s, Mapping) else None
        for role, s in doc.get("after_held", {}).items()
    }
    for e in timeline:
        dt = float(e["t"]) - prev_t
        row: dict[str, float | None] = {"dt": dt}
        row["new_per_s"] = e["new"]["ok"] / dt if dt > 0 else None
        gen = e.get("gen_cpu_s")
        row["gen_cores"] = analysis.busy_cores(prev_gen, gen, dt) if prev_gen is not None else None
        for role, s in e.get("proxies", {}).items():
            cpu = s.get("cpu_s") if isinstance(s, Mapping) else None
            before = prev_cpu.get(role)
            row[f"cores:{role}"] = (
                analysis.busy_cores(before, cpu, dt) if before is not None else None
            )
            prev_cpu[role] = cpu
        host = e.get("host_cpu_s")
        row["host_cores"] = analysis.busy_cores(prev_host, host, dt)
        prev_t, prev_gen, prev_host = float(e["t"]), gen, host
        out.append(row)
    return out


def summarize(doc: Mapping[str, Any]) -> dict[str, Any]:
    """Trends, totals, percentiles and targets of one run."""
    p = doc["params"]
    tl: list[Mapping[str, Any]] = doc.get("timeline", [])
    ts = [float(e["t"]) for e in tl]
    roles = sorted(doc.get("idle", {}))
    warm = float(p["warmup"])
    judged = [e for e in tl if float(e["t"]) >= warm]
    skip = len(tl) - len(judged)

    trends: dict[str, dict[str, Trend | None]] = {}
    targets: list[Target] = []
    fd_marks: dict[str, dict[str, int | None]] = {}
    for role in roles:
        rss_series = _series(tl, role, "rss_kb")
        rss = analysis.trend_after_warmup(ts, rss_series, warm)
        rss_late = analysis.second_half(ts, rss_series, warm)
        fds_series = _series(tl, role, "fds")
        fds = analysis.trend_after_warmup(ts, fds_series, warm)
        trends[role] = {"rss_kb": rss, "fds": fds}
        _, judged_fds = analysis.after_warmup(ts, fds_series, warm)
        at_warm = int(judged_fds[0]) if judged_fds else None
        at_end = int(judged_fds[-1]) if judged_fds else None
        fd_marks[role] = {"after_warmup": at_warm, "end": at_end}
        targets.append(analysis.rss_target(role, rss, rss_late))
        targets.append(analysis.fd_target(role, fds, at_warm, at_end))

    new_errors: dict[str, int] = {}
    held_errors: dict[str, int] = {}
    new_ok = missed_cap = missed_late = started = held_ok = 0
    for e in tl:
        analysis.add_counts(new_errors, e["new"]["errors"])
        analysis.add_counts(held_errors, e["held"]["errors"])
        new_ok += e["new"]["ok"]
        started += e["new"]["started"]
        missed_cap += e["new"]["missed_cap"]
        missed_late += e["new"]["missed_late"]
        held_ok += e["held"]["ok"]
    hp = doc.get("held_phase", {})
    opened = int(hp.get("opened", 0))
    alive_end = doc.get("end", {}).get("alive")
    run_s = float(doc.get("end", {}).get("seconds") or p["duration"])
    targets.insert(0, analysis.errors_target(new_errors, held_errors))
    targets.insert(1, analysis.held_target(int(p["held"]), opened, alive_end))
    targets.insert(
        2,
        analysis.rate_target(
            float(p["rate"]), new_ok, float(p["duration"]), missed_cap + missed_late
        ),
    )

    rates = _rates(doc)
    gen = [r["gen_cores"] for r in rates if r["gen_cores"] is not None]
    busy = sum(1 for g in gen if g >= analysis.GENERATOR_BUSY)
    host = [h for r in rates if (h := r.get("host_cores")) is not None]
    cpu_ms_per_new: dict[str, float] = {}
    if tl and new_ok:
        for role in roles:
            before = (doc.get("after_held", {}).get(role) or {}).get("cpu_s")
            after = (tl[-1].get("proxies", {}).get(role) or {}).get("cpu_s")
            if isinstance(before, int | float) and isinstance(after, int | float):
                cpu_ms_per_new[role] = (after - before) * 1000.0 / new_ok
    g0, g1 = hp.get("cpu_s"), tl[-1].get("gen_cpu_s") if tl else None
    gen_per_new = (
        (g1 - g0) * 1000.0 / new_ok
        if isinstance(g0, int | float) and isinstance(g1, int | float) and new_ok
        else None
    )
    new_hists = [e["new"]["hist_ns"] for e in tl]
    held_hists = [e["held"]["hist_ns"] for e in tl]
    return {
        "roles": roles,
        "trends": trends,
        "fd_marks": fd_marks,
        "targets": targets,
        "new_errors": new_errors,
        "held_errors": held_errors,
        "new_started": started,
        "new_ok": new_ok,
        "missed_cap": missed_cap,
        "missed_late": missed_late,
        "held_round_trips": held_ok,
        "run_seconds": run_s,
        "new_latency": analysis.merged(new_hists, skip),
        "held_latency": analysis.merged(held_hists, skip),
        "new_per_interval": analysis.per_interval(new_hists),
        "held_per_interval": analysis.per_interval(held_hists),
        "lag_latency": analysis.merged([e["new"]["lag_hist_ns"] for e in tl], skip),
        "rates": rates,
        "gen_cores_mean": sum(gen) / len(gen) if gen else None,
        "gen_cores_max": max(gen) if gen else None,
        "gen_busy_intervals": busy,
        "intervals": len(tl),
        "host_cores_mean": sum(host) / len(host) if host else None,
        "cpu_ms_per_new": cpu_ms_per_new,
        "gen_cpu_ms_per_new": gen_per_new,
    }


# --- rendering --------------------------------------------------------------------------------


def _ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def _mb(kb: Any) -> str:
    return f"{kb / 1024:.1f}" if isinstance(kb, int | float) else "n/a"


def _pct_row(name: str, pc: Percentiles) -> str:
    return f"| {name} | {pc.count} | {_ms(pc.p50_ms)} | {_ms(pc.p99_ms)} | {_ms(pc.max_ms)} |"


def _verdict(t: Target) -> str:
    return {True: "met", False: "**not met**", None: "not measured"}[t.met]


def _sample(doc: Mapping[str, Any], key: str, role: str, field: str) -> Any:
    s = doc.get(key, {}).get(role)
    return s.get(field) if isinstance(s, Mapping) else None


def render(doc: Mapping[str, Any], summary: Mapping[str, Any], plots: Sequence[str]) -> str:
    p = doc["params"]
    out = [
        "# Soak and churn benchmark",
        "",
        f"`{doc.get('command', '')}`",
        "",
        f"{doc.get('time', '')}; {p['held']} held connections (a round trip each every "
        f"{p['held_period']:g} s), {p['rate']:g} new connections/s for {p['duration']:g} s, "
        f"sampled every {p['interval']:g} s, warm-up {p['warmup']:g} s; {p['placement']}: "
        f"client pod on node1, server pod on node2, both in the mesh. Host: "
        f"{doc.get('host', {}).get('cpus')} CPUs, kernel {doc.get('host', {}).get('kernel')}.",
        "",
        "## Targets",
        "",
        "| target | wanted | measured | verdict |",
        "|---|---|---|---|",
    ]
    for t in summary["targets"]:
        out.append(f"| {t.name} | {t.wanted} | {t.measured} | {_verdict(t)} |")
    out += ["", "## Load", ""]
    hp = doc.get("held_phase", {})
    run_s = summary["run_seconds"]
    out += [
        f"- held: {hp.get('opened', 0)} of {hp.get('requested', 0)} opened in "
        f"{hp.get('seconds', 0):.1f} s; {doc.get('end', {}).get('alive', 'n/a')} alive at the "
        f"end; {summary['held_round_trips']} round trips answered.",
        f"- new connections: {summary['new_ok']} completed of {summary['new_started']} "
        f"started in {p['duration']:g} s ({summary['new_ok'] / p['duration']:.0f}/s; the last "
        f"interval ends when those in flight have, at {run_s:.0f} s); "
        f"{summary['missed_cap']} scheduled starts missed because {p['max_in_flight']} were "
        f"still open, {summary['missed_late']} because the generator was over "
        "1 s late.",
        f"- how late starts were (generator lag, after the warm-up): p50 "
        f"{_ms(summary['lag_latency'].p50_ms)} ms, p99 {_ms(summary['lag_latency'].p99_ms)} ms, "
        f"max {_ms(summary['lag_latency'].max_ms)} ms.",
        f"- load generator: {_fmt(summary['gen_cores_mean'])} cores busy on average, "
        f"{_fmt(summary['gen_cores_max'])} at most; {summary['gen_busy_intervals']} of "
        f"{summary['intervals']} intervals at >= {analysis.GENERATOR_BUSY:g} core (its "
        "figures there may be its own limit, not the mesh's).",
    ]
    if summary["host_cores_mean"] is not None:
        out.append(
            f"- the whole machine: {summary['host_cores_mean']:.2f} of "
            f"{doc.get('host', {}).get('cpus')} cores busy on average (tunnels, generator, "
            "app, kernel and whatever else ran; `cpu.png` per interval)."
        )
    out += [
        "",
        "## Latency after the warm-up (ms)",
        "",
        "| what | count | p50 | p99 | max |",
        "|---|---|---|---|---|",
        _pct_row("new connection: connect + request + answer", summary["new_latency"]),
        _pct_row("held connection: round trip", summary["held_latency"]),
        "",
        "## Errors by kind (whole run)",
        "",
    ]
    errs = {**{f"new {k}": v for k, v in summary["new_errors"].items()},
            **{f"held {k}": v for k, v in summary["held_errors"].items()},
            **{f"opening held {k}": v for k, v in hp.get("errors", {}).items()}}  # fmt: skip
    if errs:
        out += ["| kind | count |", "|---|---|"]
        out += [f"| {k} | {v} |" for k, v in sorted(errs.items())]
    else:
        out.append("None.")
    out += _tcp_counters(doc)
    out += ["", "## Tunnels", ""]
    out += [
        "| tunnel | open-file limit | RSS MB idle | after held open | end | after close | "
        "fds idle | after held open | after warm-up | end | after close | cores busy (mean) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for role in summary["roles"]:
        cores = [r.get(f"cores:{role}") for r in summary["rates"]]
        got = [c for c in cores if c is not None]
        marks = summary["fd_marks"][role]
        out.append(
            f"| {role} | {doc.get('limits', {}).get(role, 'n/a')} | "
            f"{_mb(_sample(doc, 'idle', role, 'rss_kb'))} | "
            f"{_mb(_sample(doc, 'after_held', role, 'rss_kb'))} | "
            f"{_mb(_sample(doc, 'at_end', role, 'rss_kb'))} | "
            f"{_mb(_sample(doc, 'after_close', role, 'rss_kb'))} | "
            f"{_sample(doc, 'idle', role, 'fds')} | {_sample(doc, 'after_held', role, 'fds')} | "
            f"{marks['after_warmup']} | {marks['end']} | "
            f"{_sample(doc, 'after_close', role, 'fds')} | "
            f"{_fmt(sum(got) / len(got) if got else None)} |"
        )
    settle = doc.get("close_settle_s")
    if isinstance(settle, int | float):
        out += ["", f"'after close' was sampled once the descriptor counts had not changed for "
                f"2 s ({settle:.1f} s after the held connections closed)."]  # fmt: skip
    per = summary.get("cpu_ms_per_new", {})
    if per:
        out += [
            "",
            "CPU per new connection (each tunnel's CPU over the churn, held round trips "
            "included, divided by the new connections completed): "
            + ", ".join(f"{r} {v:.2f} ms" for r, v in sorted(per.items()))
            + f"; the load generator {_fmt(summary.get('gen_cpu_ms_per_new'))} ms.",
        ]
    out += _memory_table(doc)
    out += ["", "## Over time", ""]
    out += _interval_table(doc, summary)
    notes = list(doc.get("notes", []))
    if notes:
        out += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    if plots:
        out += ["", "## Plots", ""] + [f"![{n}]({n})" for n in plots]
    return "\n".join(out) + "\n"


# The tunnel's /memory figures, in the order the table shows them: (key, heading, scale).
MEMORY_PARTS = (
    ("rss_bytes", "RSS MB", 2**20),
    ("python_blocks", "Python blocks (k)", 1000),
    ("arenas", "pymalloc arenas (1 MiB)", 1),
    ("heap_in_use", "C heap in use MB", 2**20),
    ("heap_free", "C heap free MB", 2**20),
    ("mmapped", "C mmapped MB", 2**20),
)


def memory_marks(
    doc: Mapping[str, Any], role: str
) -> tuple[Mapping[str, Any], Mapping[str, Any]] | None:
    """A tunnel's /memory at the first sample after the warm-up and at the last one; None
    when it never answered (a run from before the endpoint)."""
    warm = float(doc["params"]["warmup"])
    seen = [
        m
        for e in doc.get("timeline", [])
        if float(e["t"]) >= warm and isinstance(m := (e.get("memory") or {}).get(role), Mapping)
    ]
    return (seen[0], seen[-1]) if seen else None


def _memory_table(doc: Mapping[str, Any]) -> list[str]:
    rows = []
    for role in sorted(doc.get("idle", {})):
        marks = memory_marks(doc, role)
        if marks is None:
            continue
        first, last = marks
        cells = []
        for key, _, scale in MEMORY_PARTS:
            a, b = first.get(key), last.get(key)
            if isinstance(a, int | float) and isinstance(b, int | float):
                cells.append(f"{a / scale:.1f} -> {b / scale:.1f} ({(b - a) / scale:+.1f})")
            else:
                cells.append("n/a")
        rows.append(f"| {role} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return [
        "",
        "## Where the memory is (each tunnel's admin `/memory`, after the warm-up -> end)",
        "",
        "Objects that pile up show as Python blocks or C heap in use rising; memory the "
        "allocators keep shows as RSS rising while those stay flat.",
        "",
        "| tunnel | " + " | ".join(h for _, h, _ in MEMORY_PARTS) + " |",
        "|---|" + "---|" * len(MEMORY_PARTS),
        *rows,
    ]


def _tcp_counters(doc: Mapping[str, Any]) -> list[str]:
    """The kernel's TCP counters gained over the churn, per namespace on the path: where
    connections were dropped or retransmitted (soakbench/tcpstats.py)."""
    tc = doc.get("tcp_counters")
    if not isinstance(tc, Mapping):
        return []
    churn: Mapping[str, Mapping[str, int]] = tc.get("churn") or {}
    out = ["", "## Kernel TCP counters over the churn", ""]
    labels = list(churn)
    if labels:
        out += [
            "| counter | meaning | " + " | ".join(labels) + " |",
            "|---|---|" + "---|" * len(labels),
        ]
        for (section, name), meaning in tcpstats.COUNTERS.items():
            key = f"{section}.{name}"
            cells = [str(churn[label].get(key, "n/a")) for label in labels]
            out.append(f"| {name} | {meaning} | " + " | ".join(cells) + " |")
    dropped = tc.get("softnet_dropped")
    out += ["", "Packets the machine's CPU backlogs dropped over the churn (softnet_stat): "
            + ("n/a" if dropped is None else str(dropped)) + "."]  # fmt: skip
    return out


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def _interval_table(doc: Mapping[str, Any], summary: Mapping[str, Any]) -> list[str]:
    tl = doc.get("timeline", [])
    if not tl:
        return ["No intervals."]
    step = max(1, -(-len(tl) // MAX_TABLE_ROWS))
    roles = summary["roles"]
    head = (
        "| t s | new/s | new p50 | new p99 | held p99 | errors | missed | in flight | alive | "
        "gen cores | " + " | ".join(f"{r} RSS MB | {r} fds" for r in roles) + " |"
    )
    out = [
        f"Every {step * doc['params']['interval']:g} s (one sampled interval each; latency in ms).",
        "",
        head,
        "|" + "---|" * (10 + 2 * len(roles)),
    ]
    for i in range(0, len(tl), step):
        e, r = tl[i], summary["rates"][i]
        n, h = summary["new_per_interval"][i], summary["held_per_interval"][i]
        errs = sum(e["new"]["errors"].values()) + sum(e["held"]["errors"].values())
        missed = e["new"]["missed_cap"] + e["new"]["missed_late"]
        cells = [
            f"{e['t']:.0f}", _fmt(r["new_per_s"]), _ms(n.p50_ms), _ms(n.p99_ms), _ms(h.p99_ms),
            str(errs), str(missed), str(e["in_flight"]), str(e["alive"]), _fmt(r["gen_cores"]),
        ]  # fmt: skip
        for role in roles:
            s = e.get("proxies", {}).get(role) or {}
            cells += [_mb(s.get("rss_kb")), str(s.get("fds", "n/a"))]
        out.append("| " + " | ".join(cells) + " |")
    return out


def summary_json(doc: Mapping[str, Any], summary: Mapping[str, Any]) -> dict[str, Any]:
    """The run without its histograms: small enough to keep beside the report."""

    def trend(t: Trend | None) -> dict[str, Any] | None:
        if t is None:
            return None
        return {
            "points": t.points, "span_s": t.span_s, "slope_per_min": t.slope_per_min,
            "growth": t.growth, "noise": t.noise, "flat": t.flat,
            "slope_stderr_per_min": t.slope_stderr_per_min, "first": t.first, "last": t.last,
        }  # fmt: skip

    def pc(v: Percentiles) -> dict[str, Any]:
        return {"count": v.count, "p50_ms": v.p50_ms, "p99_ms": v.p99_ms, "max_ms": v.max_ms}

    keep = {k: v for k, v in doc.items() if k != "timeline"}
    keep["timeline"] = [
        {
            "t": e["t"],
            "alive": e["alive"],
            "in_flight": e["in_flight"],
            "new": {k: v for k, v in e["new"].items() if not k.endswith("hist_ns")},
            "held": {k: v for k, v in e["held"].items() if not k.endswith("hist_ns")},
            "new_latency": pc(n),
            "held_latency": pc(h),
            "gen_cpu_s": e.get("gen_cpu_s"),
            "proxies": e.get("proxies"),
        }
        for e, n, h in zip(
            doc.get("timeline", []),
            summary["new_per_interval"],
            summary["held_per_interval"],
            strict=True,
        )
    ]
    keep["summary"] = {
        "targets": [
            {"name": t.name, "met": t.met, "measured": t.measured, "wanted": t.wanted}
            for t in summary["targets"]
        ],
        "trends": {r: {k: trend(v) for k, v in d.items()} for r, d in summary["trends"].items()},
        "new_latency": pc(summary["new_latency"]),
        "held_latency": pc(summary["held_latency"]),
        "new_errors": summary["new_errors"],
        "held_errors": summary["held_errors"],
        "new_ok": summary["new_ok"],
        "missed_cap": summary["missed_cap"],
        "missed_late": summary["missed_late"],
        "gen_cores_mean": summary["gen_cores_mean"],
        "gen_cores_max": summary["gen_cores_max"],
        "cpu_ms_per_new": summary["cpu_ms_per_new"],
        "gen_cpu_ms_per_new": summary["gen_cpu_ms_per_new"],
    }
    return keep


# --- plots ------------------------------------------------------------------------------------


def write_plots(doc: Mapping[str, Any], summary: Mapping[str, Any], outdir: Path) -> list[str]:
    """RSS (with the fitted line and its noise band), fds, errors, latency, rate, CPU."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tl = doc.get("timeline", [])
    if not tl:
        return []
    ts = [float(e["t"]) for e in tl]
    warm = float(doc["params"]["warmup"])
    written: list[str] = []

    def save(fig: Any, ax: Any, name: str, title: str, ylabel: str) -> None:
        ax.set_title(title)
        ax.set_xlabel("seconds since the churn started")
        ax.set_ylabel(ylabel)
        ax.axvline(warm, color="grey", linestyle=":", linewidth=1)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
        fig.savefig(outdir / name, dpi=90, bbox_inches="tight")
        plt.close(fig)
        written.append(name)

    def trended(key: str, scale: float, name: str, title: str, ylabel: str) -> None:
        fig, ax = plt.subplots(figsize=(8, 4.2))
        for role in summary["roles"]:
            ys = [None if v is None else v * scale for v in _series(tl, role, key)]
            (line,) = ax.plot(ts, [float("nan") if y is None else y for y in ys], label=role)
            tr: Trend | None = summary["trends"][role][key]
            if tr is not None:
                xs = [t for t in ts if t >= warm]
                fit = [(tr.intercept + tr.slope_per_min / 60.0 * t) * scale for t in xs]
                band = tr.noise * scale
                ax.plot(xs, fit, color=line.get_color(), linestyle="--", linewidth=1,
                        label=f"{role} fit ({'flat' if tr.flat else 'GROWS'})")  # fmt: skip
                ax.fill_between(xs, [f - band for f in fit], [f + band for f in fit],
                                color=line.get_color(), alpha=0.12)  # fmt: skip
        save(fig, ax, name, title, ylabel)

    trended("rss_kb", 1 / 1024, "rss.png", "Tunnel RSS (fit and noise band after the warm-up)",
            "MB")  # fmt: skip
    trended("fds", 1.0, "fds.png", "Tunnel open file descriptors", "fds")

    fig, ax = plt.subplots(figsize=(8, 4.2))
    ax.plot(ts, [sum(e["new"]["errors"].values()) for e in tl], label="new-connection errors")
    ax.plot(ts, [sum(e["held"]["errors"].values()) for e in tl], label="held-connection errors")
    ax.plot(ts, [e["new"]["missed_cap"] + e["new"]["missed_late"] for e in tl],
            label="scheduled starts missed", linestyle="--")  # fmt: skip
    save(fig, ax, "errors.png", "Errors and missed starts per interval", "count per interval")

    fig, axes = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    for ax, key, title in (
        (axes[0], "new_per_interval", "New connections: connect + request + answer"),
        (axes[1], "held_per_interval", "Held connections: round trip"),
    ):
        pcs: list[Percentiles] = summary[key]
        for attr in ("p50_ms", "p99_ms", "max_ms"):
            ys = [getattr(pc, attr) for pc in pcs]
            ax.plot(ts, [float("nan") if y is None else y for y in ys], label=attr[:-3])
        ax.set_yscale("log")
        ax.set_title(title, fontsize="medium")
        ax.set_ylabel("ms")
        ax.grid(True, which="both", alpha=0.3)
        ax.axvline(warm, color="grey", linestyle=":", linewidth=1)
        ax.legend(fontsize="small")
    axes[1].set_xlabel("seconds since the churn started")
    fig.suptitle("Latency per interval")
    fig.savefig(outdir / "latency.png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    written.append("latency.png")

    fig, ax = plt.subplots(figsize=(8, 4.2))
    rates = summary["rates"]
    ax.plot(ts, [r["new_per_s"] or 0.0 for r in rates], label="new connections completed/s")
    ax.axhline(float(doc["params"]["rate"]), color="red", linestyle="--", linewidth=1,
               label="target")  # fmt: skip
    ax2 = ax.twinx()
    ax2.plot(ts, [e["alive"] for e in tl], color="green", linewidth=1, label="held alive")
    ax2.set_ylabel("held connections alive")
    ax2.set_ylim(bottom=0)
    ax2.legend(loc="lower right", fontsize="small")
    save(fig, ax, "rate.png", "Rate achieved", "connections/s")

    fig, ax = plt.subplots(figsize=(8, 4.2))
    ax.plot(ts, [float("nan") if r["gen_cores"] is None else r["gen_cores"] for r in rates],
            label="load generator")  # fmt: skip
    for role in summary["roles"]:
        ys = [r.get(f"cores:{role}") for r in rates]
        ax.plot(ts, [float("nan") if y is None else y for y in ys], label=role)
    host = [r.get("host_cores") for r in rates]
    if any(h is not None for h in host):
        ax.plot(ts, [float("nan") if h is None else h for h in host], color="black",
                linewidth=1, label="whole machine")  # fmt: skip
    save(fig, ax, "cpu.png", "CPU per interval", "cores busy")
    return written


def write_report(doc: Mapping[str, Any], outdir: Path) -> tuple[Path, dict[str, Any]]:
    summary = summarize(doc)
    plots = write_plots(doc, summary, outdir)
    path = outdir / "report.md"
    path.write_text(render(doc, summary, plots), encoding="utf-8")
    return path, summary
