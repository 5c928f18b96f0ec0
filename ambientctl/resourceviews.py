"""`get` and `describe` as kubectl prints them, for every kind the mesh knows. Pure: records
in (resource documents, the cluster file's objects, the tunnels' dumps), text out.

A row is (namespace, name, the kind's columns, its `-o wide` columns, labels); `render`
adds NAMESPACE first with -A and LABELS last with --show-labels, as kubectl does.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from ambientctl import tables

MISSING = "<none>"


@dataclass(frozen=True, slots=True)
class Row:
    namespace: str  # "" for a kind that is not namespaced
    name: str
    cells: tuple[str, ...]
    wide: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Columns:
    headers: tuple[str, ...]
    wide: tuple[str, ...] = ()


def render(
    columns: Columns,
    rows: Sequence[Row],
    *,
    with_namespace: bool,
    wide: bool = False,
    show_labels: bool = False,
    empty: str = tables.NO_RESOURCES,
) -> str:
    headers = ["NAME", *columns.headers]
    if wide:
        headers += columns.wide
    if with_namespace:
        headers.insert(0, "NAMESPACE")
    if show_labels:
        headers.append("LABELS")
    out = []
    for r in sorted(rows, key=lambda r: (r.namespace, r.name)):
        cells = [r.name, *r.cells]
        if wide:
            cells += r.wide
        if with_namespace:
            cells.insert(0, r.namespace)
        if show_labels:
            cells.append(tables.labels_text(dict(r.labels)))
        out.append(cells)
    return tables.render(headers, out, empty=empty)


def empty_message(namespace: str | None) -> str:
    """kubectl's line for no rows: it names the namespace it looked in."""
    if namespace is None:
        return tables.NO_RESOURCES
    return f"No resources found in {namespace} namespace."


# ---- small helpers ------------------------------------------------------------------------


