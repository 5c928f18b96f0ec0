"""A local cluster's nodes played by the kubelet for the session's real API server.

Each test gets nodes of its own (random names: Node objects are cluster-wide and the API
server is shared) and namespaces of its own; afterwards its namespaces and Node objects are
deleted and the cluster torn down, and the test fails if any pod netns or process is left.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import netns as pr_netns

from localcluster.kube.apiserver import KubeControlPlane
from localcluster.kube.cluster import start_kubelet
from localcluster.network import NetworkLayout, build_network
from localcluster.processes import ManagedProcess, is_running, read_records
from localcluster.spec import ClusterSpec, load_cluster
from localcluster.state import ClusterState, teardown
from nsutil import netns_path

from ..cluster_factory import random_cluster_name

DEMO = Path(__file__).resolve().parents[3] / "demo"


@dataclass
class KubeNodes:
    cp: KubeControlPlane
    spec: ClusterSpec
    layout: NetworkLayout
    state: ClusterState
    kubelet: ManagedProcess
    namespaces: list[str] = field(default_factory=list)

    def node(self, i: int) -> str:
        return self.spec.nodes[i].name

    def api(self, method: str, path: str, body: object | None = None) -> Any:
        status, data = self.cp.request(method, path, body)
        if status >= 400:
            raise AssertionError(f"{method} {path}: HTTP {status}: {data[:300]!r}")
        return json.loads(data) if data else None

    def try_api(self, method: str, path: str, body: object | None = None) -> tuple[int, Any]:
        status, data = self.cp.request(method, path, body)
        try:
            return status, json.loads(data) if data else None
        except ValueError:
            return status, None

    def namespace(self, prefix: str = "t") -> str:
        ns = f"{prefix}-{secrets.token_hex(3)}"
        self.api("POST", "/api/v1/namespaces", {"metadata": {"name": ns}})
        self.namespaces.append(ns)
        return ns

    def pods(self, ns: str, selector: str = "") -> list[dict[str, Any]]:
        q = f"?labelSelector={selector}" if selector else ""
        items: list[dict[str, Any]] = self.api("GET", f"/api/v1/namespaces/{ns}/pods{q}")["items"]
        return items

    def kubelet_log(self) -> str:
        """What a failed wait prints: the kubelet's log (with its threads' stacks, which it
        prints on SIGUSR1) and the test's pods' status."""
        if is_running(self.kubelet.pid, self.kubelet.record.start_time):
            os.kill(self.kubelet.pid, signal.SIGUSR1)
            time.sleep(0.5)
        try:
            text = Path(self.kubelet.record.log_path).read_text()[-8000:]
        except OSError:
            text = "(no kubelet log)"
        alive = is_running(self.kubelet.pid, self.kubelet.record.start_time)
        text += (
            f"\nkubelet pid {self.kubelet.pid} running: {alive}, exit {self.kubelet.popen.poll()}"
        )
        for ns in self.namespaces:
            _, body = self.try_api("GET", f"/api/v1/namespaces/{ns}/pods")
            for p in (body or {}).get("items") or []:
                text += f"\npod {ns}/{p['metadata']['name']}: {json.dumps(p.get('status'))}"
        return text


def wait_for(cond: Callable[[], Any], timeout: float, what: str, log: Callable[[], str]) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}\n{log()}")


def pod_ready(pod: dict[str, Any]) -> bool:
    conds = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conds)


@pytest.fixture
def kube_nodes(kube_cp: KubeControlPlane, tmp_path: Path) -> Iterator[KubeNodes]:
    name = random_cluster_name()
    tag = secrets.token_hex(2)
    cluster_file = tmp_path / "cluster.yaml"
    # Node names carry the test's tag: the shared API server must not mix tests' nodes.
    cluster_file.write_text(
        f"name: {name}\nnodes:\n  - name: a{tag}\n  - name: b{tag}\n", encoding="utf-8"
    )
    state_root = tmp_path / "state"
    spec = load_cluster(cluster_file)
    # Pod commands run from demo/, as with demo/travel-kube-cluster.yaml.
    state = ClusterState.open(spec.name, state_root)
    nodes: KubeNodes | None = None
    try:
        layout = build_network(spec, state)
        kubelet = start_kubelet(cluster_file, state, kube_cp.kubeconfig, state_root, DEMO)
        nodes = KubeNodes(kube_cp, spec, layout, state, kubelet)
        yield nodes
    finally:
        if nodes is not None:
            _delete_objects(nodes)
        recorded = ClusterState.load(name, state_root)
        pidfiles = read_records(state.pidfile_dir)
        teardown(name, state_root)
    left = [n for n in pr_netns.listnetns() if n.startswith(f"{name}-")]
    left += [n for n in (recorded.netns if recorded else []) if os.path.exists(netns_path(n))]
    assert not left, f"teardown left namespaces behind: {left}"
    alive = [r for r in pidfiles if is_running(r.pid, r.start_time)]
    assert not alive, f"teardown left processes behind: {alive}"


def _delete_objects(nodes: KubeNodes) -> None:
    """The test's namespaces (the kubelet still runs: it confirms the pods' deletion), then
    its Node objects, so the scheduler never places a later test's pods on them."""
    alive = is_running(nodes.kubelet.pid, nodes.kubelet.record.start_time)
    for ns in nodes.namespaces:
        # Then its pods at once, rather than on the namespace controller's next pass,
        # seconds later; a terminating namespace takes no replacement pods.
        nodes.try_api("DELETE", f"/api/v1/namespaces/{ns}")
        nodes.try_api("DELETE", f"/api/v1/namespaces/{ns}/pods")
        if not alive:  # nobody will confirm the pods' deletion: force it
            _, body = nodes.try_api("GET", f"/api/v1/namespaces/{ns}/pods")
            for p in (body or {}).get("items") or []:
                path = f"/api/v1/namespaces/{ns}/pods/{p['metadata']['name']}"
                nodes.try_api("DELETE", path, {"gracePeriodSeconds": 0})
    deadline = time.monotonic() + 30
    for ns in nodes.namespaces:
        while time.monotonic() < deadline:
            status, body = nodes.try_api("GET", f"/api/v1/namespaces/{ns}/pods")
            if status != 200 or not (body or {}).get("items"):
                break
            time.sleep(0.2)
    for n in nodes.spec.nodes:
        nodes.try_api("DELETE", f"/api/v1/nodes/{n.name}")
