"""`ambientctl`: run a local cluster and its mesh, or look at the mesh of a Kubernetes cluster.

A local cluster: up or down, look at it, change it, run the demo. A Kubernetes cluster
(`--kubeconfig`/`--context`, else $KUBECONFIG or ~/.kube/config when no cluster file is
given): status, workloads, services, policies, explain, waypoint (`ambientctl.kubecmds`).

Every failure is one message on stderr and an exit code, never a traceback: 2 for a
command line that cannot mean anything (argparse's own errors, a malformed label), 1 for
everything else (a bad file, a cluster that is not running, a name it does not know, a
change the mesh refuses). `up` and `demo` tear down what they built on SIGINT or SIGTERM
and exit 130 / 143 (`localcluster.interrupt`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import os
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ambientctl import (
    completion,
    context,
    contextcmds,
    dashboard,
    kinds,
    kubecmds,
    logs,
    metricsview,
    statuscmd,
    verbs,
    viewfilter,
    views,
    waypoint_views,
)
from ambientctl.errors import NotFound, UsageError
from ambientctl.kubefetch import KubeTarget, KubeUsage
from ambientctl.kubeviews import ISTIO_NAMESPACE
from ambientctl.progress import Progress
from localcluster import gateways as gw
from localcluster import mesh, registry
from localcluster.apps import exec_context
from localcluster.inputs import InputError, read_text
from localcluster.interrupt import run_interruptible
from localcluster.kube import cluster as kube_cluster
from localcluster.kube.apiserver import KubeError
from localcluster.labels import LabelError, parse_changes
from localcluster.network import NetworkError
from localcluster.policies import KIND_NAMES, PolicyError, delete_keys
from localcluster.processes import ProcessError
from localcluster.spec import SpecError, load_cluster
from localcluster.state import DEFAULT_STATE_ROOT, StateError
from meshcore.defaults import ADMIN_PORT, NAMESPACE
from meshcore.discovery import parse_local_config
from meshcore.reader import load_documents
from meshcore.state import MeshConfigError
from waypoint import explain as wx
from waypoint.l7config import ROUTE_KINDS

EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C
DEFAULT_WAIT_TIMEOUT = 60.0
DEBUG_ENV = "AMBIENTCTL_DEBUG"  # set to 1: unexpected errors also print their traceback

# What a command can run into that is the input's or the machine's fault, not ours: the
# message is the whole story.
EXPECTED = (
    SpecError,
    StateError,
    InputError,
    PolicyError,
    LabelError,
    mesh.MeshUpError,
    kube_cluster.KubeUpError,
    KubeError,
    mesh.NotRunning,
    mesh.ConfigNotInForce,
    registry.ClusterConflict,
    NetworkError,
    ProcessError,
    views.ViewError,
    MeshConfigError,
    OSError,
)


class Refused(Exception):
    """A change refused as a whole (exit 1); nothing was changed."""


def _root(args: argparse.Namespace) -> str:
    return str(args.state_root or DEFAULT_STATE_ROOT)


# ---- up / down / status -------------------------------------------------------------------


def _cmd_up(args: argparse.Namespace) -> int:
    if args.kubernetes:
        with Progress() as progress:
            kc = kube_cluster.up(
                args.cluster_file, args.state_root, install=args.install, progress=progress
            )
            progress.done()
        how = {
            "helm": "the mesh installed with its Helm charts (istio-system)",
            "processes": "the mesh as processes beside the cluster",
            "none": "no mesh",
        }[args.install]
        print(
            f"cluster {kc.spec.name} is up in Kubernetes mode: {len(kc.spec.nodes)} nodes "
            f"Ready, {how}; state in {kc.state.dir}\nkubeconfig: {kc.kubeconfig}\n"
            f"  kubectl --kubeconfig {kc.kubeconfig} apply -f <manifests>"
        )
        return 0
    with Progress() as progress:
        cluster = mesh.up(
            args.cluster_file, args.state_root, mesh=not args.no_mesh,
            redirect_mode=args.redirect_mode, progress=progress,
        )  # fmt: skip
        progress.done(
            f"cluster {cluster.spec.name} is up: {len(cluster.spec.nodes)} nodes, "
            f"{len(cluster.spec.pods)} pods; state in {cluster.state.dir}"
        )
    return 0


def _cluster_name(arg: str) -> str:
    p = Path(arg)
    if p.suffix in (".yaml", ".yml") or p.is_file():
        return load_cluster(p).name
    return arg


def _cmd_kubeconfig(args: argparse.Namespace) -> int:
    """The kubeconfig of a cluster up in Kubernetes mode (for `kubectl --kubeconfig`)."""
    name = _cluster_name(args.cluster)
    path = kube_cluster.kubeconfig_path(name, args.state_root)
    if not path.is_file():
        raise mesh.NotRunning(
            f"cluster {name} is not running in Kubernetes mode under {_root(args)} "
            "(ambientctl up --kubernetes CLUSTER_FILE)"
        )
    print(path)
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    """Idempotent, as `kind delete cluster` is: a cleanup step (a CI `trap`, a script run
    after a failed `up`) must not fail because there is nothing left. A name without a
    record changes nothing and says so."""
    name = _cluster_name(args.cluster)
    with Progress() as progress:
        report = mesh.down(name, args.state_root, progress)
        if not report.found and not report.netns_removed and not report.processes_stopped:
            progress.done(f"nothing to do: no cluster {name} under {_root(args)}")
            return 0
        progress.done(
            f"cluster {name} is down ({len(report.netns_removed)} namespaces, "
            f"{report.processes_stopped} processes stopped)"
        )
    if context.forget(args.state_root, name):
        print(f"{name} is no longer the current cluster")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    """Per node: the tunnel's readiness (with the mesh config it runs), the node agent and
    its pods, the waypoints. Exit 1 unless every tunnel is ready, runs the config as
    written, no pod waits and every waypoint is programmed (`ambientctl.statuscmd`)."""
    return statuscmd.run(args)


# ---- label / exec ---------------------------------------------------------------------------


def _cmd_label(args: argparse.Namespace) -> int:
    """Label a namespace or pod in the running cluster; enrolment follows at runtime.
    Every change is checked before any is made (all or nothing)."""
    if args.kind not in LABEL_KINDS:
        raise UsageError(f"kind {args.kind!r}: expected one of {', '.join(LABEL_KINDS)}")
    try:
        changes = parse_changes(args.labels)
    except LabelError as e:
        raise UsageError(str(e)) from None
    if args.kind in ("pod", "service") and "/" not in args.name:
        args.name = f"{args.namespace or NAMESPACE}/{args.name}"
    cluster = context.attach(args)
    try:
        done = mesh.label(cluster, args.kind, args.name, changes)
    except KeyError as e:
        raise NotFound(e.args[0]) from None
    for line in done.lines:
        print(line)
    return 0


LABEL_KINDS = ("namespace", "service", "pod")


def _pod_ref(ref: str) -> tuple[str, str]:
    ns, _, name = ref.rpartition("/")
    if not name or ref.count("/") > 1:
        raise UsageError(f"pod {ref!r}: expected <namespace>/<pod> or <pod>")
    return ns or NAMESPACE, name


def _find_pod(cluster: mesh.Cluster, ref: str) -> tuple[str, str]:
    ns, name = _pod_ref(ref)
    if not any(p.namespace == ns and p.name == name for p in cluster.spec.pods):
        known = ", ".join(f"{p.namespace}/{p.name}" for p in cluster.spec.pods)
        raise NotFound(f"no pod {ns}/{name} in cluster {cluster.spec.name} (pods: {known})")
    return ns, name


def _cmd_exec(args: argparse.Namespace) -> int:
    argv = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not argv:
        raise UsageError("no command given (ambientctl exec NS/POD -- CMD ARGS...)")
    if args.namespace is not None and "/" not in args.pod:
        args.pod = f"{args.namespace}/{args.pod}"
    _pod_ref(args.pod)
    cluster = context.attach(args)
    # The pod's environment and resolver, as its app has them (localcluster.apps).
    env, enter = exec_context(
        cluster.spec, cluster.layout, cluster.state, cluster.spec.pod(*_find_pod(cluster, args.pod))
    )
    try:
        proc = subprocess.run(argv, env=env, preexec_fn=enter, check=False)
    except FileNotFoundError:
        raise NotFound(f"command {argv[0]!r} not found") from None
    except PermissionError:
        raise NotFound(f"command {argv[0]!r} cannot be run (permission denied)") from None
    except subprocess.SubprocessError as e:  # entering the pod's namespaces failed
        raise NotFound(f"cannot run {argv[0]!r} in pod {args.pod}: {e}") from None
    return proc.returncode


# ---- views --------------------------------------------------------------------------------


def _admin_getter(cluster: mesh.Cluster) -> views.Getter:
    def get(node: str, path: str) -> tuple[int, bytes]:
        return mesh.node_http(cluster.layout, node, ADMIN_PORT, path)

    return get


def _status_hint(args: argparse.Namespace) -> str:
    given = args.cluster_file or getattr(args, "cluster_name", None)
    return f"(see: ambientctl status{' ' + given if given else ''})"


def _check_node(cluster: mesh.Cluster, node: str | None) -> list[str]:
    names = [n.name for n in cluster.spec.nodes]
    if node is not None and node not in names:
        raise NotFound(
            f"no node {node!r} in cluster {cluster.spec.name} (nodes: {', '.join(names)})"
        )
    return [node] if node is not None else names


def _cmd_view(args: argparse.Namespace) -> int:
    cluster = context.attach(args)
    nodes = _check_node(cluster, args.node)
    if args.namespace is not None:
        _check_namespace(cluster, args.namespace)
    out = viewfilter.show(
        args.cmd, _admin_getter(cluster), nodes, args.output, _status_hint(args), args.namespace
    )
    print(out, end="")
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    if args.namespace is not None and "/" not in args.source:
        args.source = f"{args.namespace}/{args.source}"
    _pod_ref(args.source)
    cluster = context.attach(args)
    ns, name = _find_pod(cluster, args.source)
    node = _check_node(cluster, args.node)[0] if args.node else cluster.spec.pod(ns, name).node
    if args.http is None:
        if args.header:
            raise UsageError("-H/--header goes with --http")
        out = views.explain(
            _admin_getter(cluster), node, f"{ns}/{name}", args.destination, args.output,
            _status_hint(args),
        )  # fmt: skip
        print(out, end="")
        return 0
    try:
        probe = wx.parse_probe(args.http, args.header or [], args.destination)
    except wx.ExplainError as e:
        raise UsageError(str(e)) from None
    doc = views.explain_doc(
        _admin_getter(cluster), node, f"{ns}/{name}", args.destination, _status_hint(args)
    )
    request = views.probe_request(probe)
    hop = views.waypoint_hop(doc)
    if isinstance(hop, str):
        http = views.no_waypoint(request, hop)
    else:
        # The waypoint's own decision functions, on the mesh config every proxy reads now.
        state = parse_local_config(cluster.paths.xds.read_text())
        source = next((w for w in state.workloads if w.namespace == ns and w.name == name), None)
        try:
            gateway = wx.gateway_of(state, hop[0])
        except wx.ExplainError as e:
            raise NotFound(str(e)) from None
        network = source.network if source is not None else ""
        http = wx.explain_request(state, gateway, hop[1], probe, source, network).to_json()
    print(views.render_explain_http(doc, http, args.output), end="")
    return 0


# ---- apply / delete -------------------------------------------------------------------------


def _documents(filename: str, namespace: str | None = None) -> list[Any]:
    """The YAML documents of a file (or stdin), size-capped and text-only; `namespace`
    (-n) fills in a document's missing metadata.namespace, as kubectl does."""
    text = read_text(filename, "policy file")
    docs = load_documents(text, lambda message: InputError(f"{filename} is {message}"))
    if not docs:
        raise InputError(f"{filename} holds no documents")
    for doc in docs:
        meta = doc.get("metadata") if isinstance(doc, dict) else None
        if namespace and isinstance(meta, dict) and not meta.get("namespace"):
            meta["namespace"] = namespace
    return docs


