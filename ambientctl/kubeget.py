"""`ambientctl get` on a Kubernetes cluster: the mesh's resources as the API server has
them (policies, routes, Istio networking, Gateways, namespaces), in the same tables as a
local cluster's (`resourceviews`); workloads and services as the mesh computes them
(`kubecmds`); pods are `ambientctl.pods`'."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any

from ambientctl import context, kubecmds
from ambientctl import kubefetch as kf
from ambientctl import resourceviews as rv
from ambientctl.errors import NotFound
from ambientctl.kinds import KindInfo
from ambientctl.kubefetch import KubeTarget, KubeUsage
from ambientctl.waypoint_views import route_status
from kube import kinds
from kube.client import KubeClient
from kube.kinds import Kind
from meshcore.defaults import NAMESPACE

API_KINDS: dict[str, Kind] = {
    "AuthorizationPolicy": kinds.AUTHORIZATION_POLICY,
    "PeerAuthentication": kinds.PEER_AUTHENTICATION,
    "RequestAuthentication": kinds.REQUEST_AUTHENTICATION,
    "HTTPRoute": kinds.HTTP_ROUTE,
    "GRPCRoute": kinds.GRPC_ROUTE,
    "VirtualService": kinds.VIRTUAL_SERVICE,
    "DestinationRule": kinds.DESTINATION_RULE,
    "ServiceEntry": kinds.SERVICE_ENTRY,
    "Gateway": kinds.GATEWAY,
    "Namespace": kinds.NAMESPACE,
}
COMPUTED = {"Workload": kubecmds.workloads, "Service": kubecmds.services}


def _condition(doc: Mapping[str, Any], kind: str) -> str | None:
    status = doc.get("status") if isinstance(doc.get("status"), Mapping) else {}
    assert isinstance(status, Mapping)
    for c in status.get("conditions") or ():
        if isinstance(c, Mapping) and c.get("type") == kind:
            return str(c.get("status"))
    return None


def status_cells(kind: str, docs: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], str]:
    """The STATUS cells from the objects' own status (what the control plane wrote). Pure."""
    out: dict[tuple[str, str], str] = {}
    for doc in docs:
        m = rv.meta(doc)
        key = (str(m.get("namespace") or NAMESPACE), str(m.get("name")))
        if kind == "Gateway":
            status = doc.get("status") if isinstance(doc.get("status"), Mapping) else {}
            assert isinstance(status, Mapping)
            addresses = [
                a.get("value") for a in status.get("addresses") or () if isinstance(a, Mapping)
            ]
            address = str(addresses[0]) if addresses else "-"
            out[key] = f"{address} {_condition(doc, 'Programmed') or 'Unknown'}"
        else:
            out[key] = route_status(doc)
    return out


def get(target: KubeTarget, args: argparse.Namespace, kind: KindInfo) -> int:
    if kind.kind in COMPUTED:
        args.node = None
        if args.output in ("wide", "yaml"):
            raise KubeUsage(
                f"-o {args.output}: {kind.plural} of a Kubernetes cluster are table or json"
            )
        if args.all_namespaces:
            args.namespace = None
        return COMPUTED[kind.kind](target, args)
    if kind.kind == "Waypoint":
        if args.namespace is None and not args.all_namespaces:
            args.namespace = context.namespace(args, NAMESPACE)
        return kubecmds.waypoint_list(target, args)
    api = API_KINDS.get(kind.kind)
    if api is None:
        raise KubeUsage(f"on a Kubernetes cluster, `kubectl get {kind.plural}` lists them")
    ns: str | None = None
    if kind.namespaced and not args.all_namespaces:
        ns = context.namespace(args, NAMESPACE)
    name = args.name
    if name is not None and "/" in name:
        ns, _, name = name.rpartition("/")

    async def work(c: KubeClient) -> list[dict[str, Any]]:
        return await kf.items(c, api, ns)

    docs = [d for d in kf.run(target, work) if name is None or rv.meta(d).get("name") == name]
    if name is not None and not docs:
        raise NotFound(f"no {kind.kind} {f'{ns}/' if ns else ''}{name} in {target.describe()}")
    if args.output in ("json", "yaml"):
        print(rv.dump(docs[0] if name is not None else rv.as_list(docs), args.output), end="")
        return 0
    if kind.kind == "Namespace":
        records = [
            {"name": rv.meta(d).get("name"), "labels": rv.meta(d).get("labels") or {}} for d in docs
        ]
        columns, rows = rv.NAMESPACE_COLUMNS, rv.namespace_rows(records)
    else:
        columns, _ = rv.DOCUMENT_COLUMNS[kind.kind]
        rows = rv.document_rows(kind.kind, docs, status_cells(kind.kind, docs))
    print(
        rv.render(
            columns,
            rows,
            with_namespace=kind.namespaced and ns is None,
            wide=args.output == "wide",
            show_labels=args.show_labels,
            empty=rv.empty_message(ns if kind.namespaced else None),
        ),
        end="",
    )
    return 0
