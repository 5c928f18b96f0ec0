"""`ambientctl status` of a local cluster: asks each node (`statusview` decides and
renders). The table by default; `-o json` the per-node answers as they are. Exit 1 when
the cluster is not running or the table shows any problem."""

from __future__ import annotations

import argparse
import json
import sys

from ambientctl import context, statusview
from localcluster import mesh

EXIT_PROBLEM = 1
REGENERATE_HINT = (
    "the next `ambientctl apply` or `label` regenerates the mesh config from the cluster's records"
)


def run(args: argparse.Namespace) -> int:
    cluster = context.attach(args)
    if not cluster.mesh:
        print(f"cluster {cluster.spec.name} is up without the mesh (up --no-mesh)")
        return 0
    waypoints: dict[str, list[statusview.WaypointState]] = {}
    for g, r in mesh.waypoint_status(cluster):
        node = g.placement.node if g.placement is not None else ""
        state = statusview.WaypointState(f"{g.namespace}/{g.name}", r.ready, r.reason)
        waypoints.setdefault(node, []).append(state)
    nodes = []
    answers: dict[str, dict[str, object]] = {}
    for n in cluster.spec.nodes:
        tunnel = mesh.tunnel_status(cluster.layout, n.name)
        agent = mesh.agent_status(cluster, n.name)
        answers[n.name] = {"tunnel": tunnel, "agent": agent}
        problem = mesh.config_problem(tunnel, None) if tunnel else None
        nodes.append(
            statusview.NodeState(n.name, tunnel, agent, problem, waypoints.get(n.name, []))
        )
    if statusview.not_running(nodes):
        print(
            f"ambientctl status: cluster {cluster.spec.name} is not running (no tunnel or "
            "node agent answers on any node; `ambientctl down` it and `up` again)",
            file=sys.stderr,
        )
        return EXIT_PROBLEM
    st = statusview.status(nodes)
    if args.output == "json":
        print(json.dumps(answers, indent=2))
    else:
        print(statusview.render(st), end="")
    for p in st.problems:
        print(f"ambientctl status: {p}", file=sys.stderr)
    if st.refused:
        print(f"ambientctl status: {REGENERATE_HINT}", file=sys.stderr)
    return 0 if st.ok else EXIT_PROBLEM