def _d(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _l(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _join(values: Sequence[Any]) -> str:
    return ",".join(str(v) for v in values) if values else MISSING


def meta(doc: Mapping[str, Any]) -> dict[str, Any]:
    return _d(doc.get("metadata"))


def spec_of(doc: Mapping[str, Any]) -> dict[str, Any]:
    return _d(doc.get("spec"))


def _selector(spec: Mapping[str, Any]) -> str:
    """What a policy applies to: its selector's labels, its targetRefs, or <none> (the
    whole namespace)."""
    labels = _d(_d(spec.get("selector")).get("matchLabels"))
    if labels:
        return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
    refs = [_d(r) for r in [*_l(spec.get("targetRefs")), spec.get("targetRef")] if r]
    if refs:
        return ",".join(f"{r.get('kind')}/{r.get('name')}" for r in refs)
    return MISSING


def _parents(spec: Mapping[str, Any]) -> str:
    refs = [_d(r) for r in _l(spec.get("parentRefs"))]
    return _join([f"{r.get('kind', 'Gateway')}/{r.get('name')}" for r in refs])


# ---- documents: policies, routes, Istio networking, Gateways -------------------------------

# kind -> (columns, cells(doc, status) -> (cells, wide cells))
Cells = Callable[[Mapping[str, Any], str], tuple[list[str], list[str]]]


def _ap(doc: Mapping[str, Any], status: str) -> tuple[list[str], list[str]]:
    s = spec_of(doc)
    return [str(s.get("action") or "ALLOW"), _selector(s)], [str(len(_l(s.get("rules"))))]


def _pa(doc: Mapping[str, Any], status: str) -> tuple[list[str], list[str]]:
    s = spec_of(doc)
    ports = _d(s.get("portLevelMtls"))
    modes = [f"{p}:{_d(m).get('mode')}" for p, m in sorted(ports.items())]
    return [str(_d(s.get("mtls")).get("mode") or "UNSET"), _selector(s)], [_join(modes)]


def _ra(doc: Mapping[str, Any], status: str) -> tuple[list[str], list[str]]:
    s = spec_of(doc)
    issuers = [_d(r).get("issuer") for r in _l(s.get("jwtRules"))]
    return [_selector(s), _join(issuers)], []


def _route(doc: Mapping[str, Any], status: str) -> tuple[list[str], list[str]]:
    s = spec_of(doc)
    return [_parents(s), _join(_l(s.get("hostnames"))), status], [str(len(_l(s.get("rules"))))]


def _vs(doc: Mapping[str, Any], status: str) -> tuple[list[str], list[str]]:
    s = spec_of(doc)
    return [_join(_l(s.get("gateways"))), _join(_l(s.get("hosts"))), status], []


def _dr(doc: Mapping[str, Any], status: str) -> tuple[list[str], list[str]]:
    s = spec_of(doc)
    subsets = [_d(x).get("name") for x in _l(s.get("subsets"))]
    return [str(s.get("host") or MISSING), _join(subsets)], []


def _se(doc: Mapping[str, Any], status: str) -> tuple[list[str], list[str]]:
    s = spec_of(doc)
    ports = [f"{_d(p).get('number')}/{_d(p).get('protocol', 'TCP')}" for p in _l(s.get("ports"))]
    return (
        [
            _join(_l(s.get("hosts"))),
            str(s.get("location") or "MESH_EXTERNAL"),
            str(s.get("resolution") or "NONE"),
        ],
        [_join(_l(s.get("addresses"))), _join(ports)],
    )


def _gw(doc: Mapping[str, Any], status: str) -> tuple[list[str], list[str]]:
    address, _, programmed = status.partition(" ")
    return [str(spec_of(doc).get("gatewayClassName") or MISSING), address, programmed], []


DOCUMENT_COLUMNS: dict[str, tuple[Columns, Cells]] = {
    "AuthorizationPolicy": (Columns(("ACTION", "SELECTOR"), ("RULES",)), _ap),
    "PeerAuthentication": (Columns(("MODE", "SELECTOR"), ("PORT MODES",)), _pa),
    "RequestAuthentication": (Columns(("SELECTOR", "ISSUERS")), _ra),
    "HTTPRoute": (Columns(("PARENTS", "HOSTNAMES", "STATUS"), ("RULES",)), _route),
    "GRPCRoute": (Columns(("PARENTS", "HOSTNAMES", "STATUS"), ("RULES",)), _route),
    "VirtualService": (Columns(("GATEWAYS", "HOSTS", "STATUS")), _vs),
    "DestinationRule": (Columns(("HOST", "SUBSETS")), _dr),
    "ServiceEntry": (
        Columns(("HOSTS", "LOCATION", "RESOLUTION"), ("ADDRESSES", "PORTS")),
        _se,
    ),
    "Gateway": (Columns(("CLASS", "ADDRESS", "PROGRAMMED")), _gw),
}


def document_rows(
    kind: str, docs: Sequence[Mapping[str, Any]], status: Mapping[tuple[str, str], str]
) -> list[Row]:
    """`status`: (namespace, name) -> the STATUS cell (routes: the conditions the
    waypoints compute; Gateways: "ADDRESS PROGRAMMED")."""
    _, cells = DOCUMENT_COLUMNS[kind]
    rows = []
    for doc in docs:
        m = meta(doc)
        ns, name = str(m.get("namespace") or "default"), str(m.get("name"))
        default = "- Unknown" if kind == "Gateway" else "Unknown"
        main, wide = cells(doc, status.get((ns, name), default))
        rows.append(Row(ns, name, tuple(main), tuple(wide), _d(m.get("labels"))))
    return rows


def as_list(items: Sequence[Any]) -> dict[str, Any]:
    """Several objects as `kubectl get -o json|yaml` prints them: a v1 List."""
    return {"apiVersion": "v1", "kind": "List", "items": list(items)}


def dump(data: Any, output: str) -> str:
    if output == "yaml":
        return str(yaml.safe_dump(data, sort_keys=False, default_flow_style=False))
    return json.dumps(data, indent=2) + "\n"


# ---- objects of the cluster file and the tunnels -------------------------------------------

SERVICE_COLUMNS = Columns(("CLUSTER-IP", "PORT(S)", "WAYPOINT", "ENDPOINTS"), ("SELECTOR",))
NAMESPACE_COLUMNS = Columns(("STATUS", "DATAPLANE-MODE", "WAYPOINT"))
NODE_COLUMNS = Columns(("STATUS", "INTERNAL-IP", "PODS"), ("POD-CIDR", "MESH CONFIG"))
WORKLOAD_COLUMNS = Columns(("ADDRESS", "NODE", "WAYPOINT", "PROTOCOL"), ("IDENTITY", "STATUS"))


def service_rows(services: Sequence[Mapping[str, Any]]) -> list[Row]:
    """From `service_record`s."""
    rows = []
    for s in services:
        ports = [f"{p['port']}/TCP" for p in _l(s.get("ports"))]
        selector = _d(s.get("selector"))
        rows.append(
            Row(
                str(s["namespace"]),
                str(s["name"]),
                (
                    str(s.get("clusterIP") or MISSING),
                    _join(ports),
                    str(s.get("waypoint") or "None"),
                    str(s.get("endpoints") or "0/0"),
                ),
                (",".join(f"{k}={v}" for k, v in sorted(selector.items())) or MISSING,),
                _d(s.get("labels")),
            )
        )
    return rows


def healthy_endpoints(service: Mapping[str, Any], workloads: Sequence[Mapping[str, Any]]) -> str:
    """healthy/total as istioctl counts them (the tunnels' dump; `views.render_services`'
    rule: an endpoint the dump does not describe is not healthy)."""
    status = {str(w.get("uid")): w.get("status") for w in workloads}
    endpoints = _l(service.get("endpoints"))
    healthy = sum(1 for uid in endpoints if status.get(str(uid)) == "HEALTHY")
    return f"{healthy}/{len(endpoints)}"


def namespace_rows(namespaces: Sequence[Mapping[str, Any]]) -> list[Row]:
    rows = []
    for n in namespaces:
        labels = _d(n.get("labels"))
        rows.append(
            Row(
                "",
                str(n["name"]),
                (
                    "Active",
                    str(labels.get("istio.io/dataplane-mode") or MISSING),
                    str(labels.get("istio.io/use-waypoint") or MISSING),
                ),
                (),
                labels,
            )
        )
    return rows


def node_rows(nodes: Sequence[Mapping[str, Any]]) -> list[Row]:
    """From `node_record`s: Ready when the node's tunnel answers ready."""
    return [
        Row(
            "",
            str(n["name"]),
            ("Ready" if n.get("ready") else "NotReady", str(n.get("ip")), str(n.get("pods"))),
            (str(n.get("podCIDR")), str(n.get("config") or MISSING)[:12]),
        )
        for n in nodes
    ]


def workload_rows(workloads: Sequence[Mapping[str, Any]]) -> list[Row]:
    """From the tunnels' dump (`views.collect_workloads`)."""
    return [
        Row(
            str(w.get("namespace")),
            str(w.get("name")),
            (
                _join(_l(w.get("ips"))),
                str(w.get("node") or MISSING),
                str(w.get("waypoint") or "None"),
                str(w.get("protocol") or MISSING),
            ),
            (str(w.get("identity") or MISSING), str(w.get("status") or MISSING)),
            _d(w.get("labels")),
        )
        for w in workloads
    ]


# ---- describe -----------------------------------------------------------------------------


def describe(pairs: Sequence[tuple[str, Any]]) -> str:
    """kubectl describe's layout: `Key:  value` aligned; a mapping or list value on the
    lines below, indented, as YAML."""
    width = max((len(k) for k, _ in pairs), default=0) + 2
    lines: list[str] = []
    for key, value in pairs:
        label = f"{key}:"
        if isinstance(value, dict | list) and value:
            lines.append(label)
            text = yaml.safe_dump(value, sort_keys=False, default_flow_style=False)
            lines.extend(f"  {line}" for line in text.rstrip("\n").split("\n"))
        else:
            shown = MISSING if value is None or value == "" or value in ({}, []) else value
            lines.append(f"{label.ljust(width)}{shown}")
    return "\n".join(lines) + "\n"


def _labels_pairs(labels: Any) -> str:
    return tables.labels_text(labels)


def describe_document(doc: Mapping[str, Any], status: Any = None) -> str:
    m = meta(doc)
    pairs: list[tuple[str, Any]] = [
        ("Name", m.get("name")),
        ("Namespace", m.get("namespace") or "default"),
        ("Labels", _labels_pairs(m.get("labels"))),
        ("Annotations", _labels_pairs(m.get("annotations"))),
        ("API Version", doc.get("apiVersion")),
        ("Kind", doc.get("kind")),
        ("Spec", _d(doc.get("spec"))),
    ]
    if status is not None:
        pairs.append(("Status", status))
    return describe(pairs)
