"""`ambientctl get KIND [NAME]` and `describe KIND NAME`, as kubectl has them, for every
kind the mesh knows (`ambientctl.kinds`). This module reads the cluster (the mesh config in
force, the cluster file's objects with the labels in force, the tunnels' admin ports);
`resourceviews` renders. `get pods` is `ambientctl.pods`'.
"""

from __future__ import annotations

import argparse
import importlib
import json
from collections.abc import Mapping
from typing import Any

import yaml

from ambientctl import context, tables, views, waypoint_views
from ambientctl import resourceviews as rv
from ambientctl.errors import NotFound, UsageError
from ambientctl.kinds import KindInfo, UnknownKind, all_names, resolve
from ambientctl.kubefetch import KubeTarget
from ambientctl.kubeviews import ISTIO_NAMESPACE
from localcluster import gateways as gw
from localcluster import mesh
from localcluster.xds import RESOURCES_KEY, service_binding
from meshcore.defaults import ADMIN_PORT, NAMESPACE
from meshcore.discovery import parse_local_config
from waypoint.l7config import ROUTE_KINDS

OUTPUTS = ("table", "wide", "json", "yaml")

GET_EPILOG = """\
kinds: {kinds}

examples:
  ambientctl use travel                       # then no cluster argument is needed
  ambientctl get ap -n travel                 # AuthorizationPolicies of a namespace
  ambientctl get hr -A -o wide                # every HTTPRoute, with its rule count
  ambientctl get svc reviews -n travel -o yaml
  ambientctl get ns --show-labels
  ambientctl get pods -A -o wide              # node, IP, mesh state, netns
  ambientctl get ap travel/deny-all --cluster other
"""

DESCRIBE_EPILOG = """\
examples:
  ambientctl describe svc travel/reviews
  ambientctl describe httproute reviews -n travel   # the conditions the waypoints compute
  ambientctl describe node n1                       # tunnel, config in force, agent's pods
  ambientctl describe waypoint waypoint -n travel
"""


def _kube_flags(p: argparse.ArgumentParser) -> None:
    """After the subcommand too (SUPPRESS: the global one stays when not given here)."""
    p.add_argument(
        "--kubeconfig", default=argparse.SUPPRESS, help="a Kubernetes cluster's kubeconfig"
    )
    p.add_argument("--context", default=argparse.SUPPRESS, help="the kubeconfig context to use")
    p.add_argument(
        "--istio-namespace",
        default=ISTIO_NAMESPACE,
        help="Kubernetes: where the mesh is installed (default istio-system)",
    )


def register(sub: Any) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    get = sub.add_parser(
        "get",
        help="list resources of a kind, as kubectl get",
        description="List resources of a kind (the cluster's, as the mesh has them now).",
        epilog=GET_EPILOG.format(kinds=", ".join(all_names())),
        formatter_class=fmt,
    )
    context.add_cluster_arg(get, then=(("kind", "1"), ("name", "?")))
    get.add_argument("kind", help="the kind: a plural, singular or short name (ap, svc, ...)")
    get.add_argument("name", nargs="?", help="only this one: NAME or NAMESPACE/NAME")
    _list_options(get)
    get.set_defaults(fn=run_get, kube_fn=kube_get)
    de = sub.add_parser(
        "describe",
        help="show one resource in detail, as kubectl describe",
        description="Show one resource in detail, with what the mesh makes of it.",
        epilog=DESCRIBE_EPILOG,
        formatter_class=fmt,
    )
    context.add_cluster_arg(de, then=(("kind", "1"), ("name", "1")))
    de.add_argument("kind", help="the kind: a plural, singular or short name (ap, svc, ...)")
    de.add_argument("name", help="NAME (with -n) or NAMESPACE/NAME")
    de.add_argument("-n", "--namespace", help="the namespace (default: the current one)")
    _kube_flags(de)
    de.set_defaults(fn=run_describe)


def _list_options(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "-n", "--namespace", help="the namespace (default: the current context's, else default)"
    )
    group.add_argument("-A", "--all-namespaces", action="store_true", help="every namespace")
    p.add_argument(
        "-o", "--output", choices=OUTPUTS, default="table", help="table (default), wide, json, yaml"
    )
    p.add_argument("--show-labels", action="store_true", help="add a LABELS column")
    _kube_flags(p)


# ---- which objects --------------------------------------------------------------------------


def _kind(args: argparse.Namespace) -> KindInfo:
    try:
        return resolve(args.kind)
    except UnknownKind as e:
        raise UsageError(str(e)) from None


