"""Bringing a whole local cluster up with the mesh, and down again.

Order of `up` (each step recorded before it happens, so `down` can always undo it):
network -> service VIP rules -> mesh config file -> pod source file -> CA (in the cluster
netns; it only serves a unix socket) -> per node, in the node netns: the node agent (it
captures each enrolled pod and hands it to the tunnel over ZDS) and the tunnel -> wait
until every agent reports its pods enrolled and every tunnel ready with exactly those
pods -> start the apps. Capture before the tunnel is ready fails closed: the redirected
connections are refused, never sent in plaintext around the tunnel.

Enrolment is by labels at runtime (`label_namespace`, `label_pod`): the pod source file
(`<state>/mesh/pods.json`, what a Kubernetes API server would say) and the mesh config's
workloads are rewritten, and the agents and tunnels follow without restarting any app.
The labels in force live in the pod source file; `current_spec` overlays them on the
cluster file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

import nsutil
from localcluster.apps import INHERITED_ENV, start_apps
from localcluster.network import NetworkLayout, apply_service_rules, build_network, plan_layout
from localcluster.processes import (
    ManagedProcess,
    ProcessRecord,
    proc_stat,
    read_records,
    spawn_in_netns,
    terminate,
)
from localcluster.spec import ClusterSpec, NamespaceSpec, PodSpec, load_cluster
from localcluster.state import ClusterState, live_netns, teardown
from localcluster.xds import local_xds, workload, workload_uid
from meshcore.defaults import ADMIN_PORT, READINESS_PORT, TUNNEL_MARK
from redirect.enrolment import PodInfo, SourceError, parse_source, pod_doc, wanted

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

    @property
    def pods(self) -> Path:
        """The pod source every node agent watches (namespaces and pods with labels)."""
        return self.root / "pods.json"

    def zds_socket(self, node: str) -> Path:
        return self.root / f"zds-{node}.sock"

    def agent_status(self, node: str) -> Path:
        return self.root / f"agent-{node}.json"

    @property
    def redirect_mode(self) -> Path:
        """The capture mode the cluster's agents run in (restarts keep it)."""
        return self.root / "redirect-mode"


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

    def agent_log(self, node: str) -> Path:
        return self.state.log_dir / f"{agent_name(node)}.log"

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


# ---- the pod source (what the node agents watch) -------------------------------------


def pod_info(spec: ClusterSpec, layout: NetworkLayout, pod: PodSpec) -> PodInfo:
    return PodInfo(
        uid=workload_uid(spec, pod),
        name=pod.name,
        namespace=pod.namespace,
        node=pod.node,
        service_account=pod.service_account,
        ip=pod.ip,
        netns=layout.pod(pod.namespace, pod.name).netns_path,
        labels=pod.labels,
    )


def pod_source_doc(spec: ClusterSpec, layout: NetworkLayout) -> dict[str, Any]:
    """The pod source document for the whole cluster (pure)."""
    return {
        "version": 1,
        "namespaces": {ns.name: {"labels": dict(ns.labels)} for ns in spec.namespaces},
        "pods": [pod_doc(pod_info(spec, layout, p)) for p in spec.pods],
    }


def write_pod_source(paths: MeshPaths, doc: dict[str, Any]) -> None:
    _write(paths.pods, json.dumps(doc, indent=2, sort_keys=True) + "\n")


def read_pod_source(cluster: Cluster) -> dict[str, Any]:
    doc = json.loads(cluster.paths.pods.read_text())
    if not isinstance(doc, dict):
        raise ValueError(f"{cluster.paths.pods}: not a pod source document")
    return doc


def current_spec(cluster: Cluster) -> ClusterSpec:
    """The cluster file's spec with the labels in force now (from the pod source file)."""
    try:
        doc = read_pod_source(cluster)
    except (OSError, ValueError):
        return cluster.spec
    ns_labels = {
        name: dict(entry.get("labels") or {})
        for name, entry in (doc.get("namespaces") or {}).items()
    }
    pod_labels = {
        (p["namespace"], p["name"]): dict(p.get("labels") or {}) for p in doc.get("pods") or []
    }
    spec = cluster.spec
    namespaces = tuple(
        NamespaceSpec(ns.name, MappingProxyType(ns_labels.get(ns.name, dict(ns.labels))))
        for ns in spec.namespaces
    )
    pods = tuple(
        dataclasses.replace(
            p, labels=MappingProxyType(pod_labels.get((p.namespace, p.name), dict(p.labels)))
        )
        for p in spec.pods
    )
    return dataclasses.replace(spec, namespaces=namespaces, pods=pods)


