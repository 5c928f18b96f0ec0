"""What one new connection costs each tunnel: CPU microseconds per connection, cross-node and
same-node, and (with --profile) where they go.

The cluster is mesh_bench's (`meshbench/bench.yaml`, under its own name, state in a fresh
temp dir, torn down at the end, also on Ctrl-C / SIGTERM). Per round and placement, the load
generator in the client pod (`meshbench.loadgen connect`: --workers threads (4) over
--procs processes (1), each connect, one small request with `Connection: close`, the
answer, close; mesh_bench's phase uses 16 over 2) makes --connections new
connections, and each tunnel's utime + stime (from /proc) before and after give its CPU per
connection, less what the tunnel spends idle over the same wall time (measured just before).
The same count goes through the plain namespace (no mesh) as the machine's reference: only
ratios within one run compare, and CPU per connection is the figure that does not depend on
what the neighbours run.

--profile restarts both tunnels with `MESH_PROFILE` (meshcore/runtime/profile.py):
cProfile with a CPU-time clock, reset (SIGUSR1) after the warm-up and written (SIGUSR2)
after each placement's connections. Printed: each tunnel's own time by area and the
cumulative time of each step of a connection, per connection. cProfile inflates code made
of many small calls (about 2x here), so read shares, not absolute figures, from it.

Needs root. Every load run is bounded by count and time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pstats
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import cpusplit  # noqa: E402
from meshbench import plain  # noqa: E402
from meshbench.handshake import private_dir  # noqa: E402
from meshbench.scenario import Endpoint, HandshakeTarget  # noqa: E402

import nsutil  # noqa: E402
from localcluster.apps import INHERITED_ENV  # noqa: E402
from localcluster.interrupt import run_interruptible  # noqa: E402
from localcluster.mesh import (  # noqa: E402
    Cluster,
    MeshUpError,
    down,
    process_record,
    start_node_tunnel,
    stop_tunnel,
    tunnel_name,
    up,
    wait_ready,
)
from meshcore.runtime.profile import (  # noqa: E402
    DUMP_SIGNAL,
    PROFILE_ENV,
    RESET_SIGNAL,
    profile_file,
)

CLUSTER_NAME = "newconn"
NODES = ("node1", "node2")
GRACE = 60.0  # seconds a load run may take beyond its own time bound
IDLE_SAMPLE_S = 1.0

# The steps of a new connection, as (file suffix, function): their cumulative time per
# connection. A coroutine's cumulative time is its own running time over all its resumes.
STEPS: tuple[tuple[str, str, str], ...] = (
    ("client: accept -> handler", "ztunnel/proxy/common.py", "_accepted"),
    ("client: outbound handler (all of it)", "ztunnel/proxy/outbound.py", "_handle"),
    ("client: original destination", "meshcore/sockets.py", "original_dst"),
    ("client: outbound decision", "ztunnel/proxy/outbound.py", "decide"),
    ("client: CONNECT headers", "ztunnel/proxy/outbound.py", "connect_headers"),
    ("client: pool checkout", "meshcore/hbone/pool.py", "checkout"),
    ("client: HBONE stream open (HEADERS)", "meshcore/hbone/transport.py", "open_stream"),
    ("same-node: in-process hand-over", "ztunnel/proxy/inbound.py", "connect_local"),
    ("server: CONNECT received", "ztunnel/proxy/inbound.py", "on_request"),
    ("server: inbound decision", "ztunnel/proxy/inbound.py", "decide"),
    ("server: inbound handler (all of it)", "ztunnel/proxy/inbound.py", "_serve"),
    ("server: connect to the app", "ztunnel/proxy/common.py", "connect_tcp"),
    ("server: socket in the pod netns", "meshcore/sockets.py", "new"),
    ("server: CONNECT answer (HEADERS)", "meshcore/hbone/conn.py", "respond"),
    ("both: HTTP/2 input (all frames)", "meshcore/hbone/conn.py", "receive"),
    ("both: HPACK decode", "hpack/hpack.py", "decode"),
    ("both: HPACK encode", "hpack/hpack.py", "encode"),
    ("both: table + metrics at open", "meshcore/observability/connections.py", "follow"),
    ("both: table + metrics + log at close", "meshcore/observability/connections.py", "ended"),
    ("both: access-log line", "meshcore/observability/accesslog.py", "finish"),
)

# Own time grouped by where the code lives: first matching prefix of the file path.
AREAS: tuple[tuple[str, str], ...] = (
    ("ztunnel/", "ztunnel"),
    ("meshcore/hbone/", "meshcore.hbone"),
    ("meshcore/observability/", "meshcore.observability"),
    ("meshcore/relay.py", "meshcore.relay"),
    ("meshcore/", "meshcore (other)"),
    ("nsutil/", "nsutil (setns)"),
    ("structlog/", "structlog"),
    ("hpack/", "hpack"),
    ("asyncio/", "asyncio"),
    ("json/", "json"),
)


class BenchError(RuntimeError):
    pass


# --- pure ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    cpu_s: float  # user + system
    wall_s: float
    system_s: float = 0.0  # the kernel's part of cpu_s


def per_connection_us(
    before: Sample, after: Sample, idle_cpu_per_s: float, connections: int
) -> float | None:
    """CPU microseconds per connection of one process, less its idle CPU over the same wall
    time; None without connections."""
    if connections <= 0:
        return None
    busy = (after.cpu_s - before.cpu_s) - idle_cpu_per_s * (after.wall_s - before.wall_s)
    return max(0.0, busy) * 1e6 / connections


ProcStat = tuple[int, int, int]  # (busy, steal, total) jiffies


def parse_proc_stat(text: str) -> ProcStat:
    """(busy, steal, total) jiffies of all CPUs from /proc/stat's first line: busy is user,
    nice, system, irq and softirq; steal is the time the host gave the vCPUs to others."""
    f = [int(x) for x in text.splitlines()[0].split()[1:]]
    total = sum(f[:8])  # guest time is already counted in user and nice
    return f[0] + f[1] + f[2] + f[5] + f[6], f[7], total


def busy_cores(before: ProcStat, after: ProcStat, cpus: int) -> float:
    """How many cores were busy on average between two /proc/stat readings."""
    total = after[2] - before[2]
    return cpus * (after[0] - before[0]) / total if total > 0 else 0.0


def steal_cores(before: ProcStat, after: ProcStat, cpus: int) -> float:
    """How many of the machine's cores its host took away (steal), on average."""
    total = after[2] - before[2]
    return cpus * (after[1] - before[1]) / total if total > 0 else 0.0


