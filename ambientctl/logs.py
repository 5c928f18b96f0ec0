"""`ambientctl logs` and `ambientctl access-log`: a local cluster's log files, read where
its processes write them (`<state>/<cluster>/logs/`), as kubectl shows a pod's.

    logs ztunnel[/NODE] | agent[/NODE] | waypoint[/NAME] | ca | [NS/]POD
         [--node N] [-n NS] [-f] [--since 5m] [--tail N]
    access-log [--pod NS/NAME] [--identity SPIFFE] [--node N] [-f] [--since] [--tail] [-o json]

What is shown is decided in `logfilter` and `accesslog` (pure); this module finds the
files, reads them and follows them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ambientctl import accesslog, context
from ambientctl.errors import NotFound
from ambientctl.logfilter import Entry, LogUsage, complete_lines, entries, parse_duration, render
from ambientctl.logfilter import select as select_entries
from localcluster import mesh, waypoints
from localcluster.apps import process_name
from meshcore.defaults import NAMESPACE

FOLLOW_POLL = 0.25  # seconds between reads of a followed file
KEYWORDS = ("ztunnel", "agent", "waypoint", "ca")


class LogsError(NotFound):
    """Nothing to show for what was asked (exit 1): the message says what there is."""


@dataclass(frozen=True, slots=True)
class Source:
    """A log file and the name its lines are shown under."""

    name: str
    path: Path


# ---- which files -----------------------------------------------------------------------------


def _nodes(cluster: mesh.Cluster, wanted: str | None) -> list[str]:
    names = [n.name for n in cluster.spec.nodes]
    if wanted is not None and wanted not in names:
        raise LogsError(
            f"no node {wanted!r} in cluster {cluster.spec.name} (nodes: {', '.join(names)})"
        )
    return [wanted] if wanted is not None else names


def tunnel_sources(cluster: mesh.Cluster, node: str | None) -> list[Source]:
    return [Source(n, cluster.tunnel_log(n)) for n in _nodes(cluster, node)]


def sources(
    cluster: mesh.Cluster, target: str, node: str | None, namespace: str | None
) -> list[Source]:
    """The log files `target` names (see the module doc)."""
    kind, _, name = target.partition("/")
    if kind in ("ztunnel", "agent"):
        if name and node is not None and name != node:
            raise LogsError(f"{target} and --node {node} name different nodes")
        picked = _nodes(cluster, name or node)
        if kind == "ztunnel":
            return [Source(f"ztunnel/{n}", cluster.tunnel_log(n)) for n in picked]
        return [Source(f"agent/{n}", cluster.agent_log(n)) for n in picked]
    if kind == "ca" and not name:
        return [Source("ca", cluster.state.log_dir / "ca.log")]
    if kind == "waypoint":
        return _waypoint_sources(cluster, name, node, namespace)
    return [_pod_source(cluster, target, namespace)]


def _waypoint_sources(
    cluster: mesh.Cluster, name: str, node: str | None, namespace: str | None
) -> list[Source]:
    if node is not None:
        _nodes(cluster, node)
    spec = mesh.current_spec(cluster)
    every = sorted(spec.gateways, key=lambda g: g.key)
    chosen = [
        g
        for g in every
        if (not name or g.name == name)
        and (namespace is None or g.namespace == namespace)
        and (node is None or (g.placement is not None and g.placement.node == node))
    ]
    if not chosen:
        known = ", ".join(f"{g.namespace}/{g.name}" for g in every) or "none"
        raise LogsError(f"no waypoint matches (waypoints: {known})")
    return [
        Source(
            f"waypoint/{g.namespace}/{g.name}",
            cluster.state.log_dir / f"{waypoints.process_name(g)}.log",
        )
        for g in chosen
    ]


def _pod_source(cluster: mesh.Cluster, ref: str, namespace: str | None) -> Source:
    ns, sep, name = ref.rpartition("/")
    if not sep:
        ns = namespace or NAMESPACE
    if not name or ref.count("/") > 1 or not ns:
        raise LogUsage(
            f"{ref!r}: expected ztunnel[/NODE], agent[/NODE], waypoint[/NAME], ca, or a pod "
            "(NAMESPACE/NAME, or NAME with -n)"
        )
    if not any(p.namespace == ns and p.name == name for p in cluster.spec.pods):
        known = ", ".join(f"{p.namespace}/{p.name}" for p in cluster.spec.pods)
        raise LogsError(f"no pod {ns}/{name} in cluster {cluster.spec.name} (pods: {known})")
    return Source(f"pod/{ns}/{name}", cluster.state.log_dir / f"{process_name(ns, name)}.log")


# ---- reading and following -----------------------------------------------------------------


def read(source: Source) -> tuple[list[Entry], int, str]:
    """A file's entries, how many bytes were read, and an unfinished last line."""
    try:
        data = source.path.read_bytes()
        mtime = source.path.stat().st_mtime
    except FileNotFoundError:
        return [], 0, ""
    lines, rest = complete_lines(data.decode(errors="replace"))
    return entries(source.name, lines, mtime), len(data), rest


