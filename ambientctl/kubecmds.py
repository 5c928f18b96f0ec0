"""The commands that also work against a Kubernetes cluster (`--kubeconfig`, `--context`):
status, workloads, services, policies, explain and waypoint apply/list/status/delete, as
istioctl answers them. Each returns its exit code; the views are `ambientctl.kubeviews`.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from ambientctl import kubefetch as kf
from ambientctl import kubeviews as kv
from ambientctl import views
from ambientctl.kubefetch import KubeTarget, KubeUsage
from kube.client import KubeClient
from waypoint import explain as wx

EXIT_RUNTIME = 1
WAIT_POLL = 0.5


def _istio_ns(args: argparse.Namespace) -> str:
    return str(getattr(args, "istio_namespace", None) or kv.ISTIO_NAMESPACE)


def _snapshot(target: KubeTarget, args: argparse.Namespace, mesh: bool = True) -> kv.Snapshot:
    async def work(c: KubeClient) -> kv.Snapshot:
        return await kf.snapshot(c, _istio_ns(args), mesh=mesh)

    return kf.run(target, work)


def _no_node(args: argparse.Namespace) -> None:
    if getattr(args, "node", None) is not None:
        raise KubeUsage("--node goes with a local cluster (here the views are computed)")


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(views.as_json(data) if args.output == "json" else text, end="")


def status(target: KubeTarget, args: argparse.Namespace) -> int:
    """The mesh's components: istiod, the ztunnel and node-agent DaemonSets per node, and the
    ambient namespaces. Exit 1 unless every component shown is ready."""
    st = kv.status(_snapshot(target, args, mesh=False))
    _emit(args, st.to_json(), kv.render_status(st))
    for p in st.problems:
        print(f"ambientctl status: {p}", file=sys.stderr)
    return 0 if not st.problems else EXIT_RUNTIME


def workloads(target: KubeTarget, args: argparse.Namespace) -> int:
    _no_node(args)
    snap = _snapshot(target, args)
    rows = kv.workloads(snap, kv.compute_mesh(snap), args.namespace)
    _emit(args, [r.to_json() for r in rows], kv.render_workloads(rows))
    return 0


def services(target: KubeTarget, args: argparse.Namespace) -> int:
    _no_node(args)
    snap = _snapshot(target, args)
    dump = kv.tunnel_dump(kv.compute_mesh(snap))
    data = views.collect_services({"cluster": dump})
    if args.namespace is not None:
        data["services"] = [s for s in data["services"] if s.get("namespace") == args.namespace]
    _emit(args, data, views.render_services(data))
    return 0


def policies(target: KubeTarget, args: argparse.Namespace) -> int:
    _no_node(args)
    snap = _snapshot(target, args)
    data = kv.policies(kv.compute_mesh(snap), args.namespace)
    _emit(args, data, kv.render_policies(data))
    return 0


def explain(target: KubeTarget, args: argparse.Namespace) -> int:
    """The tunnel's explain on the computed mesh config; with --http, also the waypoint's
    decision for that request (its own functions, as for a local cluster)."""
    _no_node(args)
    if args.header and args.http is None:
        raise KubeUsage("-H/--header goes with --http")
    snap = _snapshot(target, args)
    mesh = kv.compute_mesh(snap)
    default_ns = args.namespace or kv.DEFAULT_NAMESPACE
    doc = kv.explain(snap, mesh, args.source, args.destination, default_ns)
    if args.http is None:
        _emit(args, doc, kv.render_explain_kube(doc))
        return 0
    try:
        authority = kv.default_authority(args.destination, doc)
        probe = wx.parse_probe(args.http, args.header or [], authority)
    except wx.ExplainError as e:
        raise KubeUsage(str(e)) from None
    request = views.probe_request(probe)
    hop = views.waypoint_hop(doc)
    if isinstance(hop, str):
        http = views.no_waypoint(request, hop)
    else:
        src = str(doc["source"]["workload"])
        source = next((w for w in mesh.state.workloads if f"{w.namespace}/{w.name}" == src), None)
        gateway = kv.waypoint_gateway(snap, mesh, hop[0])
        network = source.network if source is not None else ""
        http = wx.explain_request(mesh.state, gateway, hop[1], probe, source, network).to_json()
    if args.output == "json":
        print(views.as_json({**doc, "http": http}), end="")
    else:
        print(kv.render_explain_kube(doc) + views.render_http(http), end="")
    return 0


# ---- waypoints -------------------------------------------------------------------------------


def _waypoints(target: KubeTarget, namespace: str | None) -> tuple[list[kv.WaypointRow], bool]:
    """The waypoint rows of `namespace` (None: all), and whether the namespace exists."""

    async def work(c: KubeClient) -> tuple[list[kv.WaypointRow], bool]:
        if namespace is not None and not await kf.namespace_exists(c, namespace):
            return [], False
        gateways, deployments = await kf.waypoint_objects(c, namespace)
        return kv.waypoint_rows(gateways, deployments), True

    return kf.run(target, work)


def _require_namespace(exists: bool, namespace: str) -> None:
    if not exists:
        raise views.ViewError(f"no namespace {namespace!r} in the cluster")


def waypoint_apply(target: KubeTarget, args: argparse.Namespace) -> int:
    """`istioctl waypoint apply`: the Gateway (server-side apply); with --enroll-namespace
    the namespace's `istio.io/use-waypoint` label; with --wait, until it is ready."""
    if args.node is not None:
        raise KubeUsage("--node goes with a local cluster (the scheduler places the waypoint)")
    doc = kv.waypoint_resource(args.name, args.namespace, args.waypoint_for)

    async def work(c: KubeClient) -> None:
        if not await kf.namespace_exists(c, args.namespace):
            raise views.ViewError(f"no namespace {args.namespace!r} in the cluster")
        await kf.apply_gateway(c, doc)
        if args.enroll_namespace:
            await kf.label_namespace(c, args.namespace, kv.USE_WAYPOINT_LABEL, args.name)

    kf.run(target, work)
    print(f"waypoint {args.namespace}/{args.name} applied")
    if args.enroll_namespace:
        print(f"namespace {args.namespace} labeled with {kv.USE_WAYPOINT_LABEL}={args.name}")
    if not args.wait:
        return 0
    deadline = time.monotonic() + args.timeout
    while True:
        rows, _ = _waypoints(target, args.namespace)
        row = next((r for r in rows if r.name == args.name), None)
        if row is not None and row.ready:
            print(f"waypoint {args.namespace}/{args.name} is ready")
            return 0
        if time.monotonic() >= deadline:
            why = f"{row.reason}: {row.message}" if row is not None else "it is gone"
            print(
                f"ambientctl waypoint apply: waypoint {args.namespace}/{args.name} is not "
                f"ready after {args.timeout:g} s ({why})",
                file=sys.stderr,
            )
            return EXIT_RUNTIME
        time.sleep(WAIT_POLL)