def _finish(cluster: mesh.Cluster, done: mesh.ConfigChange, args: argparse.Namespace) -> int:
    suffix = " (dry run)" if args.dry_run else ""
    for line in done.lines:
        print(line + suffix)
    for w in done.warnings:
        print(f"Warning: {w}", file=sys.stderr)
    if args.wait and done.digest is not None:
        with Progress() as progress:
            mesh.wait_config(cluster, done.digest, args.timeout, progress)
            progress.done(f"every tunnel runs the new mesh config ({done.digest[:12]})")
    return 0


def _cmd_apply(args: argparse.Namespace) -> int:
    """Apply AuthorizationPolicy / PeerAuthentication YAML (one or more documents, as for
    kubectl) to a running cluster; every tunnel reloads it without a restart."""
    docs = _documents(args.filename, args.namespace)
    cluster = context.attach(args)
    source = "stdin" if args.filename == "-" else args.filename
    if args.node is not None:
        _check_node(cluster, args.node)
    try:
        done = mesh.apply_resources(cluster, docs, source, dry_run=args.dry_run, node=args.node)
    except PolicyError as e:
        raise Refused(f"{e}\nnothing was applied") from None
    return _finish(cluster, done, args)


def _cmd_delete(args: argparse.Namespace) -> int:
    if args.filename is not None:
        if args.kind is not None:
            raise UsageError("give either -f FILE or KIND NAMESPACE/NAME, not both")
        source = "stdin" if args.filename == "-" else args.filename
        keys = delete_keys(_documents(args.filename, args.namespace), source)
    else:
        if args.kind is None or args.name is None:
            raise UsageError("give KIND NAMESPACE/NAME, or -f FILE")
        try:
            kind = kinds.resolve(args.kind)
        except kinds.UnknownKind as e:
            raise UsageError(str(e)) from None
        if not kind.is_document:
            raise UsageError(
                f"{kind.plural} are not deleted this way; deletable kinds: {', '.join(KIND_NAMES)}"
            )
        ns, sep, name = args.name.rpartition("/")
        if not name or args.name.count("/") > 1:
            raise UsageError(f"{args.name!r}: expected <namespace>/<name> or <name>")
        keys = [(kind.kind, ns if sep else (args.namespace or NAMESPACE), name)]
    cluster = context.attach(args)
    try:
        done = mesh.delete_resources(cluster, keys, dry_run=args.dry_run)
    except PolicyError as e:
        raise Refused(f"{e}\nnothing was deleted") from None
    return _finish(cluster, done, args)


