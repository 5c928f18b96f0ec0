"""Bringing a whole local cluster up with the mesh, and down again.

Order of `up` (each step recorded before it happens, so `down` can always undo it):
network -> service VIP rules -> mesh config file -> CA (in the cluster netns; it only
serves a unix socket) -> one tunnel per node (in the node netns) -> capture rules in every
enrolled pod, then the pod named in its node's enrolment file -> wait until every tunnel
reports ready -> start the apps. Capture before the tunnel is ready fails closed: the
redirected connections are refused, never sent in plaintext around the tunnel.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

import nsutil
from localcluster.apps import INHERITED_ENV, start_apps
from localcluster.network import NetworkLayout, apply_service_rules, build_network, plan_layout
from localcluster.processes import spawn_in_netns
from localcluster.spec import ClusterSpec, load_cluster
from localcluster.state import ClusterState, teardown
from localcluster.xds import local_xds, workload_uid
from redirect.iptables import apply_inpod
from redirect.rules import InpodConfig

READINESS_PORT = 15021
READY_TIMEOUT = 60.0


class MeshUpError(RuntimeError):
    """The cluster could not be brought up; the message says which step and why."""


@dataclass(frozen=True, slots=True)
class MeshPaths:
    root: Path

    @property
    def xds(self) -> Path:
        return self.root / "xds.yaml"

    @property
    def ca_socket(self) -> Path:
        return self.root / "ca.sock"

    @property
    def tokens(self) -> Path:
        return self.root / "tokens.yaml"

    def token(self, node: str) -> Path:
        return self.root / f"token-{node}"

    def enrolment(self, node: str) -> Path:
        return self.root / f"enrolment-{node}.yaml"


@dataclass(frozen=True, slots=True)
class Cluster:
    """A running local cluster: what tests and the CLI need to reach into it."""

    spec: ClusterSpec
    layout: NetworkLayout
    state: ClusterState
    mesh: bool

    @property
    def paths(self) -> MeshPaths:
        return MeshPaths(self.state.dir / "mesh")

    def tunnel_log(self, node: str) -> Path:
        return self.state.log_dir / f"ztunnel-{node}.log"

    def pod_netns(self, namespace: str, name: str) -> str:
        return self.layout.pod(namespace, name).netns_path


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.chmod(mode)
    tmp.replace(path)  # atomic: the tunnel's watcher never sees half a file


def write_mesh_config(spec: ClusterSpec, paths: MeshPaths) -> None:
    _write(paths.xds, yaml.safe_dump(local_xds(spec), sort_keys=False))


def _policy_key(doc: Any) -> tuple[str, str, str]:
    """(kind, namespace, name) of a policy entry in either accepted shape."""
    if not isinstance(doc, dict):
        raise ValueError(f"a policy must be a mapping, got {type(doc).__name__}")
    meta = doc.get("metadata") if ("kind" in doc or "metadata" in doc) else doc
    if not isinstance(meta, dict) or not meta.get("name"):
        raise ValueError("a policy needs metadata.name (or name)")
    kind = str(doc.get("kind", "AuthorizationPolicy"))
    return kind, str(meta.get("namespace", "")), str(meta["name"])


def read_policies(cluster: Cluster) -> list[Any]:
    doc = yaml.safe_load(cluster.paths.xds.read_text()) or {}
    return list(doc.get("policies") or [])


def apply_policies(cluster: Cluster, docs: list[Any]) -> list[str]:
    """Create or replace policies in the running mesh (the tunnels pick the change up
    without a restart). Returns the `kind namespace/name` of each one applied."""
    doc = yaml.safe_load(cluster.paths.xds.read_text()) or {}
    current = list(doc.get("policies") or [])
    applied = []
    for new in docs:
        key = _policy_key(new)
        current = [p for p in current if _policy_key(p) != key]
        current.append(new)
        applied.append(f"{key[0]} {key[1]}/{key[2]}")
    doc["policies"] = current
    _write(cluster.paths.xds, yaml.safe_dump(doc, sort_keys=False))
    return applied


def delete_policy(cluster: Cluster, kind: str, namespace: str, name: str) -> bool:
    doc = yaml.safe_load(cluster.paths.xds.read_text()) or {}
    current = list(doc.get("policies") or [])
    kept = [p for p in current if _policy_key(p) != (kind, namespace, name)]
    doc["policies"] = kept
    _write(cluster.paths.xds, yaml.safe_dump(doc, sort_keys=False))
    return len(kept) != len(current)


def enrolled_uids(spec: ClusterSpec, node: str) -> set[str]:
    return {workload_uid(spec, p) for p in spec.pods_on(node) if p.enrolled(spec)}


def write_enrolment(spec: ClusterSpec, layout: NetworkLayout, paths: MeshPaths, node: str) -> None:
    pods = [
        {
            "uid": workload_uid(spec, p),
            "netns": layout.pod(p.namespace, p.name).netns_path,
        }
        for p in spec.pods_on(node)
        if p.enrolled(spec)
    ]
    _write(paths.enrolment(node), yaml.safe_dump({"pods": pods}, sort_keys=False))


def _python() -> str:
    return sys.executable


def start_control_plane(spec: ClusterSpec, layout: NetworkLayout, state: ClusterState) -> None:
    paths = MeshPaths(state.dir / "mesh")
    tokens = {}
    for node in spec.nodes:
        token = secrets.token_hex(32)
        tokens[token] = node.name
        _write(paths.token(node.name), token, mode=0o600)
    _write(paths.tokens, yaml.safe_dump(tokens), mode=0o600)
    spawn_in_netns(
        layout.cluster_netns_path,
        [
            _python(),
            "-m",
            "controlplane.ca_server",
            "--state-dir",
            str(state.dir),
            "--socket",
            str(paths.ca_socket),
            "--tokens-file",
            str(paths.tokens),
            "--trust-domain",
            spec.trust_domain,
            "--workloads-file",
            str(paths.xds),
        ],
        _base_env(),
        Path.cwd(),
        state.log_dir / "ca.log",
        state.pidfile_dir,
        "ca",
    )
    _wait_for(
        lambda: paths.ca_socket.exists(), 15.0, "the CA socket to appear", state.log_dir / "ca.log"
    )


def _base_env() -> dict[str, str]:
    env = {k: os.environ[k] for k in INHERITED_ENV if k in os.environ}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_tunnel(
    spec: ClusterSpec, layout: NetworkLayout, state: ClusterState, node: str, name: str = ""
) -> None:
    paths = MeshPaths(state.dir / "mesh")
    env = _base_env()
    env.update(
        {
            "NODE_NAME": node,
            "LOCAL_XDS_PATH": str(paths.xds),
            "ENROLMENT_PATH": str(paths.enrolment(node)),
            "CA_ADDRESS": str(paths.ca_socket),
            "CA_TOKEN_PATH": str(paths.token(node)),
            "TRUST_DOMAIN": spec.trust_domain,
        }
    )
    pname = name or f"ztunnel-{node}"
    spawn_in_netns(
        layout.node(node).netns_path,
        [_python(), "-m", "ztunnel"],
        env,
        Path.cwd(),
        state.log_dir / f"{pname}.log",
        state.pidfile_dir,
        pname,
    )


def enrol_pods(spec: ClusterSpec, layout: NetworkLayout, state: ClusterState) -> None:
    paths = MeshPaths(state.dir / "mesh")
    cfg = InpodConfig()
    for pod in spec.pods:
        if pod.enrolled(spec):
            apply_inpod(layout.pod(pod.namespace, pod.name).netns_path, cfg)
    for node in spec.nodes:
        write_enrolment(spec, layout, paths, node.name)


def node_http(
    layout: NetworkLayout,
    node: str,
    port: int,
    path: str,
    method: str = "GET",
    timeout: float = 5.0,
) -> tuple[int, bytes]:
    """One HTTP/1.0 request to a port of a node's tunnel on 127.0.0.1, from inside the node
    netns (the admin port listens nowhere else). Raises OSError when unreachable."""
    s = nsutil.socket_at(layout.node(node).netns_path)
    try:
        s.settimeout(timeout)
        s.connect(("127.0.0.1", port))
        s.sendall(f"{method} {path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    finally:
        s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        raise OSError(f"not an HTTP response from port {port} on node {node}") from None
    return status, body


def tunnel_status(layout: NetworkLayout, node: str, timeout: float = 2.0) -> dict[str, Any] | None:
    """GET /healthz/ready of a node's tunnel, from inside the node netns."""
    try:
        _, body = node_http(layout, node, READINESS_PORT, "/healthz/ready", timeout=timeout)
        doc = json.loads(body)
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def wait_ready(cluster: Cluster, timeout: float = READY_TIMEOUT) -> None:
    want = {n.name: enrolled_uids(cluster.spec, n.name) for n in cluster.spec.nodes}

    def node_ready(node: str) -> bool:
        # Ready alone is not enough: a tunnel that has not yet read the new enrolment
        # file is ready with no pods. It must also hold exactly the pods it was given.
        status = tunnel_status(cluster.layout, node) or {}
        pods = status.get("pods")
        return bool(status.get("ready")) and isinstance(pods, dict) and set(pods) == want[node]

    def all_ready() -> bool:
        return all(node_ready(n) for n in want)

    _wait_for(all_ready, timeout, "every tunnel to report ready", cluster.state.log_dir)


