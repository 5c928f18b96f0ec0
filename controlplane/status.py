"""The status the control plane writes back where Kubernetes users look. Pure.

- Gateway (class istio-waypoint): `addresses` (its Service's ClusterIP, and the Service's
  hostname) and conditions Accepted and Programmed (True once its Deployment has a ready
  replica);
- HTTPRoute / GRPCRoute: `parents[]`, one per parentRef, with Accepted and ResolvedRefs as the
  waypoints compute them (`RouteTable.build(...).statuses()`, one table per waypoint and one
  for Service parents);
- the Istio kinds (AuthorizationPolicy, PeerAuthentication, RequestAuthentication,
  VirtualService, DestinationRule): a condition Accepted, False with the parser's message
  when the mesh cannot use the resource as written.

`merged` keeps a condition's lastTransitionTime while its status does not change, and
`same` compares statuses without the times, so a status is written only when what it says
changed (no update loops between the writer and the informer that sees the write).
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from controlplane.endpoints import Obj, Problem, key_of, meta, spec
from controlplane.waypoints import WaypointGateway
from meshcore.state import MeshState
from waypoint.routes.status import Condition
from waypoint.routes.table import RouteTable

MESH_CONTROLLER = "istio.io/mesh-controller"
WAYPOINT_CONTROLLER = "istio.io/waypoint-controller"
ROUTE_KINDS = ("HTTPRoute", "GRPCRoute")
ROUTING_KINDS = ("HTTPRoute", "GRPCRoute", "VirtualService", "DestinationRule", "ReferenceGrant")
TIME_KEYS = ("lastTransitionTime",)


def condition(type_: str, ok: bool, reason: str, message: str, generation: int) -> dict[str, Any]:
    return {
        "type": type_,
        "status": "True" if ok else "False",
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
    }


def now_text() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def generation_of(obj: Obj) -> int:
    g = meta(obj).get("generation")
    return g if isinstance(g, int) else 0


def merged(
    old: Sequence[Mapping[str, Any]] | None, new: Sequence[dict[str, Any]], now: str
) -> list[dict[str, Any]]:
    """`new` conditions with lastTransitionTime: the old one's while the status holds."""
    before = {c.get("type"): c for c in old or () if isinstance(c, Mapping)}
    out = []
    for c in new:
        prev = before.get(c["type"])
        same = prev is not None and prev.get("status") == c["status"]
        stamp = prev.get("lastTransitionTime") if same and prev is not None else None
        out.append({**c, "lastTransitionTime": stamp or now})
    return out


def _timeless(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _timeless(v) for k, v in value.items() if k not in TIME_KEYS}
    if isinstance(value, list):
        return [_timeless(v) for v in value]
    return value


def same(old: Any, new: Any) -> bool:
    """Do two statuses say the same thing (times aside)?"""
    return bool(_timeless(old or {}) == _timeless(new or {}))


# ---- Gateway ------------------------------------------------------------------------------


def gateway_status(
    gw: WaypointGateway,
    vip: str | None,
    hostname: str,
    ready_replicas: int,
    old: Mapping[str, Any] | None,
    now: str,
) -> dict[str, Any]:
    g = gw.generation
    if gw.problem is not None:
        conditions = [
            condition("Accepted", False, "Invalid", gw.problem, g),
            condition("Programmed", False, "Invalid", "the Gateway is not accepted", g),
        ]
    elif vip is None:
        conditions = [
            condition("Accepted", True, "Accepted", "Resource accepted", g),
            condition(
                "Programmed",
                False,
                "AddressNotAssigned",
                "the waypoint's Service has no ClusterIP yet",
                g,
            ),
        ]
    elif ready_replicas < 1:
        conditions = [
            condition("Accepted", True, "Accepted", "Resource accepted", g),
            condition(
                "Programmed", False, "Pending", "the waypoint's Deployment has no ready replica", g
            ),
        ]
    else:
        conditions = [
            condition("Accepted", True, "Accepted", "Resource accepted", g),
            condition("Programmed", True, "Programmed", "Resource programmed", g),
        ]
    out: dict[str, Any] = {
        "conditions": merged((old or {}).get("conditions"), conditions, now),
    }
    if vip is not None:
        out["addresses"] = [
            {"type": "IPAddress", "value": vip.removeprefix("/")},
            {"type": "Hostname", "value": hostname},
        ]
    return out


