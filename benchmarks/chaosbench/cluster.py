"""The chaos benchmark's cluster: `cluster.yaml` brought up by `localcluster.mesh`, plus the
control plane's discovery half (`python -m controlplane.xds`, serving the cluster's mesh
config over delta xDS with TLS on a socket file), so that the tunnels and the waypoint take
their state from a process that can be killed, as they would from istiod. The CA is the
cluster's own (`controlplane.ca_server`)."""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from localcluster import mesh
from localcluster import waypoints as wps
from localcluster.apps import INHERITED_ENV
from localcluster.gateways import GatewaySpec
from localcluster.network import waypoint_layout
from localcluster.processes import spawn_in_netns
from localcluster.spec import ClusterSpec

HERE = Path(__file__).resolve().parent
CLUSTER_FILE = HERE / "cluster.yaml"
PROJECT_ROOT = HERE.parents[1]
CONTROLPLANE = "controlplane"
NAMESPACE = "mesh"
CLIENT = "client"
READY_TIMEOUT = 60.0


class ChaosSetupError(RuntimeError):
    """The cluster or its control plane did not come up; says which part and its log."""


def istiod_socket(c: mesh.Cluster) -> Path:
    return c.paths.root / "istiod.sock"


def xds_env(c: mesh.Cluster) -> dict[str, str]:
    return {
        "XDS_ADDRESS": f"unix:{istiod_socket(c)}",
        "XDS_ROOT_CERT": str(c.state.dir / "ca" / "root-cert.pem"),
    }


def _env() -> dict[str, str]:
    env = {k: os.environ[k] for k in INHERITED_ENV if k in os.environ}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_control_plane(c: mesh.Cluster) -> None:
    """`python -m controlplane.xds` in the cluster netns, recorded like every process of
    the cluster (so `down` stops it), serving the mesh config file the CLI writes."""
    sock = istiod_socket(c)
    log = c.state.log_dir / f"{CONTROLPLANE}.log"
    spawn_in_netns(
        c.layout.cluster_netns_path,
        # Subscribers authenticate with the node tokens the cluster's CA takes, which the
        # tunnels and waypoints already hold (CA_TOKEN_PATH).
        [sys.executable, "-m", "controlplane.xds", "--config", str(c.paths.xds),
         "--state-dir", str(c.state.dir), "--listen", f"unix:{sock}",
         "--trust-domain", c.spec.trust_domain, "--tokens-file", str(c.paths.tokens)],
        _env(),
        PROJECT_ROOT,
        log,
        c.state.pidfile_dir,
        CONTROLPLANE,
    )  # fmt: skip
    _wait(lambda: sock.exists(), f"the control plane's socket {sock} (its log: {log})")


def tunnels_over_xds(c: mesh.Cluster) -> None:
    """Replace each node's tunnel (started on the mesh config file by `up`) with one fed by
    the control plane, then wait until every node is ready again."""
    for node in c.spec.nodes:
        mesh.stop_tunnel(c, node.name)
        mesh.start_tunnel(c.spec, c.layout, c.state, node.name, source_env=xds_env(c))
    mesh.wait_ready(c, READY_TIMEOUT)


def waypoints_over_xds(c: mesh.Cluster) -> None:
    """The same for each waypoint: stopped, started again on the control plane."""
    spec = mesh.current_spec(c)
    for g in spec.gateways:
        wps.stop(c.state, g)
        env = wps.waypoint_env(spec, c.paths, g)
        env.pop("LOCAL_XDS_PATH", None)
        env.update(xds_env(c))
        name = wps.process_name(g)
        spawn_in_netns(
            waypoint_layout(spec, g).netns_path,
            [sys.executable, "-m", "waypoint"],
            env,
            PROJECT_ROOT,
            c.state.log_dir / f"{name}.log",
            c.state.pidfile_dir,
            name,
        )
        _wait(
            functools.partial(_waypoint_ready, c, spec, g),
            f"waypoint {g.namespace}/{g.name} to be ready (its log: {name}.log)",
        )


def _waypoint_ready(c: mesh.Cluster, spec: ClusterSpec, g: GatewaySpec) -> bool:
    return wps.readiness(spec, c.state, g).ready


def _wait(cond: Callable[[], bool], what: str, timeout: float = READY_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise ChaosSetupError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.1)


def up(state_root: Path) -> mesh.Cluster:
    """The cluster with the control plane feeding its tunnels and waypoint. On failure,
    what was built is torn down and ChaosSetupError (or MeshUpError) says why."""
    c = mesh.up(CLUSTER_FILE, state_root)
    try:
        start_control_plane(c)
        tunnels_over_xds(c)
        waypoints_over_xds(c)
    except BaseException:
        mesh.down(c.spec.name, state_root)
        raise
    return c
