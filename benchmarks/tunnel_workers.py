"""Tunnel worker processes: requests per second and throughput through one tunnel pair at
saturation, with 1 and with 2 processes per tunnel, in one run.

One cluster (workers-cluster.yaml: four client pods on node1, one server pod on node2, all
in the mesh) stays up for the run; before each measurement both tunnels are restarted with
TUNNEL_WORKERS set to the count measured (and the run waits until both are ready with
that many processes). Counts alternate round by round (1, 2, then 2, 1, ...), so a
disturbance of the shared machine hits both. Per count and round:

- requests: every client pod runs `apps/rr_client.py rr`: --connections keep-alive
  connections each, closed loop, --size bytes each way per request, against the server's
  uvloop echo; requests completed in --seconds after a 1 s warm-up, summed over the pods;
- throughput: the same pods each run `apps/rr_client.py tput`: --tput-connections
  connections each keeping 4 MiB in flight to the sink, which acknowledges each MiB; only
  acknowledged bytes count;
- the CPU of every tunnel process over each phase (cores busy: CPU seconds / wall seconds),
  from /proc/<pid>/stat, so the spread of the work over the processes shows.

Prints the medians and the ratios 2 : 1, and writes benchmarks/results/workers-<time>.json.
Needs root. Every load loop is bounded in time; every process it starts is stopped by PID
(the cluster by `end_run`), also on SIGINT/SIGTERM (then exit 130 / 143).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cpusplit  # benchmarks/, beside this script
from benchrun import header, on_cluster, write_results
from meshbench.costs import sample_pid

import nsutil
from localcluster import mesh
from localcluster.apps import INHERITED_ENV
from localcluster.interrupt import run_interruptible
from localcluster.mesh import Cluster, tunnel_name

HERE = Path(__file__).resolve().parent
CLUSTER_FILE = HERE / "workers-cluster.yaml"
CLIENT = HERE / "apps" / "rr_client.py"
CLIENT_PODS = ("client-0", "client-1", "client-2", "client-3")
NODES = ("node1", "node2")
ECHO_PORT, SINK_PORT = 5002, 5001
ADMIN = 15000
WARMUP = 1.0
GRACE = 30.0  # seconds a client may run past its own bound before it counts as hung
TARGET_RATIO = 1.4


class BenchError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Params:
    rounds: int
    seconds: float
    connections: int  # per client pod, requests phase
    size: int
    tput_connections: int  # per client pod, throughput phase
    counts: tuple[int, ...]


def _env() -> dict[str, str]:
    env = {k: os.environ[k] for k in INHERITED_ENV if k in os.environ}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def set_workers(c: Cluster, count: int) -> None:
    """Both tunnels restarted with `count` processes; returns once both serve their pods
    with that many."""
    for node in NODES:
        mesh.stop_tunnel(c, node)
        mesh.start_node_tunnel(c, node, extra_env={"TUNNEL_WORKERS": str(count)})
    mesh.wait_ready(c)
    for node in NODES:
        status = mesh.tunnel_status(c.layout, node) or {}
        have = len(status.get("workers", {})) or 1
        if have != count:
            raise BenchError(f"{node}'s tunnel runs {have} processes, not {count}: {status}")


def tunnel_pids(c: Cluster) -> dict[str, int]:
    """`<node>/<process>` -> pid of every process of both tunnels."""
    out: dict[str, int] = {}
    for node in NODES:
        rec = mesh.process_record(c, tunnel_name(node))
        if rec is None:
            raise BenchError(f"{node}'s tunnel is not running")
        out[f"{node}/0"] = rec.pid
        status, body = mesh.node_http(c.layout, node, ADMIN, "/config_dump")
        if status != 200:
            raise BenchError(f"{node}'s admin answered {status}")
        for w in json.loads(body).get("workers", [])[1:]:
            out[f"{node}/{w['worker']}"] = int(w["pid"])
    return out


def machine_times() -> tuple[float, float]:
    """(busy, stolen) CPU seconds of the whole machine so far, from /proc/stat: whether a
    phase saturated the machine (every core busy), left cores idle, or lost them to the
    hypervisor's other guests (steal)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (
            int(x) for x in f.readline().split()[1:9]
        )
    return (user + nice + system + irq + softirq) / cpusplit.CLK_TCK, steal / cpusplit.CLK_TCK


