"""The mesh as a graph: nodes (workloads, services, waypoints) and traffic edges, from two
successive scrapes of the proxies' metrics and the cluster's pods and services.

Pure: data in, one JSON-ready document out, so every rule here is tested from fixed samples.

Where traffic goes, as Kiali draws it:
- a connection to a service is two hops, client -> service -> the workload that served it;
- a connection the client's tunnel sent to a waypoint is client -> waypoint; what the
  waypoint sends on is waypoint -> service -> workload (the waypoint's own tunnel reports
  it as a connection whose source is the waypoint), so the waypoint sits between the client
  and the service;
- a connection with no service (to a pod IP) is client -> workload;
- a source the tunnels could not name (a client outside the mesh) is the `external` node.

Both tunnels of a connection report it (reporter="source" and "destination"); an edge takes
each figure from the reporter that counted the most, rather than adding them up, so a
connection is counted once whether one tunnel or both saw it. Denials are
`istio_tcp_connections_closed_total{response_flags="DENY"}` (L4, the server's tunnel) and
`istio_requests_total{response_flags=~"RBAC"}` (L7, the waypoint).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ambientctl.dashboard.prom import Sample
from meshcore.observability import metrics as tcp
from waypoint.telemetry import metrics as l7

UNKNOWN = "unknown"
EXTERNAL = "external"

TCP_OPENED = f"{tcp.OPENED}_total"
TCP_CLOSED = f"{tcp.CLOSED}_total"
TCP_RECEIVED = f"{tcp.RECEIVED_BYTES}_total"
TCP_SENT = f"{tcp.SENT_BYTES}_total"
TCP_OPEN = tcp.SOCKETS_OPEN
REQUESTS = l7.REQUESTS
# Every family the graph reads (the collector asks the parser for these only).
FAMILIES = (TCP_OPENED, TCP_CLOSED, TCP_RECEIVED, TCP_SENT, TCP_OPEN, REQUESTS)

# Worst first: a workload shows the worst state of its pods.
STATE_ORDER = ("failed", "pending", "removing", "unknown", "not-ready", "not-enrolled", "enrolled",
               "ready")  # fmt: skip


@dataclass(frozen=True, slots=True)
class PodInfo:
    namespace: str
    name: str
    workload: str  # the metrics' workload name (a StatefulSet-like pod `x-0` is `x`)
    node: str
    ip: str
    state: str  # enrolled | pending | failed | removing | not-enrolled | unknown
    reason: str = ""
    ports: tuple[int, ...] = ()  # the ports its services send to (for `explain`)


@dataclass(frozen=True, slots=True)
class ServiceInfo:
    namespace: str
    name: str
    vip: str
    ports: tuple[int, ...]
    waypoint: str = ""  # "ns/name" of the waypoint it is bound to


@dataclass(frozen=True, slots=True)
class WaypointInfo:
    namespace: str
    name: str
    workload: str  # its pod's workload name in the metrics
    ready: bool
    message: str = ""


@dataclass(frozen=True, slots=True)
class Scrape:
    """One scrape of every proxy: `samples` as (origin, sample); origin names the proxy
    (`tunnel/<node>` or `waypoint/<ns>/<name>`) so that equal label sets of two proxies
    stay two series."""

    time: float
    samples: tuple[tuple[str, Sample], ...]


@dataclass(frozen=True, slots=True)
class Point:
    """A series now: its value (a counter's total, a gauge's level) and rate per second
    since the previous scrape (0 for the first scrape, or a gauge)."""

    origin: str
    sample: Sample
    rate: float


def _key(origin: str, s: Sample) -> tuple[str, str, tuple[tuple[str, str], ...]]:
    return origin, s.name, tuple(sorted(s.labels.items()))


def points(prev: Scrape | None, cur: Scrape) -> list[Point]:
    """Each series of `cur` with its rate since `prev`. A series absent before started at 0
    in between; a counter that went down was reset (its proxy restarted) and counts from 0."""
    before = {_key(o, s): s.value for o, s in prev.samples} if prev is not None else None
    dt = cur.time - prev.time if prev is not None else 0.0
    out = []
    for origin, s in cur.samples:
        rate = 0.0
        if before is not None and dt > 0 and s.name != TCP_OPEN:
            was = before.get(_key(origin, s), 0.0)
            rate = max(0.0, (s.value - was if s.value >= was else s.value) / dt)
        out.append(Point(origin, s, rate))
    return out


# Figures an edge carries; each is the max over the reporters that counted it.
FIGURES = ("connections", "conn_rate", "active", "bytes_rate", "requests", "req_rate", "errors",
           "err_rate", "denied", "deny_rate")  # fmt: skip


@dataclass
class _Edge:
    by_reporter: dict[str, dict[str, float]] = field(default_factory=dict)
    security: set[str] = field(default_factory=set)
    services: list[tuple[str, str]] = field(default_factory=list)

    def add(self, reporter: str, figure: str, value: float) -> None:
        figures = self.by_reporter.setdefault(reporter, dict.fromkeys(FIGURES, 0.0))
        figures[figure] += value

    def figures(self) -> dict[str, float]:
        return {f: max((r[f] for r in self.by_reporter.values()), default=0.0) for f in FIGURES}


class _Names:
    """Node ids from metric labels."""

    def __init__(self, waypoints: Sequence[WaypointInfo]) -> None:
        self.waypoint_of = {(w.namespace, w.workload): f"waypoint:{w.namespace}/{w.name}"
                            for w in waypoints}  # fmt: skip

    def workload(self, namespace: str, workload: str) -> str:
        if UNKNOWN in (namespace, workload) or not namespace or not workload:
            return EXTERNAL
        return self.waypoint_of.get((namespace, workload), f"workload:{namespace}/{workload}")

    @staticmethod
    def service(labels: Mapping[str, str]) -> tuple[str, str] | None:
        ns = labels.get("destination_service_namespace", UNKNOWN)
        name = labels.get("destination_service_name", UNKNOWN)
        return None if UNKNOWN in (ns, name) or not ns or not name else (ns, name)


def _is_waypoint(node: str) -> bool:
    return node.startswith("waypoint:")


def _waypoint_node(origin: str) -> str:
    return f"waypoint:{origin.removeprefix('waypoint/')}"


def _hops(src: str, svc: tuple[str, str] | None, dst: str) -> list[tuple[str, str]]:
    if _is_waypoint(dst) and not _is_waypoint(src):
        return [(src, dst)]
    if svc is not None:
        node = f"service:{svc[0]}/{svc[1]}"
        return [(src, node)] + ([(node, dst)] if dst != EXTERNAL else [])
    return [(src, dst)]


def _tcp_figures(p: Point) -> list[tuple[str, float]]:
    name, labels = p.sample.name, p.sample.labels
    if name == TCP_OPENED:
        return [("connections", p.sample.value), ("conn_rate", p.rate)]
    if name == TCP_OPEN:
        return [("active", p.sample.value)]
    if name in (TCP_RECEIVED, TCP_SENT):
        return [("bytes_rate", p.rate)]
    if name == TCP_CLOSED:
        flag = labels.get("response_flags", "-")
        if flag == "DENY":
            return [("denied", p.sample.value), ("deny_rate", p.rate)]
        if flag not in ("-", ""):
            return [("errors", p.sample.value), ("err_rate", p.rate)]
    return []


def _request_figures(p: Point) -> list[tuple[str, float]]:
    labels = p.sample.labels
    out = [("requests", p.sample.value), ("req_rate", p.rate)]
    flags = labels.get("response_flags", "-").split(",")
    if "RBAC" in flags:
        out += [("denied", p.sample.value), ("deny_rate", p.rate)]
    code = labels.get("response_code", "")
    if code == "0" or code.startswith("5"):
        out += [("errors", p.sample.value), ("err_rate", p.rate)]
    return out


def _ends(names: _Names, labels: Mapping[str, str]) -> tuple[str, str]:
    src = names.workload(labels.get("source_workload_namespace", UNKNOWN),
                         labels.get("source_workload", UNKNOWN))  # fmt: skip
    dst = names.workload(labels.get("destination_workload_namespace", UNKNOWN),
                         labels.get("destination_workload", UNKNOWN))  # fmt: skip
    return src, dst


def _edges(pts: Sequence[Point], names: _Names) -> dict[tuple[str, str], _Edge]:
    # The server's tunnel sees the connection arrive at the pod, after the client's tunnel
    # chose the endpoint: it does not know the service. Its report of a (client, server)
    # pair goes the way the client's tunnel said that pair's traffic went (the service), so
    # the two reports land on the same edges. A waypoint's requests say which service its
    # connections to a workload were for.
    via: dict[tuple[str, str], tuple[str, str]] = {}
    for p in pts:
        svc = names.service(p.sample.labels)
        if svc is None:
            continue
        src, dst = _ends(names, p.sample.labels)
        via.setdefault((src, dst), svc)
        if p.sample.name == REQUESTS and p.origin.startswith("waypoint/"):
            via.setdefault((_waypoint_node(p.origin), dst), svc)
    edges: dict[tuple[str, str], _Edge] = {}
    for p in pts:
        labels = p.sample.labels
        src, dst = _ends(names, labels)
        svc = names.service(labels) or via.get((src, dst))
        if p.sample.name == REQUESTS:
            figures = _request_figures(p)
            wp = _waypoint_node(p.origin)
            hops = [(src, wp), *_hops(wp, svc, dst)] if p.origin.startswith("waypoint/") else []
        else:
            figures = _tcp_figures(p)
            hops = _hops(src, svc, dst)
        if not figures:
            continue
        reporter = labels.get("reporter", UNKNOWN)
        for hop in hops:
            if hop[0] == hop[1]:
                continue
            e = edges.setdefault(hop, _Edge())
            for figure, value in figures:
                e.add(reporter, figure, value)
            if p.sample.name in (TCP_OPENED, REQUESTS) and p.sample.value > 0:
                e.security.add(labels.get("connection_security_policy", UNKNOWN))
            if svc is not None and svc not in e.services:
                e.services.append(svc)
    return edges


def _security(seen: set[str]) -> str:
    if not seen:
        return "none"
    if seen == {"mutual_tls"}:
        return "mtls"
    return "plaintext" if "mutual_tls" not in seen else "mixed"


def _worst(states: Iterable[str]) -> str:
    ranked = [s if s in STATE_ORDER else "unknown" for s in states]
    return min(ranked, key=STATE_ORDER.index, default="unknown")


def _explain(
    src: str,
    dst: str,
    services: Sequence[tuple[str, str]],
    pods_of: Mapping[str, list[PodInfo]],
    service_info: Mapping[tuple[str, str], ServiceInfo],
) -> dict[str, str] | None:
    """The `ambientctl explain` that shows why this edge's traffic goes as it does: from a
    pod of the source workload to the service (its VIP and first port), else to a pod of
    the destination workload on a port its services send to."""
    pods = pods_of.get(src)
    if not pods:
        return None
    source = f"{pods[0].namespace}/{pods[0].name}"
    for svc in services:
        info = service_info.get(svc)
        if info is not None and info.vip and info.ports:
            return {"source": source, "destination": f"{info.vip}:{info.ports[0]}"}
    targets = pods_of.get(dst)
    if targets and targets[0].ip and targets[0].ports:
        return {"source": source, "destination": f"{targets[0].ip}:{targets[0].ports[0]}"}
    return None


def _rounded(v: float) -> float:
    return round(v, 3)


def build(
    prev: Scrape | None,
    cur: Scrape,
    pods: Sequence[PodInfo],
    services: Sequence[ServiceInfo],
    waypoints: Sequence[WaypointInfo],
    errors: Sequence[str] = (),
) -> dict[str, Any]:
    """The graph document the page draws: {"time", "interval", "nodes", "edges", "errors"}."""
    names = _Names(waypoints)
    nodes: dict[str, dict[str, Any]] = {}
    pods_of: dict[str, list[PodInfo]] = {}
    for p in sorted(pods, key=lambda p: (p.namespace, p.name)):
        node_id = names.workload(p.namespace, p.workload)
        if _is_waypoint(node_id):
            continue
        pods_of.setdefault(node_id, []).append(p)
    for node_id, members in pods_of.items():
        nodes[node_id] = {
            "id": node_id,
            "kind": "workload",
            "namespace": members[0].namespace,
            "name": members[0].workload,
            "state": _worst(m.state for m in members),
            "pods": [
                {"name": m.name, "node": m.node, "ip": m.ip, "state": m.state, "reason": m.reason}
                for m in members
            ],
        }
    service_info = {(s.namespace, s.name): s for s in services}
    for s in services:
        node_id = f"service:{s.namespace}/{s.name}"
        nodes[node_id] = {"id": node_id, "kind": "service", "namespace": s.namespace,
                          "name": s.name, "vip": s.vip, "waypoint": s.waypoint}  # fmt: skip
    for w in waypoints:
        node_id = f"waypoint:{w.namespace}/{w.name}"
        nodes[node_id] = {"id": node_id, "kind": "waypoint", "namespace": w.namespace,
                          "name": w.name, "state": "ready" if w.ready else "not-ready",
                          "reason": w.message}  # fmt: skip
    edges = []
    interval = cur.time - prev.time if prev is not None else 0.0
    for (src, dst), e in sorted(_edges(points(prev, cur), names).items()):
        for end in (src, dst):
            if end not in nodes:  # a workload the metrics name but the cluster no longer has
                ns, _, name = end.partition(":")[2].partition("/")
                kind = "external" if end == EXTERNAL else end.partition(":")[0]
                nodes[end] = {"id": end, "kind": kind, "namespace": ns, "name": name or end,
                              "state": "unknown"}  # fmt: skip
        figures = e.figures()
        req_rate = figures["req_rate"]
        edges.append(
            {
                "id": f"{src}->{dst}",
                "source": src,
                "target": dst,
                **{f: _rounded(v) for f, v in figures.items()},
                # Of the requests in the last interval, the share that failed.
                "error_rate": _rounded(figures["err_rate"] / req_rate) if req_rate else 0.0,
                "security": _security(e.security),
                "services": [f"{ns}/{name}" for ns, name in e.services],
                "explain": _explain(src, dst, e.services, pods_of, service_info),
            }
        )
    return {
        "time": cur.time,
        "interval": _rounded(interval),
        "nodes": sorted(nodes.values(), key=lambda n: (n["namespace"], n["kind"], n["name"])),
        "edges": edges,
        "errors": list(errors),
    }


def pod_state(in_mesh: bool, agent_entry: Mapping[str, Any] | None) -> tuple[str, str]:
    """(state, reason) of a pod: the node agent's word when it tracks the pod, else
    `not-enrolled` for a pod outside the mesh, or `pending` for one the agent has yet to
    pick up."""
    if agent_entry is not None:
        return str(agent_entry.get("state") or "unknown"), str(agent_entry.get("reason") or "")
    if not in_mesh:
        return "not-enrolled", ""
    return "pending", "the node agent has not reported it yet"
