"""`ambientctl`: bring a local cluster up or down, look at it, run the demo."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import nsutil
from localcluster import mesh
from localcluster.spec import SpecError, load_cluster
from localcluster.state import StateError


def _cmd_up(args: argparse.Namespace) -> int:
    cluster = mesh.up(args.cluster_file, args.state_root, mesh=not args.no_mesh)
    print(
        f"cluster {cluster.spec.name} is up: {len(cluster.spec.nodes)} nodes, "
        f"{len(cluster.spec.pods)} pods; state in {cluster.state.dir}"
    )
    return 0


def _cluster_name(arg: str) -> str:
    p = Path(arg)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return load_cluster(p).name
    return arg


def _cmd_down(args: argparse.Namespace) -> int:
    name = _cluster_name(args.cluster)
    mesh.down(name, args.state_root)
    print(f"cluster {name} is down")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    cluster = mesh.attach(args.cluster_file, args.state_root)
    out = {n.name: mesh.tunnel_status(cluster.layout, n.name) for n in cluster.spec.nodes}
    print(json.dumps(out, indent=2))
    return 0 if all(v and v.get("ready") for v in out.values()) else 1


def _cmd_exec(args: argparse.Namespace) -> int:
    cluster = mesh.attach(args.cluster_file, args.state_root)
    ns, _, name = args.pod.rpartition("/")
    where = cluster.pod_netns(ns or "default", name)
    argv = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not argv:
        print("ambientctl exec: no command given", file=sys.stderr)
        return 2
    proc = subprocess.run(argv, preexec_fn=nsutil.preexec_enter(where), check=False)
    return proc.returncode


def _cmd_demo(args: argparse.Namespace) -> int:
    from ambientctl.demo import run_demo

    return run_demo(args.state_root)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ambientctl", description=__doc__)
    p.add_argument(
        "--state-root",
        default=os.environ.get("AMBIENT_STATE_ROOT"),
        help="where cluster state lives (default /var/lib/ambientctl)",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="build a local cluster from a cluster file and start the mesh")
    up.add_argument("cluster_file")
    up.add_argument("--no-mesh", action="store_true", help="network and apps only, no tunnels")
    up.set_defaults(fn=_cmd_up)
    down = sub.add_parser("down", help="remove a local cluster (by name or cluster file)")
    down.add_argument("cluster")
    down.set_defaults(fn=_cmd_down)
    st = sub.add_parser("status", help="readiness of each node's tunnel")
    st.add_argument("cluster_file")
    st.set_defaults(fn=_cmd_status)
    ex = sub.add_parser("exec", help="run a command inside a pod's network namespace")
    ex.add_argument("cluster_file")
    ex.add_argument("pod", help="<namespace>/<pod>")
    ex.add_argument("command", nargs=argparse.REMAINDER)
    ex.set_defaults(fn=_cmd_exec)
    demo = sub.add_parser("demo", help="the travel-booking demo, end to end")
    demo.set_defaults(fn=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if os.geteuid() != 0:
        print("ambientctl: run as root (network namespaces need it)", file=sys.stderr)
        return 2
    try:
        rc: int = args.fn(args)
    except (SpecError, StateError, mesh.MeshUpError, OSError) as e:
        print(f"ambientctl: {e}", file=sys.stderr)
        return 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
