"""`ambientctl use` (the current cluster, as `kubectl config use-context`) and `ambientctl
clusters` (the local clusters under the state root, the current one marked)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml

import nsutil
from ambientctl import context, tables
from localcluster.spec import parse_cluster
from localcluster.state import ClusterState, kept_spec

USE_EPILOG = """\
examples:
  ambientctl use demo/travel-cluster.yaml     # by file (it may be up later)
  ambientctl use travel                       # by name: a cluster up under the state root
  ambientctl use travel -n travel             # and a default namespace for get/describe
  ambientctl use --kubeconfig ~/.kube/config --context prod   # a Kubernetes cluster
  ambientctl use                              # which one is current
  ambientctl use --clear                      # forget it
"""

CLUSTERS_EPILOG = """\
examples:
  ambientctl clusters
  ambientctl clusters -o json
"""


def register(sub: Any) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    use = sub.add_parser(
        "use",
        help="remember the current cluster (or print it), as kubectl config use-context",
        description="Remember which cluster commands act on when none is given.",
        epilog=USE_EPILOG,
        formatter_class=fmt,
    )
    use.add_argument("cluster", nargs="?", help="a local cluster's NAME or FILE")
    use.add_argument(
        "--kubeconfig", default=argparse.SUPPRESS, help="a Kubernetes cluster's kubeconfig"
    )
    use.add_argument("--context", default=argparse.SUPPRESS, help="its context to use")
    use.add_argument(
        "-n", "--namespace", help="the default namespace of get and describe in this cluster"
    )
    use.add_argument("--clear", action="store_true", help="forget the current cluster")
    use.set_defaults(fn=run_use, no_cluster=True)
    cl = sub.add_parser(
        "clusters",
        help="the local clusters under the state root, the current one marked",
        description="List the local clusters with a record under the state root.",
        epilog=CLUSTERS_EPILOG,
        formatter_class=fmt,
    )
    cl.add_argument(
        "-o", "--output", choices=("table", "json"), default="table", help="table or json"
    )
    cl.set_defaults(fn=print_clusters, no_cluster=True)


def run_use(args: argparse.Namespace) -> int:
    if args.clear:
        context.write_current(args.state_root, None)
        print("no current cluster")
        return 0
    kubeconfig = getattr(args, "kubeconfig", None)
    kube_context = getattr(args, "context", None)
    if args.cluster is None and kubeconfig is None and kube_context is None and args.namespace:
        # `use -n NS`: the current cluster, another default namespace.
        current = context.read_current(args.state_root)
        if current is None:
            raise context.NoCluster("no current cluster to set the namespace of")
        chosen = dataclasses.replace(current, namespace=args.namespace)
        context.write_current(args.state_root, chosen)
        print(f"current cluster: {chosen.describe()}")
        return 0
    if args.cluster is None and kubeconfig is None and kube_context is None:
        current = context.read_current(args.state_root)
        if current is None:
            print("no current cluster (ambientctl use NAME|FILE)")
            return 1
        print(f"current cluster: {current.describe()}")
        return 0
    chosen = context.choose_current(
        args.state_root, args.cluster, kubeconfig, kube_context, args.namespace
    )
    context.write_current(args.state_root, chosen)
    print(f"current cluster: {chosen.describe()}")
    return 0


# ---- clusters -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClusterInfo:
    name: str
    running: bool
    mode: str  # mesh, no-mesh, kubernetes
    nodes: int | None  # None: no copy of its cluster file
    pods: int | None
    file: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "running": self.running,
            "mode": self.mode,
            "nodes": self.nodes,
            "pods": self.pods,
            "file": self.file,
        }


CLUSTER_HEADERS = ["CURRENT", "NAME", "STATUS", "MODE", "NODES", "PODS", "FILE"]


def cluster_rows(infos: Sequence[ClusterInfo], current: context.Current | None) -> list[list[str]]:
    """One row per cluster, `*` on the current one (as `kubectl config get-contexts`); a
    current Kubernetes cluster that is not a local one gets its own row. Pure."""
    mark = current.cluster if current is not None else None
    rows = [
        [
            "*" if i.name == mark else "",
            i.name,
            "Running" if i.running else "Stopped",
            i.mode,
            "-" if i.nodes is None else str(i.nodes),
            "-" if i.pods is None else str(i.pods),
            i.file or "-",
        ]
        for i in infos
    ]
    if current is not None and current.cluster is None and current.kubeconfig is not None:
        where = current.kubeconfig + (f" (context {current.context})" if current.context else "")
        rows.append(["*", "-", "-", "kubernetes", "-", "-", where])
    return rows


def cluster_info(name: str, state_root: str | None) -> ClusterInfo | None:
    state = ClusterState.load(name, state_root)
    if state is None:
        return None
    running = any(os.path.exists(nsutil.netns_path(n)) for n in state.netns)
    kube = context.kube_mode_kubeconfig(name, state_root) is not None
    mode = "kubernetes" if kube else "mesh" if (state.dir / "mesh").exists() else "no-mesh"
    kept = kept_spec(name, state_root)
    nodes = pods = None
    file = None
    if kept is not None:
        file = str(kept[0])
        try:
            spec = parse_cluster(kept[1], kept[0].parent)
            nodes, pods = len(spec.nodes), len(spec.pods)
        except ValueError:
            pass
    return ClusterInfo(name, running, mode, nodes, pods, file)


def print_clusters(args: argparse.Namespace) -> int:
    infos = [
        i
        for i in (cluster_info(n, args.state_root) for n in context.known_clusters(args.state_root))
        if i is not None
    ]
    current = context.read_current(args.state_root)
    output = getattr(args, "output", "table")
    if output in ("json", "yaml"):
        doc = {
            "current": current.to_json() if current is not None else None,
            "clusters": [i.to_json() for i in infos],
        }
        print(json.dumps(doc, indent=2) if output == "json" else yaml.safe_dump(doc), end="")
        if output == "json":
            print()
        return 0
    rows = cluster_rows(infos, current)
    empty = f"No clusters under {context.root(args.state_root)}."
    print(tables.render(CLUSTER_HEADERS, rows, empty=empty), end="")
    return 0