StatKey = tuple[str, int, str]  # (file, line, function), as pstats keys them
StatRow = tuple[int, int, float, float, Any]  # (calls, primitive, tottime, cumtime, callers)


def area_of(filename: str) -> str:
    """The area a profile entry's file belongs to (builtins by what they are)."""
    path = filename.replace("\\", "/")
    for prefix, name in AREAS:
        if f"/{prefix}" in path or path.startswith(prefix):
            return name
    if filename == "~":
        return "builtins (syscalls, ssl, C)"
    if "/uvloop/" in path:
        return "uvloop"
    return "other Python"


def by_area(stats: Mapping[StatKey, StatRow], connections: int) -> list[tuple[str, float]]:
    """Own time per connection (µs) by area, largest first."""
    totals: dict[str, float] = {}
    for (filename, _line, _fn), row in stats.items():
        area = area_of(filename)
        totals[area] = totals.get(area, 0.0) + row[2]
    n = max(1, connections)
    return sorted(((a, t * 1e6 / n) for a, t in totals.items()), key=lambda x: -x[1])


def steps(stats: Mapping[StatKey, StatRow], connections: int) -> list[tuple[str, float, float]]:
    """(step, calls per connection, cumulative µs per connection) of each step in STEPS that
    the profile saw."""
    n = max(1, connections)
    out = []
    for label, suffix, fn in STEPS:
        calls = 0
        cum = 0.0
        for (filename, _line, name), row in stats.items():
            if name == fn and filename.replace("\\", "/").endswith(suffix):
                calls += row[0]
                cum += row[3]
        if calls:
            out.append((label, calls / n, cum * 1e6 / n))
    return out


def top_functions(
    stats: Mapping[StatKey, StatRow], connections: int, count: int
) -> list[tuple[str, float, float]]:
    """The `count` functions with the most own time: (name, calls per connection, own µs
    per connection)."""
    n = max(1, connections)
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:count]
    out = []
    for (filename, line, fn), row in rows:
        where = fn if filename == "~" else f"{_short(filename)}:{line}({fn})"
        out.append((where, row[0] / n, row[2] * 1e6 / n))
    return out


