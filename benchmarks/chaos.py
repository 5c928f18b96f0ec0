"""Crashes on purpose under load: SIGKILL of each mesh component, restarted as a kubelet
would, with proof that nothing failed open and nothing was left stale.

One local cluster (`chaosbench/cluster.yaml`: a client on node1, an echo server and an HTTP
server on node2, a waypoint bound to the HTTP service) with the control plane's xDS server
feeding the tunnels and the waypoint. Under steady load (new connections at a fixed pace
plus long-lived ones, L4 through the tunnels and L7 through the waypoint), each target is
killed `--iterations` times: the tunnel of each node, the node agent of each node, the CA,
the control plane, the waypoint. Per event: new connections attempted/failed, the recovery
time, long-lived connections lost; a capture of the node link checked for the load's
plaintext marker and for TCP that is not HBONE; successes on a path while the target on it
was dead; the pods' capture rules while it was dead; after recovery, the pods' rules, the
tunnel listeners in each pod, the netns fds of each tunnel and what is left of the killed
process. See benchmarks/README.md.

Needs root. Run it under the machine lock:
  flock /tmp/ambient-netns.lock python benchmarks/chaos.py [--iterations N | --quick]
Output: benchmarks/results/chaos-<timestamp>/{results.json,report.md} (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from chaosbench import cluster as cl
from chaosbench import event, report, targets

from localcluster import mesh
from localcluster.interrupt import run_interruptible

RESULTS = Path(__file__).resolve().parent / "results"
KINDS = ("tunnel", "agent", "ca", "controlplane", "waypoint")
MAX_ITERATIONS = 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="chaos.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--iterations", type=int, default=3, help="kills per target (default 3)")
    p.add_argument("--quick", action="store_true", help="one kill per target")
    p.add_argument("--targets", default=",".join(KINDS), help="kinds to kill, comma-separated")
    p.add_argument("--backoff", type=float, default=1.0, help="seconds from kill to restart")
    p.add_argument("--interval-ms", type=float, default=20.0, help="new-connection pace per path")
    p.add_argument("--long", type=int, default=2, help="long-lived connections per path")
    p.add_argument("--keep-pcap", action="store_true", help="keep every event's capture")
    p.add_argument("--out", type=Path, help="result directory (default results/chaos-<time>)")
    p.add_argument(
        "--rejudge",
        type=Path,
        metavar="DIR",
        help="no run: count a finished run's attempts again from its timelines, rewrite its "
        "results.json and report.md",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.iterations = 1
    kinds = [k.strip() for k in args.targets.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        p.error(f"--targets: {', '.join(bad) or '(none)'}: not among {', '.join(KINDS)}")
    args.kinds = kinds
    if not 1 <= args.iterations <= MAX_ITERATIONS:
        p.error(f"--iterations must be 1..{MAX_ITERATIONS}")
    if not 0.0 <= args.backoff <= 30.0:
        p.error("--backoff must be 0..30 seconds")
    if not 5.0 <= args.interval_ms <= 1000.0:
        p.error("--interval-ms must be 5..1000")
    if not 0 <= args.long <= 20:
        p.error("--long must be 0..20")
    return args


def render(doc: dict[str, Any]) -> str:
    s = doc["settings"]
    lines = [
        "# Chaos: SIGKILL under load",
        "",
        f"{doc['time']}, {doc['host']['cpus']} CPUs, kernel {doc['host']['kernel']}; "
        f"`{doc['command']}`",
        "",
        f"Load per path (l4: echo through both tunnels; l7: HTTP through the waypoint): one "
        f"new connection every {s['interval_ms']:g} ms and {s['long']} long-lived connections. "
        f"Each kill is SIGKILL of the process alone; the restart (same command, environment "
        f"and netns, as a kubelet restarts a crashed container) follows {s['backoff']:g} s "
        "after the kill. Recovery: from the kill to the first new connection that worked after "
        "the last one that failed (0: none failed), slowest path. Ready: from the kill to the "
        "restarted process answering as ready.",
        "",
        report.markdown(report.rows(doc["events"])),
    ]
    problems = [
        f"- {e['target']} #{e['iteration']}: {k}: {line}"
        for e in doc["events"]
        for k, v in e["findings"].items()
        for line in v
    ]
    lines += ["Findings:", ""] + (problems or ["- none"])
    if doc.get("rejudged"):
        lines += ["", f"Attempts counted again from the kept timelines on {doc['rejudged']}."]
    if doc.get("error"):
        lines += ["", f"The run stopped early: {doc['error']}"]
    return "\n".join(lines) + "\n"


def write(out: Path, doc: dict[str, Any]) -> None:
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(out / "results.json")
    (out / "report.md").write_text(render(doc))


def rejudge(out: Path) -> int:
    try:
        doc = json.loads((out / "results.json").read_text())
    except (OSError, ValueError) as e:
        print(f"chaos.py: --rejudge {out}: {e}", file=sys.stderr)
        return 2
    doc["events"] = [report.rejudge(e) for e in doc["events"]]
    doc["rejudged"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write(out, doc)
    print(report.markdown(report.rows(doc["events"])))
    return 0


def main() -> int:
    args = parse_args()
    if args.rejudge is not None:
        return rejudge(args.rejudge)
    if os.geteuid() != 0:
        print("chaos.py: needs root (network namespaces, iptables, tcpdump)", file=sys.stderr)
        return 2
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out: Path = args.out or RESULTS / f"chaos-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    settings = event.Settings(
        backoff=args.backoff,
        interval_ms=args.interval_ms,
        long=args.long,
        keep_pcap=args.keep_pcap,
    )
    doc: dict[str, Any] = {
        "benchmark": "chaos",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "host": {"kernel": platform.release(), "cpus": os.cpu_count()},
        "settings": {
            "iterations": args.iterations,
            "backoff": args.backoff,
            "interval_ms": args.interval_ms,
            "long": args.long,
            "warmup": settings.warmup,
            "tail": settings.tail,
        },
        "events": [],
    }
    state_root = Path(tempfile.mkdtemp(prefix="chaos-"))
    c: mesh.Cluster | None = None
    ok = False
    try:
        print(f"bringing up the cluster (state in {state_root})", flush=True)
        began = time.monotonic()
        c = cl.up(state_root)
        doc["setup_s"] = round(time.monotonic() - began, 1)
        print(f"cluster up in {doc['setup_s']:.0f} s", flush=True)
        chosen = [t for t in targets.targets(c) if t.kind in args.kinds]
        for i in range(1, args.iterations + 1):
            for t in chosen:
                print(f"[{i}/{args.iterations}] kill -9 {t.label}", flush=True)
                rec = event.run(c, t, i, settings, out)
                doc["events"].append(rec)
                write(out, doc)
                back = report.event_recovery(rec)
                print(
                    f"    failed {sum(p['failed'] for p in rec['paths'].values())}, recovery "
                    f"{'never' if back is None else f'{back:.2f} s'}, ready {rec['ready_s']:.2f} s"
                    f"{'' if rec['clean'] else ', FINDINGS: ' + json.dumps(rec['findings'])}",
                    flush=True,
                )
        ok = True
    except (event.EventError, cl.ChaosSetupError, mesh.MeshUpError) as e:
        doc["error"] = str(e)
        print(f"chaos.py: {e}", file=sys.stderr)
    finally:
        write(out, doc)
        if c is not None:
            if not ok:
                kept = out / "logs"
                shutil.copytree(c.state.log_dir, kept, dirs_exist_ok=True)
                print(f"chaos.py: logs kept in {kept}", file=sys.stderr)
            mesh.down(c.spec.name, state_root)
        shutil.rmtree(state_root, ignore_errors=True)
    print()
    print(report.markdown(report.rows(doc["events"])))
    print(f"results: {out}")
    clean = all(e["clean"] for e in doc["events"])
    return 0 if ok and clean else 1


if __name__ == "__main__":
    sys.exit(run_interruptible(main, "chaos.py"))