def _apply_label(labels: dict[str, str], key: str, value: str | None) -> None:
    if not key:
        raise ValueError("a label needs a key")
    if value is None:
        labels.pop(key, None)
    else:
        labels[key] = value


def label_namespace(cluster: Cluster, namespace: str, key: str, value: str | None) -> None:
    """Set (or with None remove) a namespace label in the running cluster: the agents
    enrol or release its pods, and the mesh config follows (HBONE only when enrolled)."""
    doc = read_pod_source(cluster)
    entry = (doc.get("namespaces") or {}).get(namespace)
    if entry is None:
        raise KeyError(f"no namespace {namespace!r} in cluster {cluster.spec.name!r}")
    labels = dict(entry.get("labels") or {})
    _apply_label(labels, key, value)
    entry["labels"] = labels
    _publish(cluster, doc)


def label_pod(cluster: Cluster, namespace: str, name: str, key: str, value: str | None) -> None:
    """Set (or with None remove) a pod label in the running cluster."""
    doc = read_pod_source(cluster)
    for entry in doc.get("pods") or []:
        if entry.get("namespace") == namespace and entry.get("name") == name:
            labels = dict(entry.get("labels") or {})
            _apply_label(labels, key, value)
            entry["labels"] = labels
            _publish(cluster, doc)
            return
    raise KeyError(f"no pod {namespace}/{name} in cluster {cluster.spec.name!r}")


def _publish(cluster: Cluster, doc: dict[str, Any]) -> None:
    # The pod source first, as the API server would change first; then the mesh config,
    # where a workload's protocol and labels are derived from it (as istiod derives them).
    try:
        parse_source(json.dumps(doc), "")
    except SourceError as e:
        raise ValueError(f"label change rejected: {e}") from None
    write_pod_source(cluster.paths, doc)
    spec = current_spec(cluster)
    xds = yaml.safe_load(cluster.paths.xds.read_text()) or {}
    xds["workloads"] = [workload(spec, p) for p in spec.pods]
    _write(cluster.paths.xds, yaml.safe_dump(xds, sort_keys=False))
    # Service endpoints are chosen by pod labels: keep the nodes' service rules in step.
    apply_service_rules(spec, cluster.layout)


def wanted_uids(cluster: Cluster, node: str) -> set[str]:
    """The pods of `node` an agent should enrol now, by the agents' own rule."""
    try:
        view = parse_source(cluster.paths.pods.read_text(), node)
    except (OSError, SourceError):
        return enrolled_uids(current_spec(cluster), node)
    return set(wanted(view))


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


def tunnel_name(node: str) -> str:
    return f"ztunnel-{node}"


def agent_name(node: str) -> str:
    return f"agent-{node}"


def start_tunnel(
    spec: ClusterSpec,
    layout: NetworkLayout,
    state: ClusterState,
    node: str,
    name: str = "",
    extra_env: Mapping[str, str] | None = None,
) -> ManagedProcess:
    """Start a node's tunnel. A distinct `name` starts a second one beside it (an upgrade
    overlap: SO_REUSEPORT listeners, and the agent sends new pods to the newest).
    `extra_env` adds tunnel settings (ztunnel/config.py), e.g. SAME_NODE_IN_PROCESS."""
    paths = MeshPaths(state.dir / "mesh")
    env = _base_env()
    env.update(
        {
            "NODE_NAME": node,
            "LOCAL_XDS_PATH": str(paths.xds),
            "CA_ADDRESS": str(paths.ca_socket),
            "CA_TOKEN_PATH": str(paths.token(node)),
            "TRUST_DOMAIN": spec.trust_domain,
        }
    )
    env["ZDS_SOCKET"] = str(paths.zds_socket(node))
    env.update(extra_env or {})
    pname = name or tunnel_name(node)
    return spawn_in_netns(
        layout.node(node).netns_path,
        [_python(), "-m", "ztunnel"],
        env,
        Path.cwd(),
        state.log_dir / f"{pname}.log",
        state.pidfile_dir,
        pname,
    )


def start_agent(
    spec: ClusterSpec,
    layout: NetworkLayout,
    state: ClusterState,
    node: str,
    redirect_mode: str = "iptables",
) -> ManagedProcess:
    """Start a node's agent in the node netns (it captures pods and serves ZDS)."""
    paths = MeshPaths(state.dir / "mesh")
    pname = agent_name(node)
    return spawn_in_netns(
        layout.node(node).netns_path,
        [
            _python(),
            "-m",
            "redirect.agent",
            "--node",
            node,
            "--pods-file",
            str(paths.pods),
            "--zds-socket",
            str(paths.zds_socket(node)),
            "--status-file",
            str(paths.agent_status(node)),
            "--redirect-mode",
            redirect_mode,
        ],
        _base_env(),
        Path.cwd(),
        state.log_dir / f"{pname}.log",
        state.pidfile_dir,
        pname,
    )


