"""Operator views of the waypoints and the L7 routes, in istioctl's words.

Rendering is pure (records and readiness in, text out) so it is tested without a cluster.
`waypoint status` is answered at once from one probe per waypoint: ready, or why not.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ambientctl.views import MISSING, as_json, table
from localcluster import gateways as gw
from localcluster.spec import ClusterSpec

ROUTE_KINDS = ("HTTPRoute", "GRPCRoute", "VirtualService")
WAIT_POLL = 0.2

Found = Sequence[tuple[gw.GatewaySpec, gw.Readiness]]


def _address(g: gw.GatewaySpec) -> str:
    return str(g.placement.vip) if g.placement is not None else MISSING


def render_list(found: Found, with_namespace: bool) -> str:
    """As `istioctl waypoint list`: name, revision-less, programmed, plus what we know."""
    headers = ["NAME", "FOR", "ADDRESS", "NODE", "PROGRAMMED", "FAIL-OPEN"]
    rows = []
    for g, r in found:
        row = [
            g.name,
            g.waypoint_for,
            _address(g),
            g.placement.node if g.placement is not None else MISSING,
            "True" if r.ready else "False",
            "yes" if g.fail_open else "no",
        ]
        rows.append([g.namespace, *row] if with_namespace else row)
    if not rows:
        return "No waypoints found.\n"
    return table(["NAMESPACE", *headers] if with_namespace else headers, sorted(rows))


def as_json_list(found: Found) -> str:
    out = []
    for g, r in found:
        doc = g.resource()
        doc["status"] = gw.status(g, r)
        out.append(doc)
    return as_json(out)


def render_status(found: Found) -> str:
    """One line per waypoint: programmed, or the reason and what to look at."""
    rows = [
        [
            g.namespace,
            g.name,
            "True" if r.ready else "False",
            r.reason,
            r.message,
        ]
        for g, r in found
    ]
    return table(["NAMESPACE", "NAME", "PROGRAMMED", "REASON", "MESSAGE"], rows)


def wait_programmed(poll: Callable[[], gw.Readiness], timeout: float) -> gw.Readiness:
    """Poll until programmed or `timeout` seconds; the last answer either way."""
    deadline = time.monotonic() + timeout
    while True:
        r = poll()
        if r.ready or time.monotonic() >= deadline:
            return r
        time.sleep(WAIT_POLL)


# ---- routes --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RouteRow:
    namespace: str  # the service's
    service: str
    kind: str
    route: str  # namespace/name of the route
    status: str

    def to_json(self) -> dict[str, str]:
        return {
            "namespace": self.namespace,
            "service": self.service,
            "kind": self.kind,
            "route": self.route,
            "status": self.status,
        }


def route_status(doc: Mapping[str, Any]) -> str:
    """What the record says of the route's status (its conditions, when it has some)."""
    status = doc.get("status")
    parents = status.get("parents") if isinstance(status, Mapping) else None
    out = []
    for parent in parents if isinstance(parents, list) else ():
        conditions = parent.get("conditions") if isinstance(parent, Mapping) else None
        for c in conditions if isinstance(conditions, list) else ():
            if isinstance(c, Mapping) and c.get("type"):
                text = f"{c.get('type')}={c.get('status')}"
                if c.get("status") != "True" and c.get("message"):
                    text += f" ({c.get('message')})"
                out.append(text)
    return ", ".join(out) if out else "Recorded"


def _targets(doc: Mapping[str, Any], spec: ClusterSpec) -> list[tuple[str, str]]:
    """The (namespace, service) a route attaches to: its Service parentRefs, a waypoint
    Gateway's bound services for a Gateway parentRef, or a VirtualService's hosts."""
    meta = doc.get("metadata") if isinstance(doc.get("metadata"), Mapping) else {}
    ns = str(meta.get("namespace") or "default") if isinstance(meta, Mapping) else "default"
    body = doc.get("spec") if isinstance(doc.get("spec"), Mapping) else {}
    assert isinstance(body, Mapping)
    out: list[tuple[str, str]] = []
    if doc.get("kind") == "VirtualService":
        for host in body.get("hosts") or ():
            name, _, rest = str(host).partition(".")
            out.append((rest.split(".", 1)[0] if rest else ns, name))
        return out
    for ref in body.get("parentRefs") or ():
        if not isinstance(ref, Mapping):
            continue
        ref_ns = str(ref.get("namespace") or ns)
        if ref.get("kind") == "Service":
            out.append((ref_ns, str(ref.get("name"))))
        elif ref.get("kind", "Gateway") == "Gateway":
            out.append((ref_ns, f"(waypoint {ref.get('name')})"))
    return out


def routes(spec: ClusterSpec, resources: Sequence[Mapping[str, Any]]) -> list[RouteRow]:
    rows = []
    for doc in resources:
        if doc.get("kind") not in ROUTE_KINDS:
            continue
        meta = doc.get("metadata")
        if not isinstance(meta, Mapping):
            continue
        ref = f"{meta.get('namespace')}/{meta.get('name')}"
        for ns, svc in _targets(doc, spec) or [(str(meta.get("namespace")), MISSING)]:
            rows.append(RouteRow(ns, svc, str(doc.get("kind")), ref, route_status(doc)))
    return sorted(rows, key=lambda r: (r.namespace, r.service, r.kind, r.route))


def render_routes(rows: Sequence[RouteRow]) -> str:
    if not rows:
        return "No routes found.\n"
    return table(
        ["NAMESPACE", "SERVICE", "KIND", "ROUTE", "STATUS"],
        [[r.namespace, r.service, r.kind, r.route, r.status] for r in rows],
    )
