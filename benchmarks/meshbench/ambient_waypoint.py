"""The `ambient-waypoint` scenario: the ambient L4 path plus a waypoint (L7 proxy) bound to
the server's Service, as Istio's ambient mode runs HTTP policy.

The cluster is sidecar_cluster's client and server pods, in a namespace labelled ambient
(node agents and tunnels enrol them), with two additions made by `cluster_doc`: a waypoint
Gateway (`python -m waypoint` in its own pod on node1, as the local cluster runs every
waypoint) and the label `istio.io/use-waypoint` on the server's Service. The Service's
HTTP port is declared `http`, so the waypoint parses and routes every request; the bulk
port is not, and passes through it as TCP.

Service-bound waypoints only see traffic addressed to the Service, so the client connects
to the Service's VIP, not the pod IP: client -> node1's tunnel -> the waypoint (HBONE, one
request at a time parsed, routed, logged, counted) -> the server node's tunnel (HBONE) ->
the app. The scenario's cost is the waypoint and the tunnels on that path; the waypoint's
own share is its role `waypoint` (`WAYPOINT_ROLE`), sampled from /proc as a tunnel is.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

import nsutil
from localcluster import gateways as gw
from localcluster import mesh
from localcluster import waypoints as wps
from localcluster.xds import USE_WAYPOINT_LABEL
from meshcore.defaults import ADMIN_PORT

from . import sidecar_cluster as sc
from .scenario import Endpoint, Running

NAME = "ambient-waypoint"
WAYPOINT_NAME = "waypoint"
WAYPOINT_ROLE = "waypoint"  # Running.proxies role of the waypoint process
SERVICE = "server"
WAYPOINT_NODE = "node1"  # the cluster file places its Gateways on the first node
READY_TIMEOUT = 30.0  # seconds for the waypoint to answer ready and carry a request
PROBE_TIMEOUT = 2.0


class WaypointUpError(RuntimeError):
    """The waypoint did not become ready or carry a request; the message says where to look."""


def cluster_doc(name: str, placement: str) -> dict[str, Any]:
    """sidecar_cluster's cluster (namespace ambient) plus a waypoint Gateway for service
    traffic and the server's Service bound to it. Pure."""
    doc = sc.cluster_doc(name, placement, ambient_label=True)
    (svc,) = [s for s in doc["services"] if s["name"] == SERVICE]
    svc["labels"] = {USE_WAYPOINT_LABEL: WAYPOINT_NAME}
    # The HTTP port's name must say `http` for the waypoint to handle it as HTTP/1.1.
    assert any(p["port"] == sc.HTTP_PORT and p["name"] == "http" for p in svc["ports"])
    doc["gateways"] = [gw.waypoint_resource(WAYPOINT_NAME, sc.NAMESPACE)]
    return doc


def write_cluster_file(workdir: Path, name: str, placement: str) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"cluster-{name}.yaml"
    path.write_text(yaml.safe_dump(cluster_doc(name, placement), sort_keys=False))
    return path


def _one_request(netns: str, host: str, port: int) -> int:
    """One small keep-alive-free HTTP/1.1 POST from the client pod; the answer's status
    (0: no answer). Bounded by PROBE_TIMEOUT per socket operation."""
    s = nsutil.socket_at(netns)
    try:
        s.settimeout(PROBE_TIMEOUT)
        s.connect((host, port))
        s.sendall(
            b"POST /echo HTTP/1.1\r\nHost: server\r\nContent-Length: 1\r\n"
            b"Connection: close\r\n\r\nx"
        )
        head = s.recv(64)
    finally:
        s.close()
    try:
        return int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else 0
    except (IndexError, ValueError):
        return 0