def _wait_for(cond: Any, timeout: float, what: str, logs: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise MeshUpError(f"timed out after {timeout:.0f} s waiting for {what}; see the logs in {logs}")


def up(
    cluster_file: Path | str, state_root: Path | str | None = None, mesh: bool = True
) -> Cluster:
    spec = load_cluster(cluster_file)
    state = ClusterState.open(spec.name, state_root)
    try:
        layout = build_network(spec, state)
        apply_service_rules(spec, layout)
        cluster = Cluster(spec, layout, state, mesh)
        if mesh:
            cluster.paths.root.mkdir(parents=True, exist_ok=True)
            write_mesh_config(spec, cluster.paths)
            for node in spec.nodes:  # empty until the pods are captured
                _write(cluster.paths.enrolment(node.name), "pods: []\n")
            start_control_plane(spec, layout, state)
            for node in spec.nodes:
                start_tunnel(spec, layout, state, node.name)
            enrol_pods(spec, layout, state)
            wait_ready(cluster)
        start_apps(spec, layout, state)
        _wait_apps(cluster)
    except BaseException:
        teardown(spec.name, state_root)
        raise
    return cluster


def _wait_apps(cluster: Cluster, timeout: float = 15.0) -> None:
    """Wait until each pod with a listening app port (a service target) accepts."""
    targets = []
    for svc in cluster.spec.services:
        for pod in cluster.spec.endpoints(svc):
            for port in svc.ports:
                targets.append((cluster.layout.pod(pod.namespace, pod.name), port.target_port))

    def accepting() -> bool:
        return all(_port_open(where.netns_path, str(where.ip), port) for where, port in targets)

    _wait_for(accepting, timeout, "the apps to listen", cluster.state.log_dir)


def _port_open(netns_path: str, ip: str, port: int) -> bool:
    s = nsutil.socket_at(netns_path)
    try:
        # Marked like the tunnel's own sockets so the probe is not captured.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 0x539)
        s.settimeout(0.5)
        s.connect((ip, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def attach(cluster_file: Path | str, state_root: Path | str | None = None) -> Cluster:
    """The handle of an already running cluster (for the CLI's other commands)."""
    spec = load_cluster(cluster_file)
    state = ClusterState.open(spec.name, state_root)
    return Cluster(spec, plan_layout(spec), state, (state.dir / "mesh").exists())


def down(name: str, state_root: Path | str | None = None) -> None:
    teardown(name, state_root)