def _short(filename: str) -> str:
    parts = filename.replace("\\", "/").split("/")
    for anchor in ("site-packages", "python3.11", "newconn", "main"):
        if anchor in parts:
            i = len(parts) - 1 - parts[::-1].index(anchor)
            return "/".join(parts[i + 1 :])
    return "/".join(parts[-2:])


def format_costs(rows: Iterable[dict[str, Any]]) -> str:
    lines = [
        f"{'placement':<11}{'variant':<8}{'round':>6}{'conns':>7}{'ambient/s':>11}{'plain/s':>9}"
        f"{'busy':>6}{'node1 us/conn':>15}{'node2 us/conn':>15}{'both us/conn':>14}"
    ]
    for r in rows:
        n1, n2 = r["us_per_conn"].get("node1"), r["us_per_conn"].get("node2")
        both = sum(v for v in (n1, n2) if v is not None)
        lines.append(
            f"{r['placement']:<11}{r.get('variant', '-'):<8}{r.get('round', 0):>6}"
            f"{r['connections']:>7}"
            f"{r['per_second']:>11.0f}{r['plain_per_second']:>9.0f}{r['busy_cores']:>6.2f}"
            f"{_num(n1):>15}{_num(n2):>15}{both:>14.0f}"
        )
    return "\n".join(lines)


def summarize(rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, dict[str, float | None]]]:
    """Per placement and variant: the median CPU per connection of each tunnel and of both,
    the median rates; and per placement, `this` over `base` for each (when both ran)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["placement"], r["variant"]), []).append(r)
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for (placement, variant), rs in groups.items():
        med: dict[str, float | None] = {}
        for node in NODES:
            med[node] = _median([r["us_per_conn"][node] for r in rs])
        med["both"] = _median([_both(r) for r in rs])
        med["per_second"] = _median([r["per_second"] for r in rs])
        med["plain_per_second"] = _median([r["plain_per_second"] for r in rs])
        out.setdefault(placement, {})[variant] = med
    for by_variant in out.values():
        base, this = by_variant.get("base"), by_variant.get("this")
        if base is not None and this is not None:
            by_variant["this/base"] = {k: _ratio(this[k], base[k]) for k in base}
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _both(r: dict[str, Any]) -> float:
    return float(sum(v for v in r["us_per_conn"].values() if v is not None))


def _median(values: list[float | None]) -> float | None:
    vs = sorted(v for v in values if v is not None)
    if not vs:
        return None
    mid = len(vs) // 2
    return vs[mid] if len(vs) % 2 else (vs[mid - 1] + vs[mid]) / 2


def format_summary(summary: dict[str, dict[str, dict[str, float | None]]]) -> str:
    lines = [
        "medians:",
        f"{'placement':<11}{'variant':<11}{'node1 us':>10}{'node2 us':>10}{'both us':>10}"
        f"{'ambient/s':>11}{'plain/s':>9}",
    ]
    for placement, by_variant in summary.items():
        for variant, m in by_variant.items():
            ratio = variant == "this/base"
            fmt = (lambda v: "-" if v is None else f"{v:.2f}") if ratio else _num
            lines.append(
                f"{placement:<11}{variant:<11}{fmt(m['node1']):>10}{fmt(m['node2']):>10}"
                f"{fmt(m['both']):>10}{fmt(m['per_second']):>11}{fmt(m['plain_per_second']):>9}"
            )
    return "\n".join(lines)


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


# --- I/O --------------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = {k: os.environ[k] for k in INHERITED_ENV if k in os.environ}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH", "")]))
    return env


def connect_run(
    ep: Endpoint, count: int, seconds: float, workers: int, procs: int = 1
) -> dict[str, Any]:
    argv = [
        sys.executable, "-m", "meshbench.loadgen", "connect", "--host", ep.host,
        "--port", str(ep.port), "--seconds", str(seconds), "--count", str(count),
        "--workers", str(workers), "--procs", str(procs),
    ]  # fmt: skip
    return _loadgen(argv, ep, seconds)


def _loadgen(argv: list[str], ep: Endpoint, seconds: float) -> dict[str, Any]:
    try:
        done = subprocess.run(
            argv,
            capture_output=True,
            timeout=seconds + GRACE,
            env=_env(),
            cwd=HERE,
            preexec_fn=nsutil.preexec_enter(ep.netns),
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise BenchError("the load generator did not finish in time") from e
    if done.returncode != 0:
        raise BenchError(f"load generator failed: {done.stderr.decode(errors='replace')[-800:]}")
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc


def requests_run(ep: Endpoint, rate: float, seconds: float, conns: int) -> dict[str, Any]:
    """`--load requests`: mesh_bench's latency step (open loop at `rate` over `conns`
    keep-alive connections for `seconds`), reported in the connect run's terms: each
    answered request counts as one unit."""
    argv = [
        sys.executable, "-m", "meshbench.loadgen", "http", "--host", ep.host,
        "--port", str(ep.port), "--seconds", str(seconds), "--rate", str(rate),
        "--conns", str(conns),
    ]  # fmt: skip
    doc = _loadgen(argv, ep, seconds)
    return {
        "connections": int(doc["answered"]),
        "failed": int(doc["unanswered"]),
        "per_second": float(doc["achieved_rps"]),
    }


def handshake_run(hs: HandshakeTarget, count: int, seconds: float, workers: int) -> dict[str, Any]:
    """`--load handshakes`: mesh_bench's handshake phase (each attempt a full mTLS
    handshake with the server node's tunnel and an HBONE CONNECT answered 200)."""
    argv = [
        sys.executable, "-m", "meshbench.loadgen", "handshake", "--host", hs.host,
        "--port", str(hs.port), *hs.loadgen_args(seconds, workers), "--count", str(count),
    ]  # fmt: skip
    doc = _loadgen(argv, Endpoint(hs.netns, hs.host, hs.port), seconds)
    return {
        "connections": int(doc["handshakes"]),
        "failed": int(doc["failed"]),
        "per_second": float(doc["handshakes_per_second"]),
    }


