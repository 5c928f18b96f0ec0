"""A local cluster in Kubernetes mode: the nodes' network, a real control plane and the kubelet.

`up(cluster_file)` builds the nodes of a cluster file (no pods: a cluster file with pods or
services is refused, Kubernetes creates those), starts `KubeControlPlane` under the state
directory (`<state>/kube`, outliving the call) and `python -m localcluster.kube.kubelet`,
and records every process in the cluster state's pid directory, so `down` (the ordinary
`localcluster.state.teardown`) stops them all and removes every netns the kubelet made.

Then `start_mesh` starts the mesh itself: the control plane (`python -m controlplane`:
informers, xDS and the gRPC CA on a socket file), the node CA, and per node a node agent
with the Kubernetes pod source and a tunnel fed over xDS.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from localcluster import mesh, registry
from localcluster.apps import INHERITED_ENV
from localcluster.kube.apiserver import KubeControlPlane
from localcluster.kube.images import STORE_ENV
from localcluster.meshconfig import MeshPaths
from localcluster.network import NetworkLayout, build_network
from localcluster.processes import PIDFILE_SUFFIX, ManagedProcess, spawn_in_netns
from localcluster.spec import ClusterSpec, load_cluster
from localcluster.state import ClusterState, keep_spec, live_netns, state_dir, teardown

KUBELET = "kubelet"
CONTROLPLANE = "controlplane"
KUBE_DIR = "kube"


class KubeUpError(RuntimeError):
    """The Kubernetes-mode cluster could not be brought up; says which step and why."""


@dataclass(frozen=True, slots=True)
class KubeCluster:
    spec: ClusterSpec
    layout: NetworkLayout
    state: ClusterState
    kubeconfig: Path


def kube_dir(state: ClusterState) -> Path:
    return state.dir / KUBE_DIR


def kubeconfig_path(cluster: str, state_root: Path | str | None = None) -> Path:
    return state_dir(cluster, state_root) / KUBE_DIR / "kubeconfig"


def check_nodes_only(spec: ClusterSpec) -> None:
    if spec.pods or spec.services or spec.gateways:
        raise KubeUpError(
            f"cluster file of {spec.name}: in Kubernetes mode only its nodes are used; "
            f"remove its pods ({len(spec.pods)}), services ({len(spec.services)}) and "
            f"gateways ({len(spec.gateways)}) and create them with kubectl instead"
        )


# The kubelet and the mesh's processes import this project: they run from its root, with it
# on PYTHONPATH, whatever the caller's cwd.
PROJECT_ROOT = str(Path(__file__).resolve().parents[2])


def _env() -> dict[str, str]:
    env = {k: os.environ[k] for k in INHERITED_ENV if k in os.environ}
    # The kubelet runs a pod's image from the local store this names (images.store_root).
    if STORE_ENV in os.environ:
        env[STORE_ENV] = os.environ[STORE_ENV]
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PROJECT_ROOT, env.get("PYTHONPATH", "")) if p)
    return env


def here_netns() -> str:
    """The caller's own netns, as a path a child can enter (a no-op for it)."""
    return f"/proc/{os.getpid()}/ns/net"


def start_kubelet(
    cluster_file: Path | str,
    state: ClusterState,
    kubeconfig: Path,
    state_root: Path | str | None = None,
    workdir: Path | str | None = None,
) -> ManagedProcess:
    """The kubelet, in the caller's netns (it reaches the API server on loopback). Pod
    commands run in `workdir` (default: the cluster file's directory)."""
    env = _env()
    argv = [
        sys.executable,
        "-m",
        "localcluster.kube.kubelet",
        "--kubeconfig",
        str(kubeconfig),
        "--cluster-file",
        str(Path(cluster_file).resolve()),
    ]
    if state_root is not None:
        argv += ["--state-root", str(Path(state_root).resolve())]
    if workdir is not None:
        argv += ["--workdir", str(Path(workdir).resolve())]
    return spawn_in_netns(
        here_netns(),
        argv,
        env,
        PROJECT_ROOT,
        state.log_dir / f"{KUBELET}.log",
        state.pidfile_dir,
        KUBELET,
    )


def record_control_plane(cp: KubeControlPlane, state: ClusterState) -> None:
    """Copy the control plane's pid records into the cluster's, so teardown stops them."""
    for p in cp.processes:
        dst = state.pidfile_dir / f"kube-{p.record.name}{PIDFILE_SUFFIX}"
        tmp = dst.with_name(f".{dst.name}.tmp")
        tmp.write_text(p.record.to_json(), encoding="utf-8")
        os.replace(tmp, dst)


