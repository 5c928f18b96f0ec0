"""Certificate rotation under load: short workload certificates, steady traffic, no failure.

One run brings up a two-node cluster whose tunnels ask for `--ttl` second certificates (the
cluster file's `certificates.ttlSeconds`, i.e. the tunnels' CERT_TTL_SECONDS) and, for
`--minutes`, drives load from a client pod on n1 to an echo server pod on n2 (cross-node,
HBONE over mTLS): a new connection every `--interval-ms` plus `--long` long-lived
connections echoing every 100 ms for the whole run (tests/e2e/loadgen.py). Meanwhile the
tunnels' admin `/config_dump` is read every `--poll` seconds on both nodes: every change of
a certificate's serial is a rotation, dated, with its notAfter.

Reported: failed requests (target zero), rotations per identity and node, the intervals
between them, whether every long-lived connection survived (they outlive several
certificates), the CA's issuance count, and the tunnels' CPU time (with their certificate
workers) per 1000 connections, against a baseline run first: the same load for
`--baseline-minutes` on a cluster with day-long certificates (no rotation). Only that
ratio means much: the machine is shared and its CPU noisy.

Invariants: needs root; its own state root (a temp dir), the cluster always torn down, also
on SIGINT or SIGTERM (exit 130 / 143); all traffic stays inside the cluster's namespaces;
the load is bounded by its duration and loadgen's attempt cap, and its process by a timeout.
Output: benchmarks/results/cert-rotation-<timestamp>/report.md and results.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchrun import on_cluster

import nsutil
from localcluster.interrupt import run_interruptible
from localcluster.mesh import Cluster, node_http
from localcluster.processes import read_records
from meshcore.defaults import ADMIN_PORT

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
LOADGEN = ROOT / "tests" / "e2e" / "loadgen.py"
TESTAPP = ROOT / "tests" / "e2e" / "testapp.py"
NODES = ("n1", "n2")
BASELINE_TTL = 24 * 3600  # no rotation within any run
CLK_TCK = os.sysconf("SC_CLK_TCK")

CLUSTER = """\
name: certrot
certificates: {{ttlSeconds: {ttl}}}
nodes: [{{name: n1}}, {{name: n2}}]
namespaces:
  - name: mesh
    labels: {{istio.io/dataplane-mode: ambient}}
pods:
  - {{name: client, namespace: mesh, serviceAccount: client, node: n1,
     command: ["{{python}}", "-c", "import signal; signal.pause()"]}}
  - {{name: server, namespace: mesh, serviceAccount: server, node: n2,
     command: ["{{python}}", "{testapp}"]}}