def _scope(args: argparse.Namespace, kind: KindInfo) -> tuple[str | None, str | None]:
    """(namespace, or None for all; name, or None for all). NAME may be NAMESPACE/NAME."""
    name = args.name
    ns: str | None = None
    if name is not None and "/" in name:
        ns, _, name = name.rpartition("/")
        if not ns or not name or "/" in ns:
            raise UsageError(f"{args.name!r}: expected NAME or NAMESPACE/NAME")
        if getattr(args, "namespace", None) and args.namespace != ns:
            raise UsageError(f"{args.name!r} is in namespace {ns}, not {args.namespace}")
    if not kind.namespaced:
        return None, name
    if ns is None and not getattr(args, "all_namespaces", False):
        ns = context.namespace(args, NAMESPACE)
    return ns, name


def _getter(cluster: mesh.Cluster) -> views.Getter:
    def get(node: str, path: str) -> tuple[int, bytes]:
        return mesh.node_http(cluster.layout, node, ADMIN_PORT, path)

    return get


def _config(cluster: mesh.Cluster) -> dict[str, Any]:
    """The mesh config every proxy reads now (what is in force)."""
    doc = yaml.safe_load(cluster.paths.xds.read_text(encoding="utf-8"))
    return doc if isinstance(doc, dict) else {}


def _documents(cluster: mesh.Cluster, kind: str) -> list[dict[str, Any]]:
    config = _config(cluster)
    docs = [*(config.get("policies") or ()), *(config.get(RESOURCES_KEY) or ())]
    return [d for d in docs if isinstance(d, dict) and d.get("kind") == kind]


def _dump(cluster: mesh.Cluster) -> dict[str, Any] | None:
    """One tunnel's config dump (the mesh config is the same on each), or None when no
    tunnel answers: the views then show what the records say alone."""
    for n in cluster.spec.nodes:
        try:
            doc = views.fetch(_getter(cluster), n.name, "/config_dump")
        except views.ViewError:
            continue
        if isinstance(doc, dict):
            return doc
    return None


def _route_status(cluster: mesh.Cluster) -> dict[tuple[str, str, str], Any]:
    """(kind, ns, name) -> the conditions the waypoints compute (as `routes` shows)."""
    state = parse_local_config(cluster.paths.xds.read_text(encoding="utf-8"))
    spec = mesh.current_spec(cluster)
    documents = [r.document() for kind in ROUTE_KINDS for r in state.resources(kind)]
    gateways = [g.key for g in gw.sorted_gateways(spec.gateways)]
    return waypoint_views.waypoint_statuses(documents, state.services, gateways)


def _status_cells(cluster: mesh.Cluster, kind: str) -> dict[tuple[str, str], str]:
    if kind in ROUTE_KINDS:
        return {
            (ns, name): waypoint_views.status_text(c)
            for (k, ns, name), c in _route_status(cluster).items()
            if k == kind
        }
    if kind == gw.GATEWAY_KIND:
        return {
            (g.namespace, g.name): f"{g.placement.vip if g.placement else '-'} {r.ready}"
            for g, r in mesh.waypoint_status(cluster)
        }
    return {}


def _records(cluster: mesh.Cluster, kind: KindInfo) -> list[dict[str, Any]]:
    """The objects of a kind that is not a document, as records (what -o json prints)."""
    spec = mesh.current_spec(cluster)
    if kind.kind == "Namespace":
        return [{"name": n.name, "labels": dict(n.labels)} for n in spec.namespaces]
    if kind.kind == "Node":
        out = []
        for n in spec.nodes:
            status = mesh.tunnel_status(cluster.layout, n.name)
            config = (status or {}).get("config") or {}
            out.append(
                {
                    "name": n.name,
                    "ip": str(n.ip),
                    "podCIDR": str(n.pod_cidr),
                    "ready": bool(status and status.get("ready")),
                    "config": config.get("digest") if isinstance(config, dict) else None,
                    "pods": len(spec.pods_on(n.name)),
                }
            )
        return out
    dump = _dump(cluster)
    if kind.kind == "Workload":
        if dump is None:
            raise views.ViewError("no tunnel answers: the workloads are the tunnels' view")
        return views.collect_workloads({"any": dump})
    # Service
    services = {(s.get("namespace"), s.get("name")): s for s in _dicts(dump, "services")}
    workloads = _dicts(dump, "workloads")
    out = []
    for svc in spec.all_services():
        binding = service_binding(spec, svc).waypoint
        seen = services.get((svc.namespace, svc.name))
        out.append(
            {
                "namespace": svc.namespace,
                "name": svc.name,
                "clusterIP": str(svc.vip),
                "ports": [
                    {"port": p.port, "targetPort": p.target_port, "name": p.name} for p in svc.ports
                ],
                "selector": dict(svc.selector),
                "labels": dict(svc.labels),
                "waypoint": f"{binding.namespace}/{binding.name}" if binding else None,
                "endpoints": rv.healthy_endpoints(seen, workloads) if seen else "-",
                "pods": [f"{p.namespace}/{p.name}" for p in spec.endpoints(svc)],
            }
        )
    return out