def wait_nodes_ready(
    cp: KubeControlPlane, spec: ClusterSpec, kubelet: ManagedProcess, timeout: float = 30.0
) -> None:
    """Until every node of the cluster is registered and Ready (pods can be scheduled);
    fail at once if the kubelet exits."""
    deadline = time.monotonic() + timeout
    waiting = [n.name for n in spec.nodes]
    while time.monotonic() < deadline:
        code = kubelet.popen.poll()
        if code is not None:
            raise KubeUpError(f"the kubelet exited with {code}; read {kubelet.record.log_path}")
        waiting = [n for n in waiting if not _node_ready(cp, n)]
        if not waiting:
            return
        time.sleep(0.2)
    raise KubeUpError(
        f"nodes {', '.join(waiting)} not Ready after {timeout:g} s; read {kubelet.record.log_path}"
    )


def _node_ready(cp: KubeControlPlane, name: str) -> bool:
    try:
        status, body = cp.request("GET", f"/api/v1/nodes/{name}")
        node = json.loads(body) if status == 200 else {}
    except (OSError, ValueError):
        return False
    conds = (node.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conds)


def mesh_out(state: ClusterState) -> Path:
    """The mesh config the control plane computes (also the CA's view of who runs where)."""
    return MeshPaths(state.dir / "mesh").root / "mesh.json"


def istiod_socket(state: ClusterState) -> Path:
    """istiod's 15012 as a socket file: delta xDS and the gRPC CA, with TLS. Tunnels in node
    namespaces reach it through the file system."""
    return MeshPaths(state.dir / "mesh").root / "istiod.sock"


def start_mesh(cluster: KubeCluster, timeout: float = 60.0) -> None:
    """The mesh on the Kubernetes cluster, as istiod, istio-cni and ztunnel would run there:

    - `python -m controlplane` (on loopback, beside the API server): follows the API server,
      writes the mesh config, serves delta xDS and the gRPC CA on `istiod_socket`, deploys
      waypoints for Gateways of class istio-waypoint;
    - the CA the tunnels use (`controlplane.ca_server`, node tokens), which vouches for a node
      holding an identity from the control plane's mesh config;
    - per node, a node agent with the Kubernetes pod source (on loopback, to reach the API
      server; its probe set goes into the node netns) and a tunnel in the node netns taking
      its state over xDS (XDS_ADDRESS, the socket file), authenticated by its node token.
    """
    spec, layout, state = cluster.spec, cluster.layout, cluster.state
    paths = MeshPaths(state.dir / "mesh")
    paths.root.mkdir(parents=True, exist_ok=True)
    out = mesh_out(state)
    # The node tokens first: the control plane's xDS server authenticates the tunnels and
    # waypoints by them (they hold no service-account token of this API server).
    mesh.write_node_tokens(spec, state)
    spawn_in_netns(
        here_netns(),
        [
            sys.executable,
            "-m",
            "controlplane",
            "--kubeconfig",
            str(cluster.kubeconfig),
            "--mesh-out",
            str(out),
            "--state-dir",
            str(state.dir),
            "--trust-domain",
            spec.trust_domain,
            "--grpc-listen",
            f"unix:{istiod_socket(state)}",
            "--xds-node-tokens-file",
            str(paths.tokens),
            "--waypoint-host-dir",
            str(paths.root),
            # The node CA's token of the node the waypoint pod lands on (the kubelet expands
            # $(NODE_NAME), set from spec.nodeName before it).
            "--waypoint-token-path",
            str(paths.root / "token-$(NODE_NAME)"),
            "--waypoint-xds-address",
            f"unix:{istiod_socket(state)}",
            "--waypoint-xds-root-cert",
            str(state.dir / "ca" / "root-cert.pem"),
        ],
        _env(),
        PROJECT_ROOT,
        state.log_dir / f"{CONTROLPLANE}.log",
        state.pidfile_dir,
        CONTROLPLANE,
    )
    _wait_file(out, timeout, state.log_dir / f"{CONTROLPLANE}.log", "its first mesh config")
    _wait_file(istiod_socket(state), timeout, state.log_dir / f"{CONTROLPLANE}.log", "istiod.sock")
    mesh.start_ca(spec, layout, state, workloads_file=out)
    mesh.wait_for_ca(state)
    root_cert = state.dir / "ca" / "root-cert.pem"
    for node in spec.nodes:
        start_kube_agent(cluster, node.name)
        mesh.start_tunnel(
            spec,
            layout,
            state,
            node.name,
            source_env={
                "XDS_ADDRESS": f"unix:{istiod_socket(state)}",
                "XDS_ROOT_CERT": str(root_cert),
            },
        )