# ---- stopping and restarting one node's processes (upgrade and failure tests) ---------


def process_record(cluster: Cluster, name: str) -> ProcessRecord | None:
    """The record of a running process of the cluster, by its name."""
    for r in read_records(cluster.state.pidfile_dir):
        if r.name == name:
            st = proc_stat(r.pid)
            if st is not None and st[2] == r.start_time and st[0] != "Z":
                return r
    return None


def _stop(cluster: Cluster, name: str, sig: signal.Signals) -> bool:
    """Stop a recorded process (SIGTERM: graceful-then-forced; SIGKILL: at once).
    Returns whether it was running."""
    rec = process_record(cluster, name)
    if rec is None:
        return False
    if sig == signal.SIGKILL:
        st = proc_stat(rec.pid)
        try:
            if st is not None and st[1] == rec.pid:
                os.killpg(rec.pid, signal.SIGKILL)
            else:
                os.kill(rec.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    terminate([rec])  # waits until it is gone (escalating if SIGTERM is not enough)
    (cluster.state.pidfile_dir / f"{name}.pid").unlink(missing_ok=True)
    return True


def stop_agent(cluster: Cluster, node: str) -> bool:
    return _stop(cluster, agent_name(node), signal.SIGTERM)


def start_node_agent(cluster: Cluster, node: str) -> ManagedProcess:
    try:
        mode = cluster.paths.redirect_mode.read_text().strip() or "iptables"
    except FileNotFoundError:
        mode = "iptables"
    return start_agent(cluster.spec, cluster.layout, cluster.state, node, mode)


def restart_agent(cluster: Cluster, node: str) -> ManagedProcess:
    stop_agent(cluster, node)
    return start_node_agent(cluster, node)


def stop_tunnel(cluster: Cluster, node: str, name: str = "") -> bool:
    return _stop(cluster, name or tunnel_name(node), signal.SIGTERM)


def kill_tunnel(cluster: Cluster, node: str, name: str = "") -> bool:
    """SIGKILL: no drain, no goodbye; the agent sees the ZDS connection drop."""
    return _stop(cluster, name or tunnel_name(node), signal.SIGKILL)


def start_node_tunnel(
    cluster: Cluster, node: str, name: str = "", extra_env: Mapping[str, str] | None = None
) -> ManagedProcess:
    return start_tunnel(cluster.spec, cluster.layout, cluster.state, node, name, extra_env)


def restart_tunnel(cluster: Cluster, node: str) -> ManagedProcess:
    stop_tunnel(cluster, node)
    return start_node_tunnel(cluster, node)


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
    return netns_http(layout.node(node).netns_path, port, path, method, timeout)


def netns_http(
    netns_path: str, port: int, path: str, method: str = "GET", timeout: float = 5.0
) -> tuple[int, bytes]:
    """One HTTP/1.0 request to 127.0.0.1:`port` inside a netns: (status, body). Raises
    OSError when unreachable or when what answers is not HTTP."""
    s = nsutil.socket_at(netns_path)
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
        raise OSError(f"not an HTTP response from port {port} in {netns_path}") from None
    return status, body


def tunnel_status(layout: NetworkLayout, node: str, timeout: float = 2.0) -> dict[str, Any] | None:
    """GET /healthz/ready of a node's tunnel, from inside the node netns."""
    try:
        _, body = node_http(layout, node, READINESS_PORT, "/healthz/ready", timeout=timeout)
        doc = json.loads(body)
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def agent_status(cluster: Cluster, node: str) -> dict[str, Any] | None:
    """The node agent's status file, or None if there is none or its process is gone."""
    try:
        doc = json.loads(cluster.paths.agent_status(node).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or not doc.get("running"):
        return None
    rec = process_record(cluster, agent_name(node))
    if rec is None or rec.pid != doc.get("pid"):
        return None  # a file left by an agent that has since stopped
    return doc


def agent_pods(cluster: Cluster, node: str, state: str | None = None) -> dict[str, Any]:
    """uid -> the agent's entry for each pod it tracks (optionally only in `state`)."""
    doc = agent_status(cluster, node) or {}
    pods = doc.get("pods") or {}
    return {u: p for u, p in pods.items() if state is None or p.get("state") == state}


def node_ready(cluster: Cluster, node: str, want: set[str]) -> bool:
    """The agent has enrolled exactly `want` and the tunnel is ready holding exactly it."""
    agent = agent_status(cluster, node)
    if agent is None:
        return False
    pods = agent.get("pods") or {}
    if set(pods) != want or any(p.get("state") != "enrolled" for p in pods.values()):
        return False
    # Ready alone is not enough: a tunnel that has not yet been given the new pods is
    # ready with none. It must also hold exactly the pods it was given.
    status = tunnel_status(cluster.layout, node) or {}
    held = status.get("pods")
    return bool(status.get("ready")) and isinstance(held, dict) and set(held) == want


def _protocols(cluster: Cluster) -> dict[str, str]:
    """uid -> tunnel protocol, as the mesh config file says now."""
    doc = yaml.safe_load(cluster.paths.xds.read_text()) or {}
    return {str(w.get("uid")): str(w.get("protocol", "TCP")) for w in doc.get("workloads") or []}


def config_in_force(cluster: Cluster, node: str, protocols: dict[str, str]) -> bool:
    """Whether a node's tunnel has loaded the mesh config's workload protocols (after a
    label change, a tunnel must know which peers now speak HBONE)."""
    try:
        status, body = node_http(cluster.layout, node, ADMIN_PORT, "/config_dump", timeout=2.0)
        doc = json.loads(body)
    except (OSError, ValueError):
        return False
    if status != 200 or not isinstance(doc, dict):
        return False
    seen = {str(w.get("uid")): w.get("protocol") for w in doc.get("workloads") or []}
    return all(seen.get(uid) == proto for uid, proto in protocols.items())


def wait_ready(cluster: Cluster, timeout: float = READY_TIMEOUT) -> None:
    want = {n.name: wanted_uids(cluster, n.name) for n in cluster.spec.nodes}
    protocols = _protocols(cluster)

    def ready(node: str) -> bool:
        return node_ready(cluster, node, want[node]) and config_in_force(cluster, node, protocols)

    def all_ready() -> bool:
        return all(ready(n) for n in want)

    try:
        _wait_for(all_ready, timeout, "every tunnel to report ready", cluster.state.log_dir)
    except MeshUpError as e:
        raise MeshUpError(f"{e}; not ready: {_not_ready(cluster, want)}") from None


def _not_ready(cluster: Cluster, want: dict[str, set[str]]) -> str:
    """What each unready node lacks, for the error message."""
    out = []
    for node, uids in want.items():
        if node_ready(cluster, node, uids):
            continue
        agent = agent_status(cluster, node)
        tunnel = tunnel_status(cluster.layout, node)
        pods = {} if agent is None else agent.get("pods") or {}
        waiting = {u: f"{p.get('state')}: {p.get('reason')}" for u, p in pods.items()}
        if tunnel is None:
            held = "unreachable"
        else:
            held = f"ready={tunnel.get('ready')} pods={sorted(tunnel.get('pods') or {})}"
        running = "not running" if agent is None else waiting
        out.append(f"{node} (want {sorted(uids)}; agent {running}; tunnel {held})")
    return "; ".join(out) or "(ready now)"


def _wait_for(cond: Any, timeout: float, what: str, logs: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise MeshUpError(f"timed out after {timeout:.0f} s waiting for {what}; see the logs in {logs}")


def up(
    cluster_file: Path | str,
    state_root: Path | str | None = None,
    mesh: bool = True,
    redirect_mode: str = "iptables",
) -> Cluster:
    """Build the cluster; `redirect_mode` is the node agents' capture mode (iptables|ebpf)."""
    spec = load_cluster(cluster_file)
    running = live_netns(spec.name)
    if running:
        # Never tear down what this call did not build: another run may own it.
        raise MeshUpError(
            f"cluster {spec.name} is already up ({len(running)} network namespaces, e.g. "
            f"{running[0]}); run `ambientctl down {spec.name}` first"
        )
    state = ClusterState.open(spec.name, state_root)
    try:
        layout = build_network(spec, state)
        apply_service_rules(spec, layout)
        cluster = Cluster(spec, layout, state, mesh)
        if mesh:
            cluster.paths.root.mkdir(parents=True, exist_ok=True)
            write_mesh_config(spec, cluster.paths)
            write_pod_source(cluster.paths, pod_source_doc(spec, layout))
            _write(cluster.paths.redirect_mode, redirect_mode + "\n")
            start_control_plane(spec, layout, state)
            for node in spec.nodes:
                start_agent(spec, layout, state, node.name, redirect_mode)
                start_tunnel(spec, layout, state, node.name)
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
        s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, TUNNEL_MARK)
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