# ---- waypoints ---------------------------------------------------------------------------------


def _check_namespace(cluster: mesh.Cluster, namespace: str) -> str:
    names = [ns.name for ns in cluster.spec.namespaces]
    if namespace not in names:
        raise NotFound(
            f"no namespace {namespace!r} in cluster {cluster.spec.name} "
            f"(namespaces: {', '.join(names)})"
        )
    return namespace


def _cmd_waypoint_apply(args: argparse.Namespace) -> int:
    """`istioctl waypoint apply`: the Gateway, its pod and process; with --enroll-namespace
    the namespace's `istio.io/use-waypoint` label; with --wait, until it is Programmed."""
    doc = gw.waypoint_resource(args.name, args.namespace, args.waypoint_for)
    try:
        gw.parse_gateway(doc, "--name")
    except gw.GatewayError as e:
        raise UsageError(str(e)) from None
    cluster = context.attach(args)
    _check_namespace(cluster, args.namespace)
    if args.node is not None:
        _check_node(cluster, args.node)
    try:
        done = mesh.apply_resources(cluster, [doc], "waypoint", node=args.node)
    except PolicyError as e:
        raise Refused(f"{e}\nnothing was applied") from None
    print(f"waypoint {args.namespace}/{args.name} applied ({done.lines[0].split(' ', 2)[2]})")
    if args.enroll_namespace:
        change = parse_changes([f"istio.io/use-waypoint={args.name}"])
        mesh.label(cluster, "namespace", args.namespace, change)
        print(f"namespace {args.namespace} labeled with istio.io/use-waypoint={args.name}")
    if args.wait:

        def poll() -> gw.Readiness:
            for g, r in mesh.waypoint_status(cluster, args.namespace):
                if g.name == args.name:
                    return r
            return gw.Readiness(False, "NotFound", "the waypoint is gone")

        ready = waypoint_views.wait_programmed(poll, args.timeout)
        if not ready.ready:
            raise Refused(
                f"waypoint {args.namespace}/{args.name} is not programmed after "
                f"{args.timeout:g} s: {ready.message}"
            )
        print(f"waypoint {args.namespace}/{args.name} is programmed")
    return 0