def run_load(c: Cluster, mode: str, p: Params) -> tuple[float, float]:
    """(the summed count of every client pod: requests or bytes, the phase's wall time)."""
    server = str(c.layout.pod("mesh", "server-0").ip)
    port = ECHO_PORT if mode == "rr" else SINK_PORT
    conns = p.connections if mode == "rr" else p.tput_connections
    argv = [
        sys.executable, str(CLIENT), mode, "--host", server, "--port", str(port),
        "--connections", str(conns), "--size", str(p.size), "--warmup", str(WARMUP),
        "--seconds", str(p.seconds),
    ]  # fmt: skip
    started = time.monotonic()
    procs = [
        subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_env(),
            preexec_fn=nsutil.preexec_enter(c.pod_netns("mesh", pod)),
        )
        for pod in CLIENT_PODS
    ]
    total = 0.0
    errors = []
    for pod, proc in zip(CLIENT_PODS, procs, strict=True):
        try:
            out, err = proc.communicate(timeout=WARMUP + p.seconds + GRACE)
        except subprocess.TimeoutExpired:
            proc.kill()  # by the Popen's own pid
            proc.communicate()
            errors.append(f"{pod}: did not finish")
            continue
        if proc.returncode != 0:
            errors.append(f"{pod}: exit {proc.returncode}: {err.decode(errors='replace')[-500:]}")
            continue
        doc = json.loads(out)
        total += float(doc["requests" if mode == "rr" else "bytes"])
    if errors:
        raise BenchError(f"{mode}: " + "; ".join(errors))
    return total, time.monotonic() - started


def measure(c: Cluster, count: int, p: Params) -> dict[str, Any]:
    set_workers(c, count)
    time.sleep(1.0)  # the restarted tunnels' start-up work is over
    pids = tunnel_pids(c)
    out: dict[str, Any] = {"workers": count}
    # Each process's resident memory before the load: what one more process costs idle.
    idle = {name: sample_pid(pid) for name, pid in pids.items()}
    out["rss_mb_idle"] = {n: round(u.rss_kb / 1024, 1) for n, u in idle.items() if u is not None}
    for mode in ("rr", "tput"):
        before = cpusplit.sample(pids)
        busy0, stolen0 = machine_times()
        total, wall = run_load(c, mode, p)
        busy1, stolen1 = machine_times()
        after = cpusplit.sample(pids)
        out[f"machine_cores_busy_{mode}"] = round((busy1 - busy0) / wall, 2)
        out[f"machine_cores_stolen_{mode}"] = round((stolen1 - stolen0) / wall, 2)
        cores = {}
        for name in pids:
            b, a = before[name], after[name]
            if a is None or b is None:
                raise BenchError(f"tunnel process {name} went away during the {mode} phase")
            d = a - b
            cores[name] = round((d.user + d.system) / wall, 3)
        if mode == "rr":
            out["requests_per_s"] = total / p.seconds
        else:
            out["gbit_per_s"] = total * 8 / p.seconds / 1e9
        out[f"cores_{mode}"] = cores
    return out


def run(c: Cluster, p: Params) -> list[dict[str, Any]]:
    rows = []
    for r in range(p.rounds):
        order = p.counts if r % 2 == 0 else tuple(reversed(p.counts))
        for count in order:
            row = measure(c, count, p)
            row["round"] = r + 1
            print(
                f"round {r + 1}, {count} process(es) per tunnel: "
                f"{row['requests_per_s']:,.0f} requests/s, {row['gbit_per_s']:.2f} Gbit/s; "
                f"tunnel cores (requests) {row['cores_rr']}, "
                f"machine cores busy {row['machine_cores_busy_rr']} (stolen "
                f"{row['machine_cores_stolen_rr']}) / {row['machine_cores_busy_tput']} (stolen "
                f"{row['machine_cores_stolen_tput']})",
                flush=True,
            )
            rows.append(row)
    return rows