class WaypointScenario:
    """Ambient L4 plus a waypoint bound to the server's Service (HTTP/1.1 port)."""

    name = NAME

    def __init__(self, placement: str = "cross-node", cluster_name: str = "") -> None:
        self.placement = sc.check_placement(placement)
        self.cluster_name = cluster_name or ("wpx" if placement == "cross-node" else "wps")
        self._state_root: Path | None = None
        self._cluster_file: Path | None = None
        self.cluster: mesh.Cluster | None = None

    def start(self, workdir: Path) -> Running:
        self._state_root = workdir / f"state-{self.cluster_name}"
        self._cluster_file = write_cluster_file(workdir, self.cluster_name, self.placement)
        try:
            cluster = mesh.up(self._cluster_file, self._state_root, mesh=True)
            self.cluster = cluster
            return self._start(cluster)
        except BaseException:
            self.stop()
            raise

    def _start(self, cluster: mesh.Cluster) -> Running:
        spec = cluster.spec
        g = spec.gateway(sc.NAMESPACE, WAYPOINT_NAME)
        if g is None:
            raise WaypointUpError(f"cluster {spec.name} has no Gateway {WAYPOINT_NAME}")
        vip = str(next(s.vip for s in spec.services if s.name == SERVICE))
        netns = sc.pod_netns(cluster, sc.CLIENT_POD)
        self._wait_ready(cluster, g, netns, vip)
        rec = mesh.process_record(cluster, wps.process_name(g))
        if rec is None:
            raise WaypointUpError(f"the waypoint process is not running; see {self.log()}")
        server_node = spec.pod(sc.NAMESPACE, sc.SERVER_POD).node
        proxies: dict[str, list[int]] = {WAYPOINT_ROLE: [rec.pid]}
        for node in sorted({"node1", server_node}):
            tunnel = mesh.process_record(cluster, mesh.tunnel_name(node))
            if tunnel is None:
                raise WaypointUpError(f"the tunnel of {node} is not running")
            proxies[f"tunnel-{node}"] = [tunnel.pid]
        return Running(
            http=Endpoint(netns, vip, sc.HTTP_PORT),
            bulk=Endpoint(netns, vip, sc.BULK_PORT),
            proxies=proxies,
            tunnel_admin=(cluster.layout.node("node1").netns_path, f"127.0.0.1:{ADMIN_PORT}"),
            # The first mTLS hop ends at the waypoint, whose CONNECT takes a Service
            # authority; the handshake phase measures tunnels only (see the report's notes).
            handshake=None,
            server=sc.server_pids(cluster),
        )

    def _wait_ready(self, cluster: mesh.Cluster, g: gw.GatewaySpec, netns: str, vip: str) -> None:
        """Until the waypoint answers ready and one request through it gets a 200."""
        deadline = time.monotonic() + READY_TIMEOUT
        why = "not asked yet"
        while time.monotonic() < deadline:
            r = wps.readiness(cluster.spec, cluster.state, g)
            if r.ready:
                with contextlib.suppress(OSError):
                    status = _one_request(netns, vip, sc.HTTP_PORT)
                    if status == 200:
                        return
                    why = f"a request through it answered {status or 'nothing'}"
            else:
                why = f"{r.reason}: {r.message}"
            time.sleep(0.2)
        raise WaypointUpError(
            f"waypoint not ready after {READY_TIMEOUT:.0f} s ({why}); see {self.log()}"
        )

    def log(self) -> Path | None:
        if self.cluster is None:
            return None
        g = self.cluster.spec.gateway(sc.NAMESPACE, WAYPOINT_NAME)
        return None if g is None else self.cluster.state.log_dir / f"{wps.process_name(g)}.log"

    def stop(self) -> None:
        if self._state_root is not None:
            mesh.down(self.cluster_name, self._state_root)
            # `down` keeps the CA's root for a later `up`; a benchmark run starts anew.
            shutil.rmtree(self._state_root, ignore_errors=True)
            self._state_root = None
        if self._cluster_file is not None:
            self._cluster_file.unlink(missing_ok=True)
            self._cluster_file = None
        self.cluster = None