"""


class BenchError(Exception):
    pass


def certificates(c: Cluster, node: str) -> list[dict[str, Any]]:
    try:
        _, body = node_http(c.layout, node, ADMIN_PORT, "/config_dump", timeout=5.0)
        return list(json.loads(body)["certificates"])
    except (OSError, ValueError, KeyError):
        return []  # counted as a missed poll, not fatal: the load decides the verdict


def tunnel_cpu_seconds(c: Cluster) -> dict[str, float]:
    """CPU time (user + system) of each node's tunnel and its child processes (the
    certificate worker) so far."""
    out: dict[str, float] = {}
    for r in read_records(c.state.pidfile_dir):
        node = r.name.removeprefix("ztunnel-")
        if not r.name.startswith("ztunnel-") or node not in NODES:
            continue
        # The tunnel's own time plus its reaped children's (cutime, cstime: the workers
        # that have exited), plus the time of the children still running.
        total = _cpu_ticks(r.pid, with_reaped=True)
        total += sum(_cpu_ticks(child) for child in _children(r.pid))
        out[node] = round(total / CLK_TCK, 2)
    return out


def _cpu_ticks(pid: int, with_reaped: bool = False) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0
    ticks = int(fields[11]) + int(fields[12])  # utime, stime
    if with_reaped:
        ticks += int(fields[13]) + int(fields[14])  # cutime, cstime
    return ticks


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


def run_load(c: Cluster, args: argparse.Namespace, minutes: float) -> dict[str, Any]:
    seconds = minutes * 60
    target = str(c.layout.pod("mesh", "server").ip)
    argv = [sys.executable, str(LOADGEN), target, "9000", "--seconds", str(seconds),
            "--interval-ms", str(args.interval_ms), "--long", str(args.long)]  # fmt: skip
    cpu_before = tunnel_cpu_seconds(c)
    load = subprocess.Popen(
        argv,
        preexec_fn=nsutil.preexec_enter(c.pod_netns("mesh", "client")),
        stdout=subprocess.PIPE,
        text=True,
    )
    seen: dict[tuple[str, str], list[dict[str, Any]]] = {}
    polls = missed = 0
    start = time.time()
    try:
        while load.poll() is None and time.time() - start < seconds + 30:
            for node in NODES:
                certs = certificates(c, node)
                polls += 1
                missed += not certs
                for cert in certs:
                    if "serial" not in cert:
                        continue
                    history = seen.setdefault((node, cert["identity"]), [])
                    if not history or history[-1]["serial"] != cert["serial"]:
                        history.append(
                            {"serial": cert["serial"], "notAfter": cert["notAfter"],
                             "seen_at": round(time.time() - start, 2), "state": cert["state"]}
                        )  # fmt: skip
            time.sleep(args.poll)
        out, _ = load.communicate(timeout=seconds + 60)
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
    if load.returncode != 0:
        raise BenchError(f"loadgen exited {load.returncode}")
    cpu_after = tunnel_cpu_seconds(c)
    result: dict[str, Any] = json.loads(out)
    issued = (c.state.log_dir / "ca.log").read_text().count("certificate issued")
    return {
        "load": result,
        "certificates": {f"{n} {i}": h for (n, i), h in sorted(seen.items())},
        "polls": polls,
        "missed_polls": missed,
        "ca_issued": issued,
        "tunnel_cpu_s": {n: round(cpu_after.get(n, 0) - cpu_before.get(n, 0), 2) for n in NODES},
    }


def summarize(raw: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    load = raw["load"]
    rotations: dict[str, dict[str, Any]] = {}
    for key, history in raw["certificates"].items():
        times = [h["seen_at"] for h in history]
        gaps = [round(b - a, 1) for a, b in itertools.pairwise(times)]
        rotations[key] = {
            "rotations": len(history) - 1,
            "min_gap_s": min(gaps) if gaps else None,
            "max_gap_s": max(gaps) if gaps else None,
            "seen_expired": sum(h["state"] != "valid" for h in history),
        }
    cpu = sum(raw["tunnel_cpu_s"].values())
    attempts = load["attempts"]
    long = load["long"]
    return {
        "ttl_s": args.ttl,
        "minutes": args.minutes,
        "attempts": attempts,
        "failures": len(load["failures"]),
        "first_failures": load["failures"][:20],
        "long_lived": len(long),
        "long_lived_survived": sum(1 for x in long if x.get("ok")),
        "long_lived_rounds": [x.get("rounds", 0) for x in long],
        "rotations": rotations,
        "ca_issued": raw["ca_issued"],
        "tunnel_cpu_s": raw["tunnel_cpu_s"],
        "tunnel_cpu_ms_per_1000_conns": round(1000 * 1000 * cpu / attempts, 1)
        if attempts
        else None,
        "slowest_connect_s": load["connect_s"][-5:],
        "missed_polls": raw["missed_polls"],
    }


def report(summary: dict[str, Any], command: str, when: str) -> str:
    s = summary
    verdict = (
        "PASS" if s["failures"] == 0 and s["long_lived_survived"] == s["long_lived"] else "FAIL"
    )
    lines = [
        "# Certificate rotation under load",
        "",
        f"{when}; `{command}`",
        "",
        f"Verdict: **{verdict}** (zero failed requests, every long-lived connection survived).",
        "",
        f"- certificate lifetime asked: {s['ttl_s']} s; load for {s['minutes']:g} min, cross-node",
        f"- new connections: {s['attempts']}, failed: {s['failures']}",
        f"- long-lived connections: {s['long_lived_survived']}/{s['long_lived']} survived "
        f"(echo rounds each: {s['long_lived_rounds']})",
        f"- certificates issued by the CA during the run: {s['ca_issued']}",
        f"- tunnel CPU: {s['tunnel_cpu_s']} s; {s['tunnel_cpu_ms_per_1000_conns']} ms per 1000 "
        "connections (both tunnels)",
        f"- slowest connects (s): {s['slowest_connect_s']}",
    ]
    base = s.get("baseline")
    if base is not None:
        lines.append(
            f"- baseline (same load, {base['ttl_s']} s certificates, {base['minutes']:g} min, "
            f"no rotation): {base['attempts']} connections, {base['failures']} failed, "
            f"{base['tunnel_cpu_ms_per_1000_conns']} ms tunnel CPU per 1000 connections; "
            f"rotation run / baseline: {s['cpu_ratio_vs_baseline']}"
        )
    lines += [
        "",
        "| tunnel, identity | rotations seen | min gap s | max gap s | seen expired |",
        "|---|---|---|---|---|",
    ]
    for key, r in s["rotations"].items():
        node, identity = key.split(" ", 1)
        lines.append(
            f"| {node}, `{identity}` | {r['rotations']} | {r['min_gap_s']} | {r['max_gap_s']} | "
            f"{r['seen_expired']} |"
        )
    if s["first_failures"]:
        lines += ["", "First failures:", ""]
        lines += [f"- {f['at']:.3f}: {f['error']}" for f in s["first_failures"]]
    lines += [
        "",
        f"Rotations are serial changes seen by polling `/config_dump` ({s['missed_polls']} "
        "polls missed); a gap is the time between two observed changes.",
        "",
    ]
    return "\n".join(lines)


def one_run(args: argparse.Namespace, ttl: int, minutes: float) -> dict[str, Any] | None:
    """A cluster with `ttl` second certificates under the load for `minutes`, torn down
    after; None (and the logs kept) if it failed."""
    state_root = Path(tempfile.mkdtemp(prefix="certrot-"))
    cluster_file = state_root / "cert-rotation.yaml"
    cluster_file.write_text(CLUSTER.format(ttl=ttl, testapp=TESTAPP))

    def work(cluster: Cluster) -> dict[str, Any]:
        print(f"load for {minutes:g} min, {ttl} s certificates", flush=True)
        return run_load(cluster, args, minutes)

    return on_cluster("cert_rotation", cluster_file, state_root, work, BenchError)


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="load duration")
    ap.add_argument("--ttl", type=int, default=60, help="certificate lifetime asked, seconds")
    ap.add_argument("--interval-ms", type=float, default=50.0, help="pace of new connections")
    ap.add_argument("--long", type=int, default=4, help="long-lived connections")
    ap.add_argument("--poll", type=float, default=2.0, help="seconds between /config_dump reads")
    ap.add_argument(
        "--baseline-minutes",
        type=float,
        default=2.0,
        help="first, the same load on a cluster with day-long certificates (0: none)",
    )
    ap.add_argument("--quick", action="store_true", help="2 minutes with 20 s certificates")
    args = ap.parse_args()
    if args.quick:
        args.minutes, args.ttl, args.baseline_minutes = 2.0, 20, 1.0
    if os.geteuid() != 0:
        print("cert_rotation: needs root (it builds network namespaces)", file=sys.stderr)
        return 2
    if not (0 < args.minutes <= 30 and 0 <= args.baseline_minutes <= 10):
        print("cert_rotation: --minutes 0..30, --baseline-minutes 0..10", file=sys.stderr)
        return 2
    if not (5 <= args.ttl <= 3600 and 0 <= args.long <= 16):
        print("cert_rotation: --minutes 0..30, --ttl 5..3600, --long 0..16", file=sys.stderr)
        return 2
    if not (args.interval_ms >= 10 and 0.2 <= args.poll <= 30):
        print("cert_rotation: --interval-ms >= 10, --poll 0.2..30", file=sys.stderr)
        return 2
    if args.minutes * 60 * 1000 / args.interval_ms > 20_000:
        print("cert_rotation: more than loadgen's 20000 attempts; raise --interval-ms",
              file=sys.stderr)  # fmt: skip
        return 2
    baseline = None
    if args.baseline_minutes > 0:
        baseline = one_run(args, BASELINE_TTL, args.baseline_minutes)
        if baseline is None:
            return 1
    raw = one_run(args, args.ttl, args.minutes)
    if raw is None:
        return 1
    summary = summarize(raw, args)
    if baseline is not None:
        base = summarize(baseline, args)
        summary["baseline"] = {
            "ttl_s": BASELINE_TTL,
            "minutes": args.baseline_minutes,
            "attempts": base["attempts"],
            "failures": base["failures"],
            "tunnel_cpu_ms_per_1000_conns": base["tunnel_cpu_ms_per_1000_conns"],
        }
        b, r = base["tunnel_cpu_ms_per_1000_conns"], summary["tunnel_cpu_ms_per_1000_conns"]
        summary["cpu_ratio_vs_baseline"] = round(r / b, 3) if b and r else None
    command = shlex.join(["benchmarks/cert_rotation.py", *sys.argv[1:]])
    when = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    out_dir = RESULTS_DIR / f"cert-rotation-{time.strftime('%Y%m%d-%H%M%S')}"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(
        json.dumps(
            {
                "command": command,
                "time": when,
                "summary": summary,
                "raw": raw,
                "baseline": baseline,
            },
            indent=1,
        )
        + "\n"
    )
    text = report(summary, command, when)
    (out_dir / "report.md").write_text(text)
    print(text)
    print(f"results: {out_dir}")
    return 0 if summary["failures"] == 0 else 1


if __name__ == "__main__":
    sys.exit(run_interruptible(main, "cert_rotation"))