def _waypoints(args: argparse.Namespace) -> tuple[mesh.Cluster, list[Any]]:
    cluster = context.attach(args)
    namespace = None if getattr(args, "all_namespaces", False) else args.namespace
    if namespace is not None:
        _check_namespace(cluster, namespace)
    return cluster, mesh.waypoint_status(cluster, namespace)


def _cmd_waypoint_list(args: argparse.Namespace) -> int:
    _, found = _waypoints(args)
    if args.output == "json":
        print(waypoint_views.as_json_list(found), end="")
    else:
        print(waypoint_views.render_list(found, args.all_namespaces), end="")
    return 0


def _cmd_waypoint_status(args: argparse.Namespace) -> int:
    """Ready, or why not, answered at once; exit 1 unless every waypoint asked about is
    programmed."""
    cluster, found = _waypoints(args)
    if args.name is not None:
        found = [(g, r) for g, r in found if g.name == args.name]
        if not found:
            raise NotFound(f"no waypoint {args.namespace}/{args.name}")
    elif not found:
        raise NotFound(f"no waypoint in namespace {args.namespace}")
    print(waypoint_views.render_status(found), end="")
    problems = [p for p in mesh.waypoint_problems(cluster) if f" {args.namespace}/" in p]
    for p in problems:
        print(f"Warning: {p}", file=sys.stderr)
    return 0 if all(r.ready for _, r in found) else EXIT_RUNTIME


def _cmd_waypoint_delete(args: argparse.Namespace) -> int:
    if bool(args.names) == bool(args.all):
        raise UsageError("give the waypoint NAME(s), or --all")
    cluster, found = _waypoints(args)
    names = [g.name for g, _ in found] if args.all else list(args.names)
    if not names:
        print(f"no waypoint in namespace {args.namespace}")
        return 0
    keys = [(gw.GATEWAY_KIND, args.namespace, n) for n in names]
    try:
        done = mesh.delete_resources(cluster, keys)
    except PolicyError as e:
        raise Refused(f"{e}\nnothing was deleted") from None
    for name in names:
        print(f"waypoint {args.namespace}/{name} deleted")
    del done
    return 0


