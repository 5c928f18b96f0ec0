"""`ambientctl`: bring a local cluster up or down, look at it, run the demo."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

import nsutil
from ambientctl import views
from localcluster import mesh
from localcluster.spec import SpecError, load_cluster
from localcluster.state import StateError
from meshcore.defaults import ADMIN_PORT


def _cmd_up(args: argparse.Namespace) -> int:
    cluster = mesh.up(
        args.cluster_file, args.state_root, mesh=not args.no_mesh, redirect_mode=args.redirect_mode
    )
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
    """Per node: the tunnel's readiness and the node agent's view (pods enrolled or
    pending, with the reason). Exit 1 unless every tunnel is ready and no pod waits."""
    cluster = mesh.attach(args.cluster_file, args.state_root)
    out: dict[str, dict[str, object]] = {}
    ok = True
    for n in cluster.spec.nodes:
        tunnel = mesh.tunnel_status(cluster.layout, n.name)
        entry: dict[str, object] = {"tunnel": tunnel}
        ok = ok and bool(tunnel and tunnel.get("ready"))
        agent = mesh.agent_status(cluster, n.name)
        entry["agent"] = agent
        pods = (agent or {}).get("pods") or {}
        ok = ok and agent is not None
        ok = ok and all(p.get("state") == "enrolled" for p in pods.values())
        out[n.name] = entry
    print(json.dumps(out, indent=2))
    return 0 if ok else 1


def _parse_label(text: str) -> tuple[str, str | None]:
    """`key=value` sets, `key-` removes (kubectl's forms)."""
    if "=" in text:
        key, _, value = text.partition("=")
        return key, value
    if text.endswith("-") and len(text) > 1:
        return text[:-1], None
    raise ValueError(f"label {text!r}: expected KEY=VALUE or KEY-")


def _cmd_label(args: argparse.Namespace) -> int:
    """Label a namespace or pod in the running cluster; enrolment follows at runtime."""
    cluster = mesh.attach(args.cluster_file, args.state_root)
    try:
        changes = [_parse_label(t) for t in args.labels]
    except ValueError as e:
        print(f"ambientctl label: {e}", file=sys.stderr)
        return 2
    try:
        for key, value in changes:
            if args.kind == "namespace":
                mesh.label_namespace(cluster, args.name, key, value)
            else:
                ns, sep, name = args.name.rpartition("/")
                mesh.label_pod(cluster, ns if sep else "default", name, key, value)
    except (KeyError, ValueError) as e:
        print(f"ambientctl label: {e.args[0] if e.args else e}", file=sys.stderr)
        return 1
    print(f"{args.kind} {args.name} labelled")
    return 0


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


def _admin_getter(cluster: mesh.Cluster) -> views.Getter:
    def get(node: str, path: str) -> tuple[int, bytes]:
        return mesh.node_http(cluster.layout, node, ADMIN_PORT, path)

    return get


def _status_hint(args: argparse.Namespace) -> str:
    return f"(see: ambientctl status {args.cluster_file})"


def _cmd_view(args: argparse.Namespace) -> int:
    cluster = mesh.attach(args.cluster_file, args.state_root)
    names = [n.name for n in cluster.spec.nodes]
    if args.node is not None and args.node not in names:
        print(
            f"ambientctl {args.cmd}: no node {args.node!r} in cluster {cluster.spec.name} "
            f"(nodes: {', '.join(names)})",
            file=sys.stderr,
        )
        return 2
    nodes = [args.node] if args.node is not None else names
    out = views.show(args.cmd, _admin_getter(cluster), nodes, args.output, _status_hint(args))
    print(out, end="")
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    cluster = mesh.attach(args.cluster_file, args.state_root)
    ns, _, name = args.source.rpartition("/")
    source = f"{ns or 'default'}/{name}"
    node = args.node
    if node is None:
        pods = [p for p in cluster.spec.pods if f"{p.namespace}/{p.name}" == source]
        if not pods:
            print(
                f"ambientctl explain: no pod {source} in cluster {cluster.spec.name}",
                file=sys.stderr,
            )
            return 2
        node = pods[0].node  # its own tunnel decides how its connections go
    out = views.explain(
        _admin_getter(cluster), node, source, args.destination, args.output, _status_hint(args)
    )
    print(out, end="")
    return 0


def _cmd_apply(args: argparse.Namespace) -> int:
    """Apply AuthorizationPolicy / PeerAuthentication YAML (one or more documents, as for
    kubectl) to a running cluster; every tunnel reloads it without a restart."""
    cluster = mesh.attach(args.cluster_file, args.state_root)
    text = sys.stdin.read() if args.filename == "-" else Path(args.filename).read_text()
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        print(f"ambientctl apply: {args.filename} is not YAML: {e}", file=sys.stderr)
        return 2
    try:
        applied = mesh.apply_policies(cluster, docs)
    except ValueError as e:
        print(f"ambientctl apply: {e}", file=sys.stderr)
        return 2
    for what in applied:
        print(f"{what} applied")
    return 0


def _cmd_delete(args: argparse.Namespace) -> int:
    cluster = mesh.attach(args.cluster_file, args.state_root)
    ns, sep, name = args.name.rpartition("/")
    kind = {
        "authorizationpolicy": "AuthorizationPolicy",
        "peerauthentication": "PeerAuthentication",
    }[args.kind.lower()]
    if not mesh.delete_policy(cluster, kind, ns if sep else "default", name):
        print(f"ambientctl delete: no {kind} {args.name}", file=sys.stderr)
        return 1
    print(f"{kind} {args.name} deleted")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from ambientctl.demo import run_demo

    return run_demo(args.state_root)


def _view_options(p: argparse.ArgumentParser, node_help: str) -> None:
    p.add_argument("--node", help=node_help)
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")


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
    up.add_argument(
        "--redirect-mode",
        choices=("iptables", "ebpf"),
        default="iptables",
        help="how the node agents capture pod traffic (default iptables)",
    )
    up.set_defaults(fn=_cmd_up)
    down = sub.add_parser("down", help="remove a local cluster (by name or cluster file)")
    down.add_argument("cluster")
    down.set_defaults(fn=_cmd_down)
    st = sub.add_parser("status", help="each node's tunnel readiness and agent's pods")
    st.add_argument("cluster_file")
    st.set_defaults(fn=_cmd_status)
    lb = sub.add_parser(
        "label", help="label a namespace or pod at runtime (enrols or releases its pods)"
    )
    lb.add_argument("cluster_file")
    lb.add_argument("kind", choices=("namespace", "pod"))
    lb.add_argument("name", help="<namespace>, or <namespace>/<pod>")
    lb.add_argument("labels", nargs="+", help="KEY=VALUE to set, KEY- to remove")
    lb.set_defaults(fn=_cmd_label)
    ex = sub.add_parser("exec", help="run a command inside a pod's network namespace")
    ex.add_argument("cluster_file")
    ex.add_argument("pod", help="<namespace>/<pod>")
    ex.add_argument("command", nargs=argparse.REMAINDER)
    ex.set_defaults(fn=_cmd_exec)
    for kind, what in (
        ("workloads", "workloads the tunnels know (config dump)"),
        ("services", "services and their endpoints (config dump)"),
        ("policies", "authorization policies and PeerAuthentications in force"),
        ("certificates", "each tunnel's workload certificates"),
        ("connections", "connections each tunnel is proxying now"),
    ):
        view = sub.add_parser(kind, help=what)
        view.add_argument("cluster_file")
        _view_options(view, "only this node's tunnel (default: every node)")
        view.set_defaults(fn=_cmd_view)
    explain_cmd = sub.add_parser(
        "explain", help="how a connection from a pod would be routed and authorized"
    )
    explain_cmd.add_argument("cluster_file")
    explain_cmd.add_argument("source", help="<namespace>/<pod>")
    explain_cmd.add_argument("destination", help="<host or ip>:<port>")
    _view_options(explain_cmd, "ask this node's tunnel (default: the source pod's node)")
    explain_cmd.set_defaults(fn=_cmd_explain)
    ap = sub.add_parser(
        "apply", help="apply AuthorizationPolicy / PeerAuthentication YAML to a running cluster"
    )
    ap.add_argument("cluster_file")
    ap.add_argument("-f", "--filename", required=True, help="YAML file, or - for stdin")
    ap.set_defaults(fn=_cmd_apply)
    rm = sub.add_parser("delete", help="delete a policy from a running cluster")
    rm.add_argument("cluster_file")
    rm.add_argument(
        "kind",
        type=str.lower,
        choices=("authorizationpolicy", "peerauthentication"),
    )
    rm.add_argument("name", help="<namespace>/<name>")
    rm.set_defaults(fn=_cmd_delete)
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
    except (SpecError, StateError, mesh.MeshUpError, views.ViewError, OSError) as e:
        print(f"ambientctl: {e}", file=sys.stderr)
        return 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