def waypoint_list(target: KubeTarget, args: argparse.Namespace) -> int:
    namespace = None if args.all_namespaces else args.namespace
    rows, exists = _waypoints(target, namespace)
    if namespace is not None:
        _require_namespace(exists, namespace)
    _emit(args, [r.to_json() for r in rows], kv.render_waypoint_list(rows, args.all_namespaces))
    return 0


def waypoint_status(target: KubeTarget, args: argparse.Namespace) -> int:
    """The Gateway's Programmed condition and its Deployment's readiness; exit 1 unless
    every waypoint asked about is ready."""
    rows, exists = _waypoints(target, args.namespace)
    _require_namespace(exists, args.namespace)
    if args.name is not None:
        rows = [r for r in rows if r.name == args.name]
        if not rows:
            raise views.ViewError(f"no waypoint {args.namespace}/{args.name}")
    elif not rows:
        raise views.ViewError(f"no waypoint in namespace {args.namespace}")
    print(kv.render_waypoint_status(rows), end="")
    return 0 if all(r.ready for r in rows) else EXIT_RUNTIME


def waypoint_delete(target: KubeTarget, args: argparse.Namespace) -> int:
    if bool(args.names) == bool(args.all):
        raise KubeUsage("give the waypoint NAME(s), or --all")

    async def work(c: KubeClient) -> list[tuple[str, bool]]:
        if not await kf.namespace_exists(c, args.namespace):
            raise views.ViewError(f"no namespace {args.namespace!r} in the cluster")
        names = list(args.names)
        if args.all:
            gateways, _ = await kf.waypoint_objects(c, args.namespace)
            names = [str(g["metadata"]["name"]) for g in gateways if kv.is_waypoint(g)]
        return [(n, await kf.delete_gateway(c, args.namespace, n)) for n in names]

    done = kf.run(target, work)
    if not done:
        print(f"no waypoint in namespace {args.namespace}")
    missing = [n for n, found in done if not found]
    for name, found in done:
        if found:
            print(f"waypoint {args.namespace}/{name} deleted")
    if missing:
        raise views.ViewError(f"no waypoint {', '.join(f'{args.namespace}/{n}' for n in missing)}")
    return 0


COMMANDS = {
    "status": status,
    "workloads": workloads,
    "services": services,
    "policies": policies,
    "explain": explain,
}
WAYPOINT_COMMANDS = {
    "apply": waypoint_apply,
    "list": waypoint_list,
    "status": waypoint_status,
    "delete": waypoint_delete,
}