def start_kube_agent(cluster: KubeCluster, node: str) -> ManagedProcess:
    paths = MeshPaths(cluster.state.dir / "mesh")
    name = mesh.agent_name(node)
    return spawn_in_netns(
        here_netns(),
        [
            sys.executable,
            "-m",
            "redirect.agent",
            "--node",
            node,
            "--pod-source",
            "kubernetes",
            "--kubeconfig",
            str(cluster.kubeconfig),
            "--node-netns",
            cluster.layout.node(node).netns_path,
            "--zds-socket",
            str(paths.zds_socket(node)),
            "--status-file",
            str(paths.agent_status(node)),
            "--no-dns-capture",
        ],
        _env(),
        PROJECT_ROOT,
        cluster.state.log_dir / f"{name}.log",
        cluster.state.pidfile_dir,
        name,
    )


def _wait_file(path: Path, timeout: float, log: Path, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise KubeUpError(
                f"the control plane did not write {what} in {timeout:g} s; read {log}"
            )
        time.sleep(0.1)


def up(
    cluster_file: Path | str,
    state_root: Path | str | None = None,
    workdir: Path | str | None = None,
    with_mesh: bool = True,
    install: str = "processes",
    progress: Callable[[str], None] | None = None,
) -> KubeCluster:
    """Build the nodes, start the control plane and the kubelet, then the mesh: `install`
    "processes" (beside the cluster, `start_mesh`), "helm" (the charts, run by the kubelet
    from the image) or "none" (also `with_mesh=False`). On any failure or interrupt tear
    down what was built. Each step is reported to `progress` as it starts."""

    def say(text: str) -> None:
        if progress is not None:
            progress(text)

    if install not in ("processes", "helm", "none"):
        raise KubeUpError(f"install {install!r} is not one of processes, helm, none")
    if with_mesh and install == "helm":
        from localcluster.kube import meshchart

        try:  # before anything is built: the charts need the image in the local store
            meshchart.require_image(meshchart.chart_version())
        except meshchart.MeshChartError as e:
            raise KubeUpError(str(e)) from None
    spec = load_cluster(cluster_file)
    check_nodes_only(spec)
    d = state_dir(spec.name, state_root)
    try:
        registry.claim(spec.name, d)
    except registry.ClusterConflict as e:
        raise KubeUpError(str(e)) from None
    running = live_netns(spec.name)
    if running:
        registry.release(spec.name, d)
        raise KubeUpError(
            f"network namespaces named like cluster {spec.name}'s exist ({running[0]}, ...): "
            "`ambientctl down` it first"
        )
    try:
        state = ClusterState.open(spec.name, state_root)
        keep_spec(state, cluster_file)  # later commands may name the cluster alone
        say(f"building the network: {len(spec.nodes)} nodes")
        layout = build_network(spec, state)
        shutil.rmtree(kube_dir(state), ignore_errors=True)
        say("starting the Kubernetes control plane (etcd, kube-apiserver)")
        cp = KubeControlPlane(kube_dir(state), die_with_parent=False)
        try:
            cp.start()
        finally:
            record_control_plane(cp, state)
        say("starting the kubelet")
        kubelet = start_kubelet(cluster_file, state, cp.kubeconfig, state_root, workdir)
        say(f"waiting for {len(spec.nodes)} nodes to be Ready")
        wait_nodes_ready(cp, spec, kubelet)
        cluster = KubeCluster(spec, layout, state, cp.kubeconfig)
        if with_mesh and install == "processes":
            say("starting the mesh beside the cluster")
            start_mesh(cluster)
        elif with_mesh and install == "helm":
            from localcluster.kube import meshchart
            from localcluster.kube.apiserver import kubectl

            say("installing the mesh's Helm charts")
            meshchart.install(cp.kubeconfig)
            say("waiting for the mesh to roll out")
            meshchart.wait_rolled_out(kubectl(), cp.kubeconfig, nodes=len(spec.nodes))
    except Exception as e:
        teardown(spec.name, state_root)
        raise KubeUpError(f"cluster {spec.name} did not come up: {e}") from e
    except BaseException:
        teardown(spec.name, state_root)
        raise
    return cluster