def follow(
    files: Sequence[Source],
    offsets: dict[Path, int],
    emit: Callable[[list[Entry]], None],
    poll: float = FOLLOW_POLL,
) -> int:
    """New whole lines of `files` as they are written, until none of them exists any more
    (the cluster was taken down: exit 0) or Ctrl-C (the caller's)."""
    pending = {s.path: "" for s in files}
    while True:
        alive = False
        for s in files:
            try:
                with open(s.path, "rb") as f:
                    size = f.seek(0, 2)
                    if size < offsets.get(s.path, 0):  # truncated or replaced: from the top
                        offsets[s.path], pending[s.path] = 0, ""
                    f.seek(offsets.get(s.path, 0))
                    data = f.read()
            except FileNotFoundError:
                continue
            alive = True
            if not data:
                continue
            offsets[s.path] = offsets.get(s.path, 0) + len(data)
            lines, pending[s.path] = complete_lines(pending[s.path] + data.decode(errors="replace"))
            if lines:
                emit(entries(s.name, lines, time.time()))
        if not alive:
            return 0
        time.sleep(poll)


def _since(args: argparse.Namespace) -> float | None:
    return None if args.since is None else time.time() - parse_duration(args.since)


def _tail(args: argparse.Namespace) -> int | None:
    if args.tail is None or args.tail < 0:
        return None
    return int(args.tail)