def _dicts(doc: Mapping[str, Any] | None, key: str) -> list[dict[str, Any]]:
    items = (doc or {}).get(key)
    return [i for i in items if isinstance(i, dict)] if isinstance(items, list) else []


def _in_scope(ns: str | None, name: str | None, obj_ns: str, obj_name: str) -> bool:
    return (ns is None or ns == obj_ns) and (name is None or name == obj_name)


def _not_found(kind: KindInfo, ns: str | None, name: str, cluster: mesh.Cluster) -> NotFound:
    where = f"{ns}/{name}" if ns else name
    return NotFound(f"no {kind.kind} {where} in cluster {cluster.spec.name}")


def _get_pods(args: argparse.Namespace) -> int:
    """`get pods` is `ambientctl.pods.run_get_pods`, imported only when asked for."""
    try:
        pods = importlib.import_module("ambientctl.pods")
    except ModuleNotFoundError:
        raise UsageError("get pods is not part of this ambientctl") from None
    return int(pods.run_get_pods(args))


# ---- get ------------------------------------------------------------------------------------


def run_get(args: argparse.Namespace) -> int:
    kind = _kind(args)
    if kind.kind == "Pod":
        return _get_pods(args)
    if kind.kind == "Cluster":
        from ambientctl import contextcmds

        return contextcmds.print_clusters(args)
    ns, name = _scope(args, kind)
    cluster = context.attach(args)
    text = get_text(cluster, kind, ns, name, args)
    print(text, end="")
    return 0


def get_text(
    cluster: mesh.Cluster,
    kind: KindInfo,
    ns: str | None,
    name: str | None,
    args: argparse.Namespace,
) -> str:
    output, wide = args.output, args.output == "wide"
    with_ns = kind.namespaced and ns is None
    empty = rv.empty_message(ns if kind.namespaced else None)
    if kind.kind == "Waypoint":
        found = [(g, r) for g, r in mesh.waypoint_status(cluster) if _in_scope(ns, name, *g.key)]
        if name is not None and not found:
            raise _not_found(kind, ns, name, cluster)
        if output in ("json", "yaml"):
            return rv.dump(json.loads(waypoint_views.as_json_list(found)), output)
        return waypoint_views.render_list(found, with_ns) if found else empty + "\n"
    if kind.is_document:
        docs = [d for d in _documents(cluster, kind.kind) if _in_scope(ns, name, *_doc_key(d))]
        if name is not None and not docs:
            raise _not_found(kind, ns, name, cluster)
        if output in ("json", "yaml"):
            return rv.dump(docs[0] if name is not None else rv.as_list(docs), output)
        columns, _ = rv.DOCUMENT_COLUMNS[kind.kind]
        rows = rv.document_rows(kind.kind, docs, _status_cells(cluster, kind.kind))
    else:
        records = [
            r
            for r in _records(cluster, kind)
            if _in_scope(ns, name, str(r.get("namespace", "")) if ns else "", str(r["name"]))
        ]
        if name is not None and not records:
            raise _not_found(kind, ns, name, cluster)
        if output in ("json", "yaml"):
            return rv.dump(records[0] if name is not None else records, output)
        columns, rows = _record_rows(kind, records)
    return rv.render(
        columns, rows, with_namespace=with_ns, wide=wide, show_labels=args.show_labels, empty=empty
    )


def _doc_key(doc: Mapping[str, Any]) -> tuple[str, str]:
    m = rv.meta(doc)
    return str(m.get("namespace") or NAMESPACE), str(m.get("name"))


def _record_rows(kind: KindInfo, records: list[dict[str, Any]]) -> tuple[rv.Columns, list[rv.Row]]:
    if kind.kind == "Namespace":
        return rv.NAMESPACE_COLUMNS, rv.namespace_rows(records)
    if kind.kind == "Node":
        return rv.NODE_COLUMNS, rv.node_rows(records)
    if kind.kind == "Workload":
        return rv.WORKLOAD_COLUMNS, rv.workload_rows(records)
    return rv.SERVICE_COLUMNS, rv.service_rows(records)


