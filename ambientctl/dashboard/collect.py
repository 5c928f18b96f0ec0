"""What the dashboard reads from a running local cluster, once per poll: every tunnel's and
waypoint's metrics, and the pods, services and waypoints with their states. I/O only; the
graph is `graph.build`'s."""

from __future__ import annotations

import time
from dataclasses import dataclass

from ambientctl import views
from ambientctl.dashboard import graph, prom
from localcluster import mesh, netnshttp, waypoints
from localcluster.network import waypoint_layout
from localcluster.spec import ClusterSpec
from localcluster.xds import service_binding, workload_uid
from meshcore.defaults import ADMIN_PORT, METRICS_PORT

SCRAPE_TIMEOUT = 2.0  # per proxy: a hung proxy costs one poll this much, not the page
MAX_BODY = 8 << 20  # a metrics page larger than this is cut (and its last line dropped)


@dataclass(frozen=True, slots=True)
class Poll:
    scrape: graph.Scrape
    pods: tuple[graph.PodInfo, ...]
    services: tuple[graph.ServiceInfo, ...]
    waypoints: tuple[graph.WaypointInfo, ...]
    errors: tuple[str, ...]


def http_get(netns_path: str, ip: str, port: int, path: str) -> tuple[int, bytes]:
    """One HTTP/1.0 GET to ip:port from inside a netns; raises OSError."""
    return netnshttp.request(
        netns_path, port, path, ip=ip, timeout=SCRAPE_TIMEOUT, max_body=MAX_BODY
    )


def _metrics(text: bytes) -> list[prom.Sample]:
    return prom.parse(text.decode(errors="replace"), graph.FAMILIES)


def _pods(cluster: mesh.Cluster, spec: ClusterSpec) -> list[graph.PodInfo]:
    agents = {n.name: mesh.agent_pods(cluster, n.name) for n in spec.nodes}
    out = []
    for p in spec.pods:
        entry = agents.get(p.node, {}).get(workload_uid(spec, p))
        state, reason = graph.pod_state(p.enrolled(spec), entry)
        try:
            ip = str(cluster.layout.pod(p.namespace, p.name).ip)
        except KeyError:
            ip = ""
        ports = tuple(sp.target_port for s in spec.services_for(p) for sp in s.ports)
        out.append(graph.PodInfo(p.namespace, p.name, p.workload_name, p.node, ip, state,
                                 reason, ports))  # fmt: skip
    return out


def poll(cluster: mesh.Cluster) -> Poll:
    """Scrape every proxy and read the cluster's state now. A proxy that does not answer is
    an error line on the page, not a failed poll."""
    spec = mesh.current_spec(cluster)
    samples: list[tuple[str, prom.Sample]] = []
    errors: list[str] = []
    for n in spec.nodes:
        try:
            _, body = mesh.node_http(cluster.layout, n.name, METRICS_PORT, "/metrics",
                                     timeout=SCRAPE_TIMEOUT)  # fmt: skip
        except OSError as e:
            errors.append(f"tunnel on node {n.name}: metrics unreachable ({e})")
            continue
        samples += [(f"tunnel/{n.name}", s) for s in _metrics(body)]
    wps = []
    for g in spec.gateways:
        ready = waypoints.readiness(spec, cluster.state, g)
        wp_pod = next((p for p in spec.waypoint_pods() if p.name == g.pod_name
                       and p.namespace == g.namespace), None)  # fmt: skip
        workload = wp_pod.workload_name if wp_pod is not None else g.name
        wps.append(graph.WaypointInfo(g.namespace, g.name, workload, ready.ready, ready.message))
        try:
            layout = waypoint_layout(spec, g)
            _, body = http_get(layout.netns_path, str(layout.ip), METRICS_PORT, "/metrics")
        except (OSError, ValueError) as e:
            errors.append(f"waypoint {g.namespace}/{g.name}: metrics unreachable ({e})")
            continue
        samples += [(f"waypoint/{g.namespace}/{g.name}", s) for s in _metrics(body)]
    services = []
    for s in spec.services:
        bound = service_binding(spec, s).waypoint
        binding = f"{bound.namespace}/{bound.name}" if bound is not None else ""
        services.append(graph.ServiceInfo(s.namespace, s.name, str(s.vip),
                                          tuple(p.port for p in s.ports), binding))  # fmt: skip
    return Poll(
        graph.Scrape(time.time(), tuple(samples)),
        tuple(_pods(cluster, spec)),
        tuple(services),
        tuple(wps),
        tuple(errors),
    )


def explain(cluster: mesh.Cluster, source: str, destination: str) -> str:
    """`ambientctl explain SOURCE DESTINATION` as text, asked of the source pod's tunnel."""
    ns, _, name = source.partition("/")
    node = cluster.spec.pod(ns, name).node

    def get(node: str, path: str) -> tuple[int, bytes]:
        return mesh.node_http(cluster.layout, node, ADMIN_PORT, path)

    return views.explain(get, node, source, destination, "table")