def summarize(rows: list[dict[str, Any]], counts: tuple[int, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for count in counts:
        mine = [r for r in rows if r["workers"] == count]
        cores: dict[str, dict[str, float]] = {}
        for mode in ("rr", "tput"):
            names = sorted({n for r in mine for n in r[f"cores_{mode}"]})
            cores[mode] = {
                n: statistics.median(r[f"cores_{mode}"].get(n, 0.0) for r in mine) for n in names
            }
        rps = statistics.median(r["requests_per_s"] for r in mine)
        gbit = statistics.median(r["gbit_per_s"] for r in mine)
        # What a request and a GB cost each tunnel end, all its processes together: the
        # figure that says how far more cores take it (cores busy / rate).
        per_node = {
            node: {
                "us_per_request": sum(v for n, v in cores["rr"].items() if n.startswith(node))
                / rps
                * 1e6,
                "s_per_gb": sum(v for n, v in cores["tput"].items() if n.startswith(node))
                / (gbit / 8),
            }
            for node in NODES
        }
        names = sorted({n for r in mine for n in r.get("rss_mb_idle", {})})
        rss = {n: statistics.median(r["rss_mb_idle"].get(n, 0.0) for r in mine) for n in names}
        out[str(count)] = {
            "rss_mb_idle": rss,
            "machine_cores_busy": {
                mode: statistics.median(r[f"machine_cores_busy_{mode}"] for r in mine)
                for mode in ("rr", "tput")
            },
            "machine_cores_stolen": {
                mode: statistics.median(r[f"machine_cores_stolen_{mode}"] for r in mine)
                for mode in ("rr", "tput")
            },
            "requests_per_s": rps,
            "gbit_per_s": gbit,
            "cores": cores,
            "cpu": per_node,
        }
    return out


def format_table(summary: dict[str, Any]) -> str:
    lines = [
        "| processes per tunnel | requests/s | Gbit/s "
        "| tunnel cores busy, requests (node1 / node2) "
        "| tunnel cores busy, throughput (node1 / node2) "
        "| tunnel CPU per request, us (node1 / node2) | tunnel CPU per GB, s (node1 / node2) "
        "| idle RSS per process, MB (node1 / node2) |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def per_node(cores: dict[str, float], fmt: str = ".2f") -> str:
        parts = []
        for node in NODES:
            mine = [v for n, v in sorted(cores.items()) if n.startswith(f"{node}/")]
            parts.append(" + ".join(f"{v:{fmt}}" for v in mine))
        return " / ".join(parts)

    for count, s in summary.items():
        cpu = s["cpu"]
        lines.append(
            f"| {count} | {s['requests_per_s']:,.0f} | {s['gbit_per_s']:.2f} "
            f"| {per_node(s['cores']['rr'])} | {per_node(s['cores']['tput'])} "
            f"| {cpu['node1']['us_per_request']:.0f} / {cpu['node2']['us_per_request']:.0f} "
            f"| {cpu['node1']['s_per_gb']:.2f} / {cpu['node2']['s_per_gb']:.2f} "
            f"| {per_node(s.get('rss_mb_idle', {}), '.1f')} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="rounds; the table shows medians")
    ap.add_argument("--seconds", type=float, default=6.0, help="each phase's counted time")
    ap.add_argument("--connections", type=int, default=16, help="requests: per client pod")
    ap.add_argument("--size", type=int, default=100, help="requests: bytes each way")
    ap.add_argument("--tput-connections", type=int, default=2, help="throughput: per client pod")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("tunnel_workers: needs root (it builds network namespaces)", file=sys.stderr)
        return 2
    if not (1 <= args.rounds <= 10 and 1 <= args.seconds <= 60):
        print("tunnel_workers: --rounds 1..10, --seconds 1..60", file=sys.stderr)
        return 2
    p = Params(
        args.rounds, args.seconds, args.connections, args.size, args.tput_connections, (1, 2)
    )
    state_root = Path(tempfile.mkdtemp(prefix="workersbench-"))
    rows = on_cluster("tunnel_workers", CLUSTER_FILE, state_root, lambda c: run(c, p), BenchError)
    if rows is None:
        return 1
    summary = summarize(rows, p.counts)
    one, two = summary["1"], summary["2"]
    ratios = {
        "requests_per_s": two["requests_per_s"] / one["requests_per_s"],
        "gbit_per_s": two["gbit_per_s"] / one["gbit_per_s"],
    }
    # Also per round, 2 against 1 measured back to back: less exposed to what the shared
    # machine (and its hypervisor: steal) did between rounds than the medians' ratio.
    paired = {
        key: statistics.median(
            next(r[key] for r in rows if r["round"] == n and r["workers"] == 2)
            / next(r[key] for r in rows if r["round"] == n and r["workers"] == 1)
            for n in range(1, p.rounds + 1)
        )
        for key in ("requests_per_s", "gbit_per_s")
    }
    command = shlex.join([sys.executable, *sys.argv])
    doc = {
        **header("tunnel_workers", command),
        "params": asdict(p),
        "summary": summary,  # medians over the rounds
        "rounds": rows,
        "ratios_2_to_1": ratios,
        "ratios_2_to_1_paired_by_round": paired,
        "target_ratio": TARGET_RATIO,
    }
    path = write_results(doc, "workers")
    print()
    print(format_table(summary))
    print()
    print(
        f"2 : 1 processes: requests/s x{ratios['requests_per_s']:.2f}, "
        f"throughput x{ratios['gbit_per_s']:.2f} (target >= {TARGET_RATIO}); "
        f"median of the rounds' own ratios: x{paired['requests_per_s']:.2f}, "
        f"x{paired['gbit_per_s']:.2f}"
    )
    print(f"raw results: {path}")
    print(f"command: {command}")
    return 0


if __name__ == "__main__":
    sys.exit(run_interruptible(main, "tunnel_workers"))