def load_run(
    ep: Endpoint, a: argparse.Namespace, count: int, hs: HandshakeTarget | None = None
) -> dict[str, Any]:
    if a.load == "requests":
        return requests_run(ep, a.rate, a.seconds, a.conns)
    if a.load == "handshakes":
        if hs is None:  # the plain namespace has no mTLS: nothing to compare with
            return {"connections": 0, "failed": 0, "per_second": 0.0}
        return handshake_run(hs, count, a.seconds, a.workers)
    return connect_run(ep, count, a.seconds, a.workers, a.procs)


def machine() -> ProcStat:
    with open("/proc/stat", encoding="ascii") as f:
        return parse_proc_stat(f.read())


def tunnel_pids(cluster: Cluster) -> dict[str, int]:
    out = {}
    for node in NODES:
        rec = process_record(cluster, tunnel_name(node))
        if rec is None:
            raise BenchError(f"the tunnel of {node} is not running")
        out[node] = rec.pid
    return out


def sample(pids: Mapping[str, int]) -> dict[str, Sample]:
    now = time.monotonic()
    out = {}
    for node, pid in pids.items():
        t = cpusplit.read_times(pid)
        if t is None:
            raise BenchError(f"the tunnel of {node} (pid {pid}) is gone")
        out[node] = Sample(t.user + t.system, now, t.system)
    return out


def idle_rates(pids: Mapping[str, int]) -> dict[str, float]:
    a = sample(pids)
    time.sleep(IDLE_SAMPLE_S)
    b = sample(pids)
    return {n: max(0.0, b[n].cpu_s - a[n].cpu_s) / (b[n].wall_s - a[n].wall_s) for n in pids}


def signal_tunnels(pids: Mapping[str, int], signum: int) -> None:
    for pid in pids.values():
        os.kill(pid, signum)


def collect_profiles(pids: Mapping[str, int], paths: Mapping[str, Path]) -> dict[str, Any]:
    """Ask each tunnel to write its profile (SIGUSR2) and read it once it is there."""
    for p in paths.values():
        p.unlink(missing_ok=True)
    signal_tunnels(pids, DUMP_SIGNAL)
    deadline = time.monotonic() + 30.0
    out = {}
    for node, p in paths.items():
        while not p.exists():
            if time.monotonic() > deadline:
                raise BenchError(f"the tunnel of {node} wrote no profile to {p}")
            time.sleep(0.1)
        out[node] = pstats.Stats(str(p)).stats  # type: ignore[attr-defined]
    return out


