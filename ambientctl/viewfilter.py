"""`-n NAMESPACE` for the tunnels' views of a local cluster (workloads, services,
policies, certificates, connections): the same views, only the entries of one namespace.
The filter is pure; fetching and rendering are `ambientctl.views`'."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ambientctl import views


def _in(entry: Any, namespace: str) -> bool:
    return isinstance(entry, dict) and entry.get("namespace") == namespace


def only_namespace(kind: str, data: Any, namespace: str) -> Any:
    """`data` (what `views.VIEWS[kind]` collects) with only `namespace`'s entries. A
    service's endpoint health still counts every workload (kept whole)."""
    if kind == "workloads":
        return [w for w in data if _in(w, namespace)]
    if kind == "services":
        return {**data, "services": [s for s in data["services"] if _in(s, namespace)]}
    if kind == "policies":
        return {
            **data,
            "policies": [p for p in data["policies"] if _in(p, namespace)],
            "peerAuthentications": [p for p in data["peerAuthentications"] if _in(p, namespace)],
        }
    if kind == "certificates":
        return [c for c in data if f"/ns/{namespace}/" in str(c.get("identity", ""))]
    return [c for c in data if str(c.get("pod", "")).startswith(f"{namespace}/")]


def show(
    kind: str,
    get: views.Getter,
    nodes: Sequence[str],
    output: str,
    hint: str = "",
    namespace: str | None = None,
) -> str:
    if namespace is None:
        return views.show(kind, get, nodes, output, hint)
    path, collect, render = views.VIEWS[kind]
    answers = {node: views.fetch(get, node, path, hint) for node in nodes}
    data = only_namespace(kind, collect(answers), namespace)
    return views.as_json(data) if output == "json" else render(data, len(nodes) > 1)
