"""Waypoint bindings from labels, as istiod computes them. Pure; shared by the Kubernetes
compute and the local cluster's document (`localcluster.xds`).

`istio.io/use-waypoint=<name>` on a Namespace, Service or Pod binds it (the object's own label
beats its namespace's; `none` at either level, the object's first, opts out), and
`istio.io/use-waypoint-namespace=<ns>` beside it names a waypoint in another namespace. A
service binding takes effect when the Gateway's `istio.io/waypoint-for` is service|all; a pod
binding, or a namespace binding seen from a pod, for workload|all.

A binding from another namespace takes effect only where the waypoint's HBONE listener
allows that namespace (`allowedRoutes.namespaces`, Gateway API: `from: Same` by default,
`All`, or `Selector` over the namespace's labels), as Istio requires: a tenant cannot put
its traffic through another namespace's waypoint, and so cannot load it or reach what its
policies let through, unless that namespace says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

USE_WAYPOINT_LABEL = "istio.io/use-waypoint"
USE_WAYPOINT_NAMESPACE_LABEL = "istio.io/use-waypoint-namespace"
NO_WAYPOINT = "none"
WAYPOINT_FOR_LABEL = "istio.io/waypoint-for"
# The label Kubernetes puts on every namespace (so a Selector can name namespaces).
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
WAYPOINT_FOR = ("service", "workload", "all", "none")
DEFAULT_WAYPOINT_FOR = "service"


@dataclass(frozen=True, slots=True)
class UseWaypoint:
    """A `use-waypoint` label in force for an object: the waypoint it names, and whose label
    it is (`source`: "namespace", "service" or "pod")."""

    namespace: str
    name: str
    source: str


def use_waypoint(
    own: Mapping[str, str], namespace_labels: Mapping[str, str], namespace: str, kind: str
) -> UseWaypoint | None:
    """The label in force: the object's own `use-waypoint` beats its namespace's; `none`
    (at either level, the object's first) means no waypoint. The waypoint's namespace is the
    `use-waypoint-namespace` label beside the `use-waypoint` that applies, else the object's."""
    for labels, source in ((own, kind), (namespace_labels, "namespace")):
        name = labels.get(USE_WAYPOINT_LABEL)
        if name is None:
            continue
        if name == NO_WAYPOINT:
            return None
        return UseWaypoint(labels.get(USE_WAYPOINT_NAMESPACE_LABEL) or namespace, name, source)
    return None


def accepts(waypoint_for: str, traffic: str) -> bool:
    """Does a waypoint for `waypoint_for` traffic take `traffic` ("service" | "workload")?"""
    return waypoint_for in (traffic, "all")


_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")


@dataclass(frozen=True, slots=True)
class AllowedNamespaces:
    """Which namespaces may bind to a waypoint: its listener's `allowedRoutes.namespaces`.
    `invalid` holds why the field was not understood (then no other namespace may)."""

    origin: str = "Same"  # Same | All | Selector
    match_labels: tuple[tuple[str, str], ...] = ()
    match_expressions: tuple[tuple[str, str, tuple[str, ...]], ...] = ()
    invalid: str | None = None

    def allows(self, waypoint_ns: str, ns: str, ns_labels: Mapping[str, str]) -> bool:
        """Whether an object of namespace `ns` (with these labels) may bind to the waypoint
        of `waypoint_ns`. Its own namespace always may."""
        if ns == waypoint_ns:
            return True
        if self.invalid is not None or self.origin == "Same":
            return False
        if self.origin == "All":
            return True
        labels = {NAMESPACE_NAME_LABEL: ns, **ns_labels}
        if any(labels.get(k) != v for k, v in self.match_labels):
            return False
        for key, op, values in self.match_expressions:
            has = key in labels
            if op == "In" and not (has and labels[key] in values):
                return False
            if op == "NotIn" and has and labels[key] in values:
                return False
            if op == "Exists" and not has:
                return False
            if op == "DoesNotExist" and has:
                return False
        return True

    def describe(self) -> str:
        if self.invalid is not None:
            return f"its allowedRoutes is not valid ({self.invalid})"
        if self.origin == "Selector":
            return "its allowedRoutes selector does not select that namespace"
        return f"its allowedRoutes allows namespaces from {self.origin}"


SAME_NAMESPACE = AllowedNamespaces()


def allowed_namespaces(listener: Mapping[str, Any]) -> AllowedNamespaces:
    """A listener's `allowedRoutes.namespaces` (absent: Same). Raises ValueError, saying
    what is wrong, for anything the Gateway API does not define."""
    routes = listener.get("allowedRoutes")
    if routes is None:
        return SAME_NAMESPACE
    if not isinstance(routes, Mapping):
        raise ValueError("allowedRoutes must be a mapping")
    namespaces = routes.get("namespaces")
    if namespaces is None:
        return SAME_NAMESPACE
    if not isinstance(namespaces, Mapping):
        raise ValueError("allowedRoutes.namespaces must be a mapping")
    origin = namespaces.get("from", "Same")
    if origin not in ("Same", "All", "Selector"):
        raise ValueError(f"allowedRoutes.namespaces.from {origin!r} is not Same, All or Selector")
    if origin != "Selector":
        return AllowedNamespaces(origin)
    selector = namespaces.get("selector")
    if not isinstance(selector, Mapping) or not selector:
        raise ValueError("allowedRoutes.namespaces.from Selector needs a selector")
    labels = selector.get("matchLabels") or {}
    if not isinstance(labels, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        raise ValueError("selector.matchLabels must map strings to strings")
    raw = selector.get("matchExpressions") or []
    if not isinstance(raw, list):
        raise ValueError("selector.matchExpressions must be a list")
    exprs = []
    for i, e in enumerate(raw):
        if not isinstance(e, Mapping) or not isinstance(e.get("key"), str):
            raise ValueError(f"selector.matchExpressions[{i}] needs a key")
        op, values = e.get("operator"), e.get("values") or []
        if op not in _OPERATORS:
            raise ValueError(
                f"selector.matchExpressions[{i}].operator {op!r} is not one of {_OPERATORS}"
            )
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise ValueError(f"selector.matchExpressions[{i}].values must be a list of strings")
        if (op in ("In", "NotIn")) != bool(values):
            raise ValueError(
                f"selector.matchExpressions[{i}]: {op} takes values"
                if op in ("In", "NotIn")
                else f"selector.matchExpressions[{i}]: {op} takes no values"
            )
        exprs.append((e["key"], op, tuple(values)))
    return AllowedNamespaces("Selector", tuple(sorted(labels.items())), tuple(exprs))