def save_profiles(paths: Mapping[str, Path], where: Path, placement: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    for node, p in paths.items():
        shutil.copyfile(p, where / f"{placement}-{node}.pstats")


def print_profile(
    node: str,
    stats: Mapping[StatKey, StatRow],
    connections: int,
    top: int,
    out: TextIO | None = None,
) -> None:
    def say(text: str) -> None:
        print(text, file=out if out is not None else sys.stdout)

    total = sum(r[2] for r in stats.values()) * 1e6 / max(1, connections)
    say(f"\n{node}: {total:.0f} us of profiled CPU per connection ({connections} connections)")
    say("  own time by area (us per connection):")
    for area, us in by_area(stats, connections):
        if us >= 0.5:
            say(f"    {area:<32}{us:>8.1f}")
    say("  steps (calls and cumulative us per connection):")
    for label, calls, us in steps(stats, connections):
        say(f"    {label:<42}{calls:>6.2f}{us:>9.1f}")
    say(f"  top {top} functions by own time (calls, us per connection):")
    for where, calls, us in top_functions(stats, connections, top):
        say(f"    {where[:80]:<80}{calls:>6.2f}{us:>8.1f}")


def restart_tunnels(cluster: Cluster, tree: Path, profile_dir: Path | None) -> dict[str, Path]:
    """Both tunnels again, running the code in `tree` (a checkout), each under cProfile
    writing into its own directory below `profile_dir` when that is given (returned per
    node; empty without); the pods re-enrol over ZDS. `python -m` puts the current
    directory first on sys.path, so the tunnel is started from inside `tree`."""
    dirs: dict[str, Path] = {}
    for node in NODES:
        env = {"PYTHONPATH": str(tree)}
        if profile_dir is not None:
            dirs[node] = profile_dir / f"profile-{node}"
            dirs[node].mkdir(parents=True, exist_ok=True)
            env[PROFILE_ENV] = str(dirs[node])
        stop_tunnel(cluster, node)
        with contextlib.chdir(tree):
            start_node_tunnel(cluster, node, extra_env=env)
    wait_ready(cluster)
    return dirs


def measure(
    a: argparse.Namespace,
    eps: Mapping[tuple[str, str], Endpoint],
    pids: Mapping[str, int],
    placement: str,
    profiling: bool,
    hss: Mapping[str, HandshakeTarget],
) -> dict[str, Any]:
    """One placement's connections through the mesh, and the same count without it."""
    ref = load_run(eps[(plain.PLAIN_NS, placement)], a, a.connections)
    idle = idle_rates(pids)
    if profiling:
        signal_tunnels(pids, RESET_SIGNAL)
    before, m0 = sample(pids), machine()
    res = load_run(eps[(plain.MESH_NS, placement)], a, a.connections, hss.get(placement))
    after, m1 = sample(pids), machine()
    n = int(res["connections"])
    return {
        "placement": placement,
        "connections": n,
        "failed": res["failed"],
        "per_second": res["per_second"],
        "plain_per_second": ref["per_second"],
        "idle_cpu_per_s": idle,
        # The machine's busy cores during the run (steal excluded): near all of them, the
        # rate is CPU-bound; well below, something waits (latency-bound).
        "busy_cores": busy_cores(m0, m1, os.cpu_count() or 1),
        "steal_cores": steal_cores(m0, m1, os.cpu_count() or 1),
        "us_per_conn": {
            node: per_connection_us(before[node], after[node], idle[node], n) for node in NODES
        },
        # The kernel's share of each tunnel's CPU (system time over user + system; idle
        # time not taken out): socket calls and the packet path under them.
        "system_share": {node: system_share(before[node], after[node]) for node in NODES},
    }


def system_share(before: Sample, after: Sample) -> float | None:
    """The kernel's share of a process's CPU between two samples; None without CPU."""
    total = after.cpu_s - before.cpu_s
    return (after.system_s - before.system_s) / total if total > 0 else None


def run(a: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    print(f"bringing up cluster {a.cluster_name} (state in {workdir})", flush=True)
    cluster = up(plain.cluster_file(workdir, a.cluster_name), workdir, mesh=True)
    try:
        lay = cluster.layout
        eps = {
            (ns, placement): Endpoint(
                cluster.pod_netns(ns, plain.CLIENT_POD),
                str(lay.pod(ns, plain.SERVER_POD[placement]).ip),
                plain.HTTP_PORT,
            )
            for ns in (plain.MESH_NS, plain.PLAIN_NS)
            for placement in a.placements
        }
        hss: dict[str, HandshakeTarget] = {}
        if a.load == "handshakes":
            tls_dir = private_dir(workdir, "hs-")  # inside workdir: removed with it
            hss = {
                p: plain.handshake_target(cluster, tls_dir, eps[(plain.MESH_NS, p)], p)
                for p in a.placements
            }
        variants: list[tuple[str, Path]] = [("this", ROOT)]
        if a.compare is not None:
            variants = [("base", a.compare.resolve()), ("this", ROOT)]
        restart = a.compare is not None or a.profile
        rows: list[dict[str, Any]] = []
        prof_out: dict[tuple[str, str], Any] = {}
        for rnd in range(a.rounds):
            for variant, tree in variants if rnd % 2 == 0 else variants[::-1]:
                profiles = None
                if restart:
                    print(f"round {rnd}: tunnels from {tree}", flush=True)
                    dirs = restart_tunnels(cluster, tree, workdir if a.profile else None)
                pids = tunnel_pids(cluster)
                if restart and a.profile:
                    profiles = {n: profile_file(dirs[n], "ztunnel", pids[n]) for n in NODES}
                for placement in a.placements:  # warm-up: pools dialled, code paths hot
                    # Count-bounded (200) but for requests, which run for a time.
                    warm_s = 2.0 if a.load == "requests" else 20.0
                    warm = argparse.Namespace(**{**vars(a), "seconds": warm_s})
                    load_run(eps[(plain.MESH_NS, placement)], warm, 200, hss.get(placement))
                order = a.placements if rnd % 2 == 0 else a.placements[::-1]
                for placement in order:
                    row = measure(a, eps, pids, placement, profiles is not None, hss)
                    row.update(round=rnd, variant=variant)
                    rows.append(row)
                    print(format_costs([row]).splitlines()[-1], flush=True)
                    shares = ", ".join(
                        f"{node} {v:.0%}"
                        for node, v in row["system_share"].items()
                        if v is not None
                    )
                    print(f"  kernel share of the tunnels' CPU: {shares}", flush=True)
                    if profiles is not None and (variant, placement) not in prof_out:
                        got = collect_profiles(pids, profiles)
                        if a.save_profiles is not None:
                            save_profiles(profiles, a.save_profiles, f"{variant}-{placement}")
                        prof_out[(variant, placement)] = (row["connections"], got)
        print()
        print(format_costs(rows))
        print()
        print(format_summary(summarize(rows)))
        for (variant, placement), (n, stats) in prof_out.items():
            print(f"\n=== profile, {variant}, {placement}")
            for node in NODES:
                print_profile(node, stats[node], n, a.top)
        return {"rows": rows, "summary": summarize(rows)}
    finally:
        down(cluster.spec.name, workdir)


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--connections", type=int, default=2000, help="per placement and round")
    ap.add_argument("--seconds", type=float, default=30.0, help="time bound of each load run")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--procs", type=int, default=1, help="--load connect: processes")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--placements", default="cross-node,same-node")
    ap.add_argument("--profile", action="store_true", help="cProfile both tunnels (round 1)")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument(
        "--load",
        choices=("connect", "requests", "handshakes"),
        default="connect",
        help="new connections (the default), or requests at --rate over --conns keep-alive "
        "connections for --seconds (figures are then per request), or new mTLS handshakes "
        "with the server node's tunnel, --workers at a time (per handshake)",
    )
    ap.add_argument("--rate", type=float, default=1000.0, help="--load requests: requests/s")
    ap.add_argument("--conns", type=int, default=8, help="--load requests: connections")
    ap.add_argument("--cluster-name", default=CLUSTER_NAME)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--save-profiles", type=Path, help="keep the pstats files in this directory")
    ap.add_argument(
        "--compare",
        type=Path,
        help="another checkout: its tunnels and this one's take turns, round by round",
    )
    a = ap.parse_args()
    a.placements = [p for p in a.placements.split(",") if p]
    if os.geteuid() != 0:
        print("newconn_profile: needs root (it builds network namespaces)", file=sys.stderr)
        return 2
    if not 1 <= a.connections <= 100_000 or not 1 <= a.rounds <= 10 or not 1 <= a.workers <= 16:
        ap.error("--connections 1..100000, --rounds 1..10, --workers 1..16")
    if any(p not in plain.SERVER_POD for p in a.placements) or not a.placements:
        ap.error(f"--placements: some of {sorted(plain.SERVER_POD)}")
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    with tempfile.TemporaryDirectory(prefix="newconn-") as tmp:
        try:
            doc = run(a, Path(tmp))
        except (BenchError, MeshUpError) as e:
            print(f"newconn_profile: {e}", file=sys.stderr)
            return 1
    if a.json is not None:
        a.json.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(run_interruptible(main, "newconn_profile"))