def kube_get(target: KubeTarget, args: argparse.Namespace) -> int:
    """On a Kubernetes cluster (`ambientctl.kubeget`); pods are `ambientctl.pods`'."""
    kind = _kind(args)
    if kind.kind == "Pod":
        return _get_pods(args)
    if kind.kind == "Cluster":
        from ambientctl import contextcmds

        return contextcmds.print_clusters(args)
    from ambientctl import kubeget

    return kubeget.get(target, args, kind)


# ---- describe -------------------------------------------------------------------------------


def run_describe(args: argparse.Namespace) -> int:
    kind = _kind(args)
    if kind.kind == "Pod":
        return int(importlib.import_module("ambientctl.pods").run_describe_pod(args))
    if kind.kind == "Cluster":
        raise UsageError(f"describe {kind.plural}: see `ambientctl get {kind.plural} NAME -o yaml`")
    ns, name = _scope(args, kind)
    assert name is not None
    cluster = context.attach(args)
    print(describe_text(cluster, kind, ns, name), end="")
    return 0


def describe_text(cluster: mesh.Cluster, kind: KindInfo, ns: str | None, name: str) -> str:
    if kind.kind == "Waypoint":
        found = [(g, r) for g, r in mesh.waypoint_status(cluster) if (ns, name) == g.key]
        if not found:
            raise _not_found(kind, ns, name, cluster)
        g, r = found[0]
        return rv.describe(
            [
                ("Name", g.name),
                ("Namespace", g.namespace),
                ("For", g.waypoint_for),
                ("Address", str(g.placement.vip) if g.placement else None),
                ("Hostname", g.hostname),
                ("Node", g.placement.node if g.placement else None),
                ("Pod", f"{g.namespace}/{g.pod_name}"),
                ("Fail Open", "yes" if g.fail_open else "no"),
                ("Programmed", "True" if r.ready else "False"),
                ("Reason", r.reason),
                ("Message", r.message),
            ]
        )
    if kind.is_document:
        docs = [d for d in _documents(cluster, kind.kind) if _doc_key(d) == (ns, name)]
        if not docs:
            raise _not_found(kind, ns, name, cluster)
        status: Any = None
        if kind.kind in ROUTE_KINDS:
            conditions = _route_status(cluster).get((kind.kind, str(ns), name), ())
            status = [
                {
                    "type": c.type,
                    "status": "True" if c.status else "False",
                    "reason": c.reason,
                    "message": c.message,
                    **({"parent": c.parent} if c.parent else {}),
                }
                for c in conditions
            ]
        elif kind.kind == gw.GATEWAY_KIND:
            for g, r in mesh.waypoint_status(cluster, ns):
                if g.name == name:
                    status = gw.status(g, r)
        return rv.describe_document(docs[0], status)
    records = [
        r
        for r in _records(cluster, kind)
        if r["name"] == name and (not kind.namespaced or r.get("namespace") == ns)
    ]
    if not records:
        raise _not_found(kind, ns, name, cluster)
    return rv.describe(_record_pairs(kind, records[0]))


def _record_pairs(kind: KindInfo, r: Mapping[str, Any]) -> list[tuple[str, Any]]:
    if kind.kind == "Service":
        return [
            ("Name", r["name"]),
            ("Namespace", r["namespace"]),
            ("Labels", tables.labels_text(r["labels"])),
            ("Selector", tables.labels_text(r["selector"])),
            ("IP", r["clusterIP"]),
            ("Ports", r["ports"]),
            ("Waypoint", r["waypoint"] or "None"),
            ("Endpoints", f"{r['endpoints']} healthy"),
            ("Pods", r["pods"]),
        ]
    if kind.kind == "Namespace":
        return [
            ("Name", r["name"]),
            ("Labels", tables.labels_text(r["labels"])),
            ("Status", "Active"),
        ]
    if kind.kind == "Node":
        return [
            ("Name", r["name"]),
            ("Internal IP", r["ip"]),
            ("Pod CIDR", r["podCIDR"]),
            ("Tunnel", "Ready" if r["ready"] else "NotReady"),
            ("Mesh Config", r["config"]),
            ("Pods", r["pods"]),
        ]
    return [(str(k)[:1].upper() + str(k)[1:], v) for k, v in r.items()]
