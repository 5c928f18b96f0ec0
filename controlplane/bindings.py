"""Waypoint bindings from labels, as istiod computes them. Pure; shared by the Kubernetes
compute and the local cluster's document (`localcluster.xds`).

`istio.io/use-waypoint=<name>` on a Namespace, Service or Pod binds it (the object's own label
beats its namespace's; `none` at either level, the object's first, opts out), and
`istio.io/use-waypoint-namespace=<ns>` beside it names a waypoint in another namespace. A
service binding takes effect when the Gateway's `istio.io/waypoint-for` is service|all; a pod
binding, or a namespace binding seen from a pod, for workload|all.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

USE_WAYPOINT_LABEL = "istio.io/use-waypoint"
USE_WAYPOINT_NAMESPACE_LABEL = "istio.io/use-waypoint-namespace"
NO_WAYPOINT = "none"
WAYPOINT_FOR_LABEL = "istio.io/waypoint-for"
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