def _cmd_routes(args: argparse.Namespace) -> int:
    """Each service's routes (HTTPRoute, GRPCRoute, VirtualService) with the status the
    waypoints compute: Accepted / ResolvedRefs, with the reason when not."""
    cluster = context.attach(args)
    spec = mesh.current_spec(cluster)
    # The status a waypoint computes, from the mesh config every proxy reads.
    state = parse_local_config(cluster.paths.xds.read_text())
    documents = [r.document() for kind in ROUTE_KINDS for r in state.resources(kind)]
    gateways = [g.key for g in gw.sorted_gateways(spec.gateways)]
    statuses = waypoint_views.waypoint_statuses(documents, state.services, gateways)
    rows = waypoint_views.routes(spec, documents, statuses)
    if args.namespace is not None and not args.all_namespaces:
        _check_namespace(cluster, args.namespace)
        rows = [r for r in rows if r.namespace == args.namespace]
    if args.output == "json":
        print(views.as_json([r.to_json() for r in rows]), end="")
    else:
        print(waypoint_views.render_routes(rows), end="")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from ambientctl.demo import run_demo

    with Progress() as progress, contextlib.redirect_stdout(progress.wrap(sys.stdout)):
        return run_demo(args.state_root, progress)


# ---- the command line -------------------------------------------------------------------------


def _kube_flags(p: argparse.ArgumentParser, default: str | None) -> None:
    """Before the subcommand (`default` None) or after it (SUPPRESS: the global one stays)."""
    p.add_argument(
        "--kubeconfig",
        default=default,
        help="a Kubernetes cluster's kubeconfig (instead of a cluster file; default: the "
        "current cluster (ambientctl use), else $KUBECONFIG, else ~/.kube/config)",
    )
    p.add_argument("--context", default=default, help="the kubeconfig context to use")


def _cluster_options(
    p: argparse.ArgumentParser, istio_namespace: bool = False, then: context.Positionals = ()
) -> None:
    """A local cluster (its file, --cluster NAME, or the current one), or a Kubernetes
    cluster (kubeconfig, context)."""
    context.add_cluster_arg(p, then)
    _kube_flags(p, argparse.SUPPRESS)
    if istio_namespace:
        p.add_argument(
            "--istio-namespace",
            default=ISTIO_NAMESPACE,
            help="Kubernetes: where the mesh is installed (default istio-system)",
        )


def _view_options(p: argparse.ArgumentParser, node_help: str) -> None:
    p.add_argument("--node", help=node_help)
    p.add_argument(
        "-o", "--output", choices=("table", "json"), default="table", help="table or json"
    )


def _change_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true", help="check and show, change nothing")
    p.add_argument(
        "--wait", action="store_true", help="return once every node's tunnel runs the change"
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_WAIT_TIMEOUT,
        help=f"seconds --wait waits at most (default {DEFAULT_WAIT_TIMEOUT:g})",
    )


def _namespace_options(p: argparse.ArgumentParser, required: bool) -> None:
    group = p.add_mutually_exclusive_group(required=required)
    group.add_argument("-n", "--namespace", help="the namespace")
    group.add_argument("-A", "--all-namespaces", action="store_true", help="every namespace")


def _command(sub: Any, name: str, what: str, *examples: str) -> argparse.ArgumentParser:
    """A subcommand with its one-line help, that line as its description and `examples`
    (a command and its comment each) as its epilog."""
    epilog = "examples:\n" + "\n".join(f"  {e}" for e in examples) if examples else None
    return sub.add_parser(  # type: ignore[no-any-return]
        name,
        help=what,
        description=what[:1].upper() + what[1:] + ".",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _waypoint_parser(sub: Any) -> None:
    wp = _command(
        sub,
        "waypoint",
        "waypoints (L7 proxies): apply, list, status, delete",
        "ambientctl waypoint apply -n travel --enroll-namespace --wait",
        "ambientctl waypoint list -A",
    )
    wsub = wp.add_subparsers(dest="waypoint_cmd", required=True, metavar="COMMAND")
    ap = _command(
        wsub,
        "apply",
        "create or update a waypoint in a namespace",
        "ambientctl waypoint apply -n travel",
        "ambientctl waypoint apply -n travel --name reviews-wp --for workload --wait",
    )
    _cluster_options(ap)
    ap.add_argument("-n", "--namespace", required=True, help="the waypoint's namespace")
    ap.add_argument("--name", default=gw.DEFAULT_NAME, help="its name (default: waypoint)")
    ap.add_argument(
        "--for",
        dest="waypoint_for",
        choices=gw.WAYPOINT_FOR,
        default=gw.DEFAULT_WAYPOINT_FOR,
        help="the traffic it takes: service (default), workload, all or none",
    )
    ap.add_argument(
        "--enroll-namespace",
        action="store_true",
        help="label the namespace istio.io/use-waypoint=<name>",
    )
    ap.add_argument("--node", help="where its pod runs (default: the first node)")
    ap.add_argument("--wait", action="store_true", help="return once it is programmed")
    ap.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_WAIT_TIMEOUT,
        help=f"seconds --wait waits at most (default {DEFAULT_WAIT_TIMEOUT:g})",
    )
    ap.set_defaults(fn=_cmd_waypoint_apply)
    ls = _command(
        wsub,
        "list",
        "the waypoints, with their addresses and readiness",
        "ambientctl waypoint list -n travel",
        "ambientctl waypoint list -A -o json",
    )
    _cluster_options(ls)
    _namespace_options(ls, required=True)
    ls.add_argument(
        "-o", "--output", choices=("table", "json"), default="table", help="table or json"
    )
    ls.set_defaults(fn=_cmd_waypoint_list)
    st = _command(
        wsub,
        "status",
        "whether a namespace's waypoints are ready, or why not",
        "ambientctl waypoint status -n travel",
    )
    _cluster_options(st)
    st.add_argument("-n", "--namespace", required=True, help="the waypoints' namespace")
    st.add_argument("--name", help="only this waypoint")
    st.set_defaults(fn=_cmd_waypoint_status)
    rm = _command(
        wsub,
        "delete",
        "delete waypoints (their pods and processes)",
        "ambientctl waypoint delete -n travel waypoint",
        "ambientctl waypoint delete -n travel --all",
    )
    _cluster_options(rm, then=(("names", "*"),))
    rm.add_argument("-n", "--namespace", required=True, help="the waypoints' namespace")
    rm.add_argument("names", nargs="*", help="waypoint names")
    rm.add_argument("--all", action="store_true", help="every waypoint of the namespace")
    rm.set_defaults(fn=_cmd_waypoint_delete)


