"""`ambientctl metrics`: the Prometheus metrics of a local cluster's tunnels and waypoints,
fetched from their port 15020 inside their network namespaces (where nothing else reaches
them), filtered by metric name, per source.

    metrics [CLUSTER] [NAME_FILTER] [--node N] [--no-waypoints] [-o text|json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ambientctl import context, promparse
from localcluster import mesh
from localcluster.network import waypoint_layout
from meshcore.defaults import METRICS_PORT

EXIT_RUNTIME = 1
METRICS_PATH = "/metrics"
Fetch = Callable[[str], tuple[int, bytes]]  # path -> (status, body); raises OSError


@dataclass(frozen=True, slots=True)
class Target:
    """A process exposing metrics: its name (`ztunnel/node1`, `waypoint/ns/name`), its node
    and how to ask it."""

    name: str
    node: str
    fetch: Fetch


class MetricsError(RuntimeError):
    """Nothing to show (exit 1)."""


def targets(cluster: mesh.Cluster, node: str | None, with_waypoints: bool) -> list[Target]:
    names = [n.name for n in cluster.spec.nodes]
    if node is not None and node not in names:
        raise MetricsError(
            f"no node {node!r} in cluster {cluster.spec.name} (nodes: {', '.join(names)})"
        )
    out: list[Target] = []
    for n in names:
        if node is None or n == node:
            out.append(Target(f"ztunnel/{n}", n, _node_fetch(cluster, n)))
    if not with_waypoints:
        return out
    spec = mesh.current_spec(cluster)
    for g in sorted(spec.gateways, key=lambda g: g.key):
        if g.placement is None or (node is not None and g.placement.node != node):
            continue
        pod = waypoint_layout(spec, g)
        out.append(
            Target(f"waypoint/{g.namespace}/{g.name}", pod.node, _netns_fetch(pod.netns_path))
        )
    return out


def _node_fetch(cluster: mesh.Cluster, node: str) -> Fetch:
    return lambda path: mesh.node_http(cluster.layout, node, METRICS_PORT, path)


def _netns_fetch(netns_path: str) -> Fetch:
    return lambda path: mesh.netns_http(netns_path, METRICS_PORT, path)


@dataclass(frozen=True, slots=True)
class Scrape:
    """One target's answer: its families, or why there are none."""

    target: str
    node: str
    families: list[promparse.Family]
    error: str | None = None


def scrape(t: Target) -> Scrape:
    try:
        status, body = t.fetch(METRICS_PATH)
    except OSError as e:
        return Scrape(t.name, t.node, [], f"unreachable: {e.strerror or e}")
    if status != 200:
        return Scrape(t.name, t.node, [], f"{METRICS_PATH} answered {status}")
    try:
        return Scrape(t.name, t.node, promparse.parse(body.decode(errors="replace")))
    except promparse.PromParseError as e:
        return Scrape(t.name, t.node, [], f"not the Prometheus text format: {e}")


def render_text(scrapes: Sequence[Scrape], wanted: re.Pattern[str] | None) -> str:
    """Per source, a `# ==> name (node N) <==` line and its matching families as written."""
    out: list[str] = []
    for s in scrapes:
        out.append(f"# ==> {s.target} (node {s.node}) <==\n")
        if s.error is not None:
            out.append(f"# {s.error}\n")
            continue
        chosen = promparse.select(s.families, wanted)
        out.append(promparse.render(chosen) if chosen else "# no metric matches\n")
    return "".join(out)


def to_json(scrapes: Sequence[Scrape], wanted: re.Pattern[str] | None) -> dict[str, Any]:
    """{source: {"node", "error"?, "samples": [{name, labels, value}]}}"""
    doc: dict[str, Any] = {}
    for s in scrapes:
        entry: dict[str, Any] = {"node": s.node}
        if s.error is not None:
            entry["error"] = s.error
        entry["samples"] = [
            sample.to_json() for f in promparse.select(s.families, wanted) for sample in f.samples
        ]
        doc[s.target] = entry
    return doc


def _looks_like_cluster(arg: str) -> bool:
    return arg.endswith((".yaml", ".yml")) or os.path.isfile(arg)


def run_metrics(args: argparse.Namespace) -> int:
    cluster = context.attach(args)
    try:
        found = targets(cluster, args.node, not args.no_waypoints)
    except MetricsError as e:
        print(f"ambientctl metrics: {e}", file=sys.stderr)
        return EXIT_RUNTIME
    scrapes = [scrape(t) for t in found]
    wanted = promparse.name_filter(args.name_filter)
    if args.output == "json":
        sys.stdout.write(json.dumps(to_json(scrapes, wanted), indent=2) + "\n")
    else:
        sys.stdout.write(render_text(scrapes, wanted))
    for s in scrapes:
        if s.error is not None:
            print(f"ambientctl metrics: {s.target}: {s.error}", file=sys.stderr)
    return EXIT_RUNTIME if any(s.error is not None for s in scrapes) else 0


def register(sub: Any) -> None:
    """`metrics` (one call from `ambientctl.cli.build_parser`)."""
    p = sub.add_parser(
        "metrics",
        help="the tunnels' and waypoints' Prometheus metrics (port 15020), by metric name",
        description="Fetch /metrics from each node's tunnel and each waypoint, inside their "
        "network namespaces, and print the families whose name matches.",
        epilog="examples:\n"
        "  ambientctl metrics cluster.yaml\n"
        "  ambientctl metrics cluster.yaml istio_tcp_connections --node node1\n"
        "  ambientctl metrics cluster.yaml 'istio_requests_total|istio_tcp_.*_total' -o json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    context.add_cluster_arg(p, then=(("name_filter", "?"),))
    p.add_argument(
        "name_filter",
        nargs="?",
        metavar="NAME_FILTER",
        help="a regular expression (or substring) searched for in metric names",
    )
    p.add_argument("--node", help="only this node's tunnel and waypoints")
    p.add_argument("--no-waypoints", action="store_true", help="only the tunnels")
    p.add_argument(
        "-o", "--output", choices=("text", "json"), default="text",
        help="text (the exposition format, per source; default) or json (parsed samples)",
    )  # fmt: skip
    p.set_defaults(fn=run_metrics)