# ---- routes -------------------------------------------------------------------------------


def route_conditions(
    state: MeshState, waypoints: Iterable[tuple[str, str]]
) -> dict[tuple[str, str, str], tuple[Condition, ...]]:
    """(kind, namespace, name) -> the conditions the waypoints compute for it. A route whose
    parent is a waypoint Gateway is accepted only by that waypoint's table, so a condition
    about a parent comes from the table that accepts it when one does."""
    documents = [r.document() for kind in ROUTING_KINDS for r in state.resources(kind)]
    tables = [RouteTable.build(documents, state.services, gateway=None)]
    tables += [RouteTable.build(documents, state.services, gateway=g) for g in waypoints]
    found: dict[tuple[str, str, str], dict[tuple[str, str | None], Condition]] = {}
    for t in tables:
        for st in t.statuses():
            conditions = found.setdefault((st.kind, st.namespace, st.name), {})
            for c in st.conditions:
                have = conditions.get((c.type, c.parent))
                if have is None or (c.status and not have.status):
                    conditions[(c.type, c.parent)] = c
    return {k: tuple(v.values()) for k, v in found.items()}


def parent_name(ref: Mapping[str, Any], namespace: str) -> str:
    """A parentRef as `waypoint.routes` names it ("Kind ns/name[:port]")."""
    port = ref.get("port")
    suffix = f":{port}" if port is not None else ""
    kind = ref.get("kind") or "Gateway"
    return f"{kind} {ref.get('namespace') or namespace}/{ref.get('name')}{suffix}"


def route_status(
    route: Obj,
    conditions: Sequence[Condition],
    old: Mapping[str, Any] | None,
    now: str,
) -> dict[str, Any]:
    """`status.parents`: per parentRef, its conditions (a route that does not parse at all
    has them without a parent: every parent gets those)."""
    ns = key_of(route)[0]
    g = generation_of(route)
    old_parents = {
        parent_name(p.get("parentRef") or {}, ns): p
        for p in (old or {}).get("parents") or ()
        if isinstance(p, Mapping)
    }
    parents = []
    refs = spec(route).get("parentRefs")
    for ref in refs if isinstance(refs, list) else ():
        if not isinstance(ref, Mapping):
            continue
        pname = parent_name(ref, ns)
        mine = [c for c in conditions if c.parent == pname] or [
            c for c in conditions if c.parent is None
        ]
        new = [condition(c.type, c.status, c.reason, c.message, g) for c in mine]
        if not new:
            new = [condition("Accepted", False, "Pending", "not computed yet", g)]
        is_service = (ref.get("kind") or "Gateway") == "Service"
        prev = old_parents.get(pname) or {}
        parents.append(
            {
                "parentRef": dict(ref),
                "controllerName": MESH_CONTROLLER if is_service else WAYPOINT_CONTROLLER,
                "conditions": merged(prev.get("conditions"), new, now),
            }
        )
    return {"parents": parents}


# ---- the Istio kinds -----------------------------------------------------------------------


def istio_status(
    obj: Obj, problems: Sequence[Problem], old: Mapping[str, Any] | None, now: str
) -> dict[str, Any]:
    g = generation_of(obj)
    if problems:
        message = "; ".join(p.message for p in problems)
        new = [condition("Accepted", False, "Invalid", message, g)]
    else:
        new = [condition("Accepted", True, "Accepted", "Resource accepted", g)]
    return {"conditions": merged((old or {}).get("conditions"), new, now)}