def _version() -> str:
    try:
        return importlib.metadata.version("ambient-mesh")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


EPILOG = """\
which cluster: a command acts on the cluster file given, else --cluster NAME, else the
current cluster (`ambientctl use NAME|FILE`); with --kubeconfig/--context (or a current
Kubernetes cluster) status, workloads, services, policies, explain, get and waypoint work
on a Kubernetes cluster.

examples:
  ambientctl up demo/travel-cluster.yaml && ambientctl use travel
  ambientctl status
  ambientctl get ap -n travel
  ambientctl explain travel/frontend-0 pricing.travel:80
  ambientctl apply -f policy.yaml --wait
  ambientctl down travel

exit codes: 0 ok, 1 a runtime problem (or a status that shows one), 2 a usage error
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ambientctl",
        description=(__doc__ or "").split("\n")[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    _kube_flags(p, None)
    context.add_cluster_option(p, None)
    p.add_argument(
        "--state-root",
        default=os.environ.get("AMBIENT_STATE_ROOT"),
        help="where cluster state lives (default $AMBIENT_STATE_ROOT, else /var/lib/ambientctl)",
    )
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    up = _command(
        sub,
        "up",
        "build a local cluster from a cluster file and start the mesh",
        "ambientctl up demo/travel-cluster.yaml",
        "ambientctl up --redirect-mode ebpf c.yaml",
        "ambientctl up --kubernetes nodes.yaml      # prints the kubeconfig",
    )
    up.add_argument("cluster_file", help="the cluster file (nodes, namespaces, pods, ...)")
    up.add_argument("--no-mesh", action="store_true", help="network and apps only, no tunnels")
    up.add_argument(
        "--redirect-mode",
        choices=("iptables", "ebpf"),
        default="iptables",
        help="how the node agents capture pod traffic (default iptables)",
    )
    up.add_argument(
        "--kubernetes",
        action="store_true",
        help="a real Kubernetes control plane and kubelet on the file's nodes (pods come "
        "from kubectl; prints the kubeconfig)",
    )
    up.add_argument(
        "--install",
        choices=("helm", "processes", "none"),
        default="helm",
        help="with --kubernetes: how the mesh goes on the cluster: its Helm charts, run by the "
        "kubelet from the image (default; `make image` builds it), or as processes beside "
        "the cluster, or not at all",
    )
    up.set_defaults(fn=_cmd_up)
    kc = _command(
        sub,
        "kubeconfig",
        "the kubeconfig path of a Kubernetes-mode cluster",
        'kubectl --kubeconfig "$(ambientctl kubeconfig c.yaml)" get pods -A',
    )
    kc.add_argument("cluster", help="cluster name or cluster file")
    kc.set_defaults(fn=_cmd_kubeconfig)
    down = _command(
        sub,
        "down",
        "remove a local cluster (by name or cluster file)",
        "ambientctl down travel",
        "ambientctl down demo/travel-cluster.yaml",
    )
    down.add_argument("cluster", help="cluster name or cluster file")
    down.set_defaults(fn=_cmd_down)
    contextcmds.register(sub)
    st = _command(
        sub,
        "status",
        "per node: tunnel, mesh config in force, agent, pods, waypoints (Kubernetes: istiod, "
        "the DaemonSets per node, the ambient namespaces)",
        "ambientctl status",
        "ambientctl status c.yaml -o json",
        "ambientctl --kubeconfig ~/.kube/config status",
    )
    _cluster_options(st, istio_namespace=True)
    st.add_argument(
        "-o", "--output", choices=("table", "json"), default="table", help="table or json"
    )
    st.set_defaults(fn=_cmd_status)
    verbs.register(sub)
    lb = _command(
        sub,
        "label",
        "label a namespace or pod at runtime (enrols or releases its pods)",
        "ambientctl label namespace travel istio.io/dataplane-mode=ambient",
        "ambientctl label pod -n travel legacy-0 istio.io/dataplane-mode=none",
        "ambientctl label service travel/reviews istio.io/use-waypoint=waypoint",
        "ambientctl label namespace travel istio.io/dataplane-mode-   # remove",
    )
    context.add_cluster_arg(lb, then=(("kind", "1"), ("name", "1"), ("labels", "+")))
    lb.add_argument("kind", metavar="{namespace,service,pod}", help="what to label")
    lb.add_argument("name", help="<namespace>, or [<namespace>/]<service or pod>")
    lb.add_argument("labels", nargs="+", help="KEY=VALUE to set, KEY- to remove")
    lb.add_argument("-n", "--namespace", help="the namespace of a service or pod name")
    lb.set_defaults(fn=_cmd_label)
    ex = _command(
        sub,
        "exec",
        "run a command inside a pod's network namespace",
        "ambientctl exec travel/frontend-0 -- curl -s reviews.travel",
        "ambientctl exec -n travel frontend-0 -- ip addr",
    )
    context.add_cluster_arg(ex, then=(("pod", "1"), ("command", "*")))
    ex.add_argument("pod", help="[<namespace>/]<pod>")
    ex.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command and its args")
    ex.add_argument("-n", "--namespace", help="the namespace of the pod name")
    ex.set_defaults(fn=_cmd_exec)
    for kind, what in (
        ("workloads", "workloads the tunnels know (config dump)"),
        ("services", "services and their endpoints (config dump)"),
        ("policies", "authorization policies and PeerAuthentications in force"),
        ("certificates", "each tunnel's workload certificates"),
        ("connections", "connections each tunnel is proxying now"),
    ):
        view = _command(
            sub, kind, what, f"ambientctl {kind}", f"ambientctl {kind} -n travel -o json"
        )
        _cluster_options(view, istio_namespace=kind in kubecmds.COMMANDS)
        view.add_argument("-n", "--namespace", help="only this namespace")
        _view_options(view, "only this node's tunnel (default: every node)")
        view.set_defaults(fn=_cmd_view)
    explain_cmd = _command(
        sub,
        "explain",
        "how a connection from a pod would be routed and authorized",
        "ambientctl explain travel/frontend-0 pricing.travel:80",
        "ambientctl explain -n travel frontend-0 reviews.travel:9080 --http 'GET /r/1'",
    )
    _cluster_options(
        explain_cmd, istio_namespace=True, then=(("source", "1"), ("destination", "1"))
    )
    explain_cmd.add_argument("source", help="<namespace>/<pod>, <pod> with -n, or a pod IP")
    explain_cmd.add_argument(
        "destination",
        help="<host or ip>:<port>; on Kubernetes also <namespace>/<pod>[:port], "
        "<svc>.<namespace>[:port] (the port defaults to the service's or pod's first)",
    )
    explain_cmd.add_argument("-n", "--namespace", help="the namespace of pod names (default)")
    _view_options(explain_cmd, "ask this node's tunnel (default: the source pod's node)")
    explain_cmd.add_argument(
        "--http",
        nargs="?",
        const="GET /",
        metavar="'METHOD /PATH'",
        help="also show what the waypoint on the path would decide for this request "
        "(default GET /; nothing is sent)",
    )
    explain_cmd.add_argument(
        "-H",
        "--header",
        action="append",
        metavar="'NAME: VALUE'",
        help="a request header for --http (repeatable; host: replaces the destination)",
    )
    explain_cmd.set_defaults(fn=_cmd_explain)
    ap = _command(
        sub,
        "apply",
        "apply policies, routes and waypoint Gateways (YAML) to a running cluster",
        "ambientctl apply -f policy.yaml --wait",
        "kubectl kustomize . | ambientctl apply -f - --dry-run",
    )
    context.add_cluster_arg(ap)
    ap.add_argument("-f", "--filename", required=True, help="YAML file, or - for stdin")
    ap.add_argument("-n", "--namespace", help="the namespace of documents that name none")
    ap.add_argument("--node", help="where a new waypoint Gateway's pod runs (default: 1st node)")
    _change_options(ap)
    ap.set_defaults(fn=_cmd_apply)
    rm = _command(
        sub,
        "delete",
        "delete policies, routes, waypoints from a running cluster",
        "ambientctl delete -f policy.yaml",
        "ambientctl delete ap deny-all -n travel",
        "ambientctl delete hr travel/reviews --wait",
    )
    context.add_cluster_arg(rm, then=(("kind", "?"), ("name", "?")))
    rm.add_argument("kind", nargs="?", help="ap, pa, ra, hr, grpcroute, vs, dr, se, gw (or long)")
    rm.add_argument("name", nargs="?", help="[<namespace>/]<name>")
    rm.add_argument("-f", "--filename", help="delete what this YAML file names (- for stdin)")
    rm.add_argument("-n", "--namespace", help="the namespace of NAME (default: default)")
    _change_options(rm)
    rm.set_defaults(fn=_cmd_delete)
    _waypoint_parser(sub)
    rt = _command(
        sub,
        "routes",
        "each service's routes (HTTPRoute, GRPCRoute, ...)",
        "ambientctl routes -n travel",
        "ambientctl routes -A -o json",
    )
    context.add_cluster_arg(rt)
    _namespace_options(rt, required=False)
    rt.add_argument(
        "-o", "--output", choices=("table", "json"), default="table", help="table or json"
    )
    rt.set_defaults(fn=_cmd_routes)
    demo = _command(sub, "demo", "the travel-booking demo, end to end", "ambientctl demo")
    demo.set_defaults(fn=_cmd_demo)
    dashboard.register(sub)
    logs.register(sub)
    metricsview.register(sub)
    completion.register(sub, p)  # last: the script covers every command registered before
    return p


KUBE_CAPABLE = (*kubecmds.COMMANDS, "waypoint", "get")


def _kube_target(args: argparse.Namespace) -> KubeTarget | None:
    """The Kubernetes cluster the command is for (its handler then is `kubecmds`'), or None
    for a local cluster (`context.kube_target` decides)."""
    context.settle(args)  # idempotent: main has settled them already
    kubeconfig, kube_context = args.kubeconfig, args.context
    if getattr(args, "no_cluster", False):
        return None  # use, clusters, completion: they read their own flags
    if args.cmd not in KUBE_CAPABLE:
        if kubeconfig is not None or kube_context is not None:
            raise KubeUsage(
                f"{args.cmd} works on a local cluster (its file), not with --kubeconfig/--context"
            )
        return None
    target = context.kube_target(args, os.environ)
    if target is not None:
        # What a handler reads to reach the cluster (`get pods` is given args alone).
        args.kubeconfig, args.context = str(target.kubeconfig), target.context
        if hasattr(args, "kube_fn"):
            fn = args.kube_fn
        elif args.cmd == "waypoint":
            fn = kubecmds.WAYPOINT_COMMANDS[args.waypoint_cmd]
        else:
            fn = kubecmds.COMMANDS[args.cmd]
        args.fn = lambda a: fn(target, a)
    return target


def _prog(args: argparse.Namespace) -> str:
    prog = f"ambientctl {args.cmd}"
    if args.cmd == "waypoint":
        prog += f" {args.waypoint_cmd}"
    return prog


def _run(args: argparse.Namespace) -> int:
    """One command; every error it can run into becomes a message and an exit code."""
    prog = _prog(args)
    try:
        rc: int = args.fn(args)
    except (UsageError, KubeUsage, context.NoCluster) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (NotFound, Refused, context.NeedsRoot, *EXPECTED) as e:
        print(f"{prog}: {_message(e)}", file=sys.stderr)
        return EXIT_RUNTIME
    except Exception as e:  # a bug: still a message, the traceback only on request
        if os.environ.get(DEBUG_ENV) == "1":
            traceback.print_exc()
        print(
            f"{prog}: unexpected error: {type(e).__name__}: {e} "
            f"(set {DEBUG_ENV}=1 for the traceback)",
            file=sys.stderr,
        )
        return EXIT_RUNTIME
    return rc


def _message(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        where = f" ({e.filename})" if e.filename else ""
        return f"{e.strerror}{where}"
    return str(e)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if any(e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        # Positionals after an option (`get ap -n NS NAME`), a cluster file or not.
        extra = context.settle(args, extra)
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as e:  # argparse printed the usage error (or --help)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    try:
        target = _kube_target(args)
    except (KubeUsage, context.NoCluster) as e:
        print(f"{_prog(args)}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except StateError as e:  # the remembered current cluster cannot be read
        print(f"{_prog(args)}: {e}", file=sys.stderr)
        return EXIT_RUNTIME
    # The commands that build or remove a cluster need root from the start; the others ask
    # for it once they reach a running cluster (context.attach).
    if target is None and args.cmd in ("up", "down", "demo") and os.geteuid() != 0:
        print(f"ambientctl: {context.NEEDS_ROOT}", file=sys.stderr)
        return EXIT_RUNTIME
    command: Callable[[], int] = lambda: _run(args)  # noqa: E731
    if args.cmd in ("up", "demo"):
        # These build a cluster: a signal tears down what this run built, and says so.
        return run_interruptible(command, "ambientctl")
    try:
        return command()
    except KeyboardInterrupt:
        print("ambientctl: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