def _print(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


# ---- the commands -----------------------------------------------------------------------------


def run_logs(args: argparse.Namespace) -> int:
    since = _since(args)  # a bad --since is a usage error before anything is read
    cluster = context.attach(args)
    files = sources(cluster, args.target, args.node, args.namespace)
    if not args.follow and not any(s.path.exists() for s in files):
        raise LogsError(
            f"no log of {', '.join(s.name for s in files)} yet (looked in {cluster.state.log_dir})"
        )
    read_all = [read(s) for s in files]
    prefix = len(files) > 1 or args.prefix
    shown = select_entries([r[0] for r in read_all], since, _tail(args))
    tails = [r[2] for r in read_all]
    _print("".join(render(e, prefix) + "\n" for e in shown))
    if not args.follow:
        if any(tails):  # a last line still being written
            _print(
                "".join(
                    f"{render(Entry(s.name, t, 0), prefix)}\n"
                    for s, t in zip(files, tails, strict=True)
                    if t
                )
            )
        return 0
    offsets = {s.path: r[1] - len(r[2].encode()) for s, r in zip(files, read_all, strict=True)}
    return follow(
        files, offsets, lambda batch: _print("".join(render(e, prefix) + "\n" for e in batch))
    )


def _access_records(batch: Sequence[Entry], args: argparse.Namespace) -> list[accesslog.Record]:
    out = []
    for e in batch:
        record = accesslog.record_of(e)
        if record is not None and accesslog.matches(record, args.pod, args.identity):
            out.append(record)
    return out


def run_access_log(args: argparse.Namespace) -> int:
    since = _since(args)
    cluster = context.attach(args)
    files = tunnel_sources(cluster, args.node)
    read_all = [read(s) for s in files]
    dated = select_entries([r[0] for r in read_all], since, None)
    records = _access_records(dated, args)
    tail = _tail(args)
    if tail is not None:
        records = records[-tail:] if tail else []
    if not args.follow:
        out = (
            accesslog.render_json(records)
            if args.output == "json"
            else accesslog.render_table(records)
        )
        _print(out)
        return 0
    # A stream cannot be one JSON document: -f -o json writes one object per line.
    header = [True]

    def emit(batch: list[Entry]) -> None:
        found = _access_records(batch, args)
        if args.output == "json":
            _print("".join(json.dumps(r.to_json()) + "\n" for r in found))
        elif found or header[0]:
            _print(accesslog.render_follow(found, header[0]))
            header[0] = False

    emit_records(records, args, header)
    offsets = {s.path: r[1] - len(r[2].encode()) for s, r in zip(files, read_all, strict=True)}
    return follow(files, offsets, emit)


def emit_records(
    records: Sequence[accesslog.Record], args: argparse.Namespace, header: list[bool]
) -> None:
    """The records already logged, before following (same shape as what follows)."""
    if args.output == "json":
        _print("".join(json.dumps(r.to_json()) + "\n" for r in records))
        return
    _print(accesslog.render_follow(records, header[0]))
    header[0] = False


def _follow_ends_on_ctrl_c(
    fn: Callable[[argparse.Namespace], int],
) -> Callable[[argparse.Namespace], int]:
    """With -f, Ctrl-C is the normal end (exit 0), not an interruption."""

    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except KeyboardInterrupt:
            if getattr(args, "follow", False):
                return 0
            raise

    return run


def _common(p: argparse.ArgumentParser, node_help: str) -> None:
    p.add_argument("--node", help=node_help)
    p.add_argument(
        "-f", "--follow", action="store_true", help="keep printing new lines (Ctrl-C ends)"
    )
    p.add_argument(
        "--since", metavar="DURATION", help="only lines newer than this: 30s, 5m, 1h30m, 2d"
    )
    p.add_argument("--tail", type=int, metavar="N", help="only the last N lines (default: all)")


def register(sub: Any) -> None:
    """`logs` and `access-log` (one call from `ambientctl.cli.build_parser`)."""
    lg = sub.add_parser(
        "logs",
        help="a local cluster's logs: a pod's app, or a node's tunnel, agent, a waypoint, the CA",
        description="Print the logs of a pod's app or of the mesh's processes, as kubectl logs.",
        epilog="examples:\n"
        "  ambientctl logs cluster.yaml travel/frontend-0 --tail 20\n"
        "  ambientctl logs cluster.yaml ztunnel --node node1 --since 5m\n"
        "  ambientctl logs cluster.yaml ztunnel/node2 -f\n"
        "  ambientctl logs cluster.yaml waypoint/waypoint -n travel",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    context.add_cluster_arg(lg, then=(("target", "1"),))
    lg.add_argument(
        "target",
        help="ztunnel[/NODE], agent[/NODE], waypoint[/NAME], ca, or a pod: NAMESPACE/NAME "
        "(NAME with -n)",
    )
    lg.add_argument("-n", "--namespace", help="the namespace of a pod or waypoint name")
    lg.add_argument(
        "--prefix", action="store_true", help="[source] before each line (always with several)"
    )
    _common(lg, "only this node's tunnel, agent or waypoints")
    lg.set_defaults(fn=_follow_ends_on_ctrl_c(run_logs))
    al = sub.add_parser(
        "access-log",
        help="the tunnels' access log (one line per connection) as a table",
        description="Each connection the tunnels proxied, as their access-log lines say: "
        "time, node, direction, source, destination, source identity, bytes sent and "
        "received, duration, and the result (error and deciding policy).",
        epilog="examples:\n"
        "  ambientctl access-log cluster.yaml\n"
        "  ambientctl access-log cluster.yaml --pod travel/pricing-0 --since 10m\n"
        "  ambientctl access-log cluster.yaml -f \\\n"
        "      --identity spiffe://cluster.local/ns/travel/sa/frontend\n"
        "  ambientctl access-log cluster.yaml -o json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    context.add_cluster_arg(al)
    al.add_argument("--pod", metavar="NS/NAME", help="only connections from or to this pod")
    al.add_argument(
        "--identity", metavar="SPIFFE", help="only connections from or to this identity"
    )
    al.add_argument(
        "-o", "--output", choices=("table", "json"), default="table",
        help="table (default) or json (the raw lines; with -f one per line)",
    )  # fmt: skip
    _common(al, "only this node's tunnel")
    al.set_defaults(fn=_follow_ends_on_ctrl_c(run_access_log))
