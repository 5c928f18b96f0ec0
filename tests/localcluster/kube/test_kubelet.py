"""The local kubelet against the real API server: nodes, pods, probes, deletion, VIPs."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import nsutil
from kube.podnetns import netns_name
from localcluster.kube.cluster import start_kubelet
from localcluster.kube.kubelet import process_name
from localcluster.processes import ProcessRecord, is_running
from localcluster.state import teardown

from .conftest import DEMO, KubeNodes, pod_ready, wait_for

pytestmark = [pytest.mark.kube, pytest.mark.netns]

SLOWAPP = str(Path(__file__).with_name("slowapp.py"))
PORT = 8080


def deployment(name: str, replicas: int, delay: float, node: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": 5,
        "containers": [
            {
                "name": "app",
                "image": "local/slowapp:1",
                "command": ["python", SLOWAPP],
                "args": [str(PORT), str(delay)],
                "env": [
                    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
                ],
                "readinessProbe": {
                    "httpGet": {"path": "/healthz", "port": PORT},
                    "periodSeconds": 1,
                },
            }
        ],
    }
    if node is not None:
        spec["nodeSelector"] = {"kubernetes.io/hostname": node}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": spec},
        },
    }


def http_get(netns_path: str, ip: str, port: int, path: str = "/") -> tuple[int, bytes]:
    s = nsutil.socket_at(netns_path)
    try:
        s.settimeout(5)
        s.connect((ip, port))
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: {ip}\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    finally:
        s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def same_netns(pid: int, netns_path: str) -> bool:
    a, b = os.stat(f"/proc/{pid}/ns/net"), os.stat(netns_path)
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def pod_process(k: KubeNodes, uid: str) -> ProcessRecord:
    pidfile = k.state.pidfile_dir / f"{process_name(uid)}.pid"
    return ProcessRecord.from_json(pidfile.read_text())


def test_nodes_registered_ready_with_lease(kube_nodes: KubeNodes) -> None:
    k = kube_nodes

    def ready() -> bool:
        for n in k.spec.nodes:
            status, node = k.try_api("GET", f"/api/v1/nodes/{n.name}")
            if status != 200:
                return False
            conds = {c["type"]: c["status"] for c in node["status"].get("conditions") or []}
            if conds.get("Ready") != "True":
                return False
        return True

    wait_for(ready, 30, "both nodes Ready", k.kubelet_log)
    for n in k.spec.nodes:
        node = k.api("GET", f"/api/v1/nodes/{n.name}")
        assert node["metadata"]["labels"]["kubernetes.io/hostname"] == n.name
        assert node["metadata"]["labels"]["kubernetes.io/os"] == "linux"
        assert node["spec"]["podCIDR"] == str(n.pod_cidr)
        addresses = {a["type"]: a["address"] for a in node["status"]["addresses"]}
        assert addresses["InternalIP"] == str(n.ip)
        assert node["status"]["allocatable"]["pods"] == "110"
        lease = k.api(
            "GET", f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{n.name}"
        )
        assert lease["spec"]["holderIdentity"] == n.name


def test_deployment_pods_run_in_their_netns_and_ready_only_after_probe(
    kube_nodes: KubeNodes,
) -> None:
    k = kube_nodes
    ns = k.namespace()
    k.api("POST", f"/apis/apps/v1/namespaces/{ns}/deployments", deployment("web", 2, 4.0))
    seen_unready: set[str] = set()

    def running_with_ip() -> list[dict[str, Any]]:
        pods = k.pods(ns, "app=web")
        for p in pods:
            st = p.get("status") or {}
            if st.get("phase") == "Running" and st.get("podIP") and not pod_ready(p):
                seen_unready.add(p["metadata"]["name"])
        return pods if len(pods) == 2 and all(pod_ready(p) for p in pods) else []

    pods = wait_for(running_with_ip, 60, "2 Ready pods", k.kubelet_log)
    # Each was seen Running with an address but not Ready: the app listens 4 s after start.
    assert seen_unready == {p["metadata"]["name"] for p in pods}
    node_ips = {str(n.ip) for n in k.spec.nodes}
    for p in pods:
        uid, name = p["metadata"]["uid"], p["metadata"]["name"]
        st = p["status"]
        node = next(n for n in k.layout.nodes if n.name == p["spec"]["nodeName"])
        assert st["podIPs"] == [{"ip": st["podIP"]}]
        assert st["hostIP"] == str(node.ip) and st["podIP"] not in node_ips
        assert st["containerStatuses"][0]["ready"] is True
        netns = nsutil.netns_path(netns_name(uid))
        assert os.path.exists(netns)
        proc = pod_process(k, uid)
        assert is_running(proc.pid, proc.start_time) and same_netns(proc.pid, netns)
        # From the node's netns, as a kubelet's probe: the app answers with its own name.
        assert http_get(node.netns_path, st["podIP"], PORT) == (200, name.encode())
    assert len({p["status"]["podIP"] for p in pods}) == 2


def test_deleted_pod_leaves_no_netns_process_or_object(kube_nodes: KubeNodes) -> None:
    k = kube_nodes
    ns = k.namespace()
    pod = {
        "metadata": {"name": "solo"},
        "spec": {
            "automountServiceAccountToken": False,
            "terminationGracePeriodSeconds": 5,
            "containers": [
                {"name": "app", "image": "x", "command": ["python", SLOWAPP, str(PORT), "0"]}
            ],
        },
    }
    k.api("POST", f"/api/v1/namespaces/{ns}/pods", pod)
    got = wait_for(
        lambda: [p for p in k.pods(ns) if pod_ready(p)], 30, "the pod Ready", k.kubelet_log
    )
    uid = got[0]["metadata"]["uid"]
    proc = pod_process(k, uid)
    netns = nsutil.netns_path(netns_name(uid))
    assert os.path.exists(netns) and is_running(proc.pid, proc.start_time)
    k.api("DELETE", f"/api/v1/namespaces/{ns}/pods/solo")

    def gone() -> bool:
        status, _ = k.try_api("GET", f"/api/v1/namespaces/{ns}/pods/solo")
        return status == 404

    wait_for(gone, 30, "the Pod object to be gone", k.kubelet_log)
    assert not os.path.exists(netns)
    assert not is_running(proc.pid, proc.start_time)
    assert netns_name(uid) not in (type(k.state).load(k.spec.name, k.state.dir.parent).netns)  # type: ignore[union-attr]


def test_host_network_pod_runs_in_node_netns(kube_nodes: KubeNodes) -> None:
    k = kube_nodes
    ns = k.namespace()
    node = k.layout.nodes[1]
    pod = {
        "metadata": {"name": "hostnet"},
        "spec": {
            "automountServiceAccountToken": False,
            "hostNetwork": True,
            "nodeName": node.name,
            "terminationGracePeriodSeconds": 2,
            "containers": [
                {
                    "name": "app",
                    "image": "x",
                    "command": ["python3", SLOWAPP, "18080", "0"],
                    "readinessProbe": {"tcpSocket": {"port": 18080}, "periodSeconds": 1},
                }
            ],
        },
    }
    k.api("POST", f"/api/v1/namespaces/{ns}/pods", pod)
    got = wait_for(
        lambda: [p for p in k.pods(ns) if pod_ready(p)], 30, "the pod Ready", k.kubelet_log
    )
    st = got[0]["status"]
    assert st["podIP"] == st["hostIP"] == str(node.ip)
    uid = got[0]["metadata"]["uid"]
    assert not os.path.exists(nsutil.netns_path(netns_name(uid)))
    proc = pod_process(k, uid)
    assert same_netns(proc.pid, node.netns_path)


def test_exited_container_fails_or_restarts_per_policy(kube_nodes: KubeNodes) -> None:
    k = kube_nodes
    ns = k.namespace()
    nocmd = {
        "metadata": {"name": "nocmd"},
        "spec": {
            "automountServiceAccountToken": False,
            "containers": [{"name": "c", "image": "x"}],
        },
    }
    k.api("POST", f"/api/v1/namespaces/{ns}/pods", nocmd)
    for name, policy in (("never", "Never"), ("always", "Always")):
        pod = {
            "metadata": {"name": name},
            "spec": {
                "automountServiceAccountToken": False,
                "restartPolicy": policy,
                "containers": [
                    {"name": "c", "image": "x", "command": ["python", "-c", "raise SystemExit(3)"]}
                ],
            },
        }
        k.api("POST", f"/api/v1/namespaces/{ns}/pods", pod)

    def settled() -> dict[str, dict[str, Any]]:
        pods = {p["metadata"]["name"]: p for p in k.pods(ns)}
        never = (pods.get("never") or {}).get("status") or {}
        always = (pods.get("always") or {}).get("status") or {}
        restarts = (always.get("containerStatuses") or [{}])[0].get("restartCount", 0)
        waiting = ((pods.get("nocmd") or {}).get("status") or {}).get("containerStatuses")
        done = never.get("phase") == "Failed" and restarts >= 2 and waiting
        return pods if done else {}

    pods = wait_for(settled, 40, "Never -> Failed, Always -> restarted twice", k.kubelet_log)
    term = pods["never"]["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 3
    assert pods["always"]["status"]["phase"] == "Running"
    # A container without a command cannot run (no image to take an entrypoint from).
    nocmd_status = pods["nocmd"]["status"]
    assert nocmd_status["phase"] == "Pending"
    waiting = nocmd_status["containerStatuses"][0]["state"]["waiting"]
    assert waiting["reason"] == "CreateContainerError" and "no command" in waiting["message"]


def test_a_restarted_kubelet_replaces_its_predecessors_pods(kube_nodes: KubeNodes) -> None:
    k = kube_nodes
    ns = k.namespace()
    pod = {
        "metadata": {"name": "again"},
        "spec": {
            "automountServiceAccountToken": False,
            "containers": [
                {"name": "app", "image": "x", "command": ["python", SLOWAPP, str(PORT), "0"]}
            ],
        },
    }
    k.api("POST", f"/api/v1/namespaces/{ns}/pods", pod)
    got = wait_for(
        lambda: [p for p in k.pods(ns) if pod_ready(p)], 30, "the pod Ready", k.kubelet_log
    )
    uid = got[0]["metadata"]["uid"]
    old = pod_process(k, uid)
    os.kill(k.kubelet.pid, signal.SIGKILL)
    k.kubelet.popen.wait(timeout=10)
    cluster_file = Path(k.kubelet.record.argv[k.kubelet.record.argv.index("--cluster-file") + 1])
    k.kubelet = start_kubelet(cluster_file, k.state, k.cp.kubeconfig, k.state.dir.parent, DEMO)

    def replaced() -> bool:
        try:
            new = pod_process(k, uid)
        except (OSError, ValueError):
            return False
        return new.pid != old.pid and is_running(new.pid, new.start_time)

    wait_for(replaced, 30, "a new process for the pod", k.kubelet_log)
    assert not is_running(old.pid, old.start_time)
    new = pod_process(k, uid)
    node = next(n for n in k.layout.nodes if n.name == got[0]["spec"]["nodeName"])

    def serving() -> tuple[int, bytes] | None:
        ip = (k.pods(ns)[0].get("status") or {}).get("podIP")
        return _try_get(node.netns_path, ip) if ip else None

    answer = wait_for(serving, 30, "the new process to serve", k.kubelet_log)
    assert answer == (200, b"again")
    assert same_netns(new.pid, nsutil.netns_path(netns_name(uid)))


def _try_get(netns_path: str, ip: str) -> tuple[int, bytes] | None:
    try:
        return http_get(netns_path, ip, PORT)
    except OSError:
        return None


def test_teardown_after_a_kubelet_crash_removes_its_pods(kube_nodes: KubeNodes) -> None:
    k = kube_nodes
    ns = k.namespace()
    pod = {
        "metadata": {"name": "orphan"},
        "spec": {
            "automountServiceAccountToken": False,
            "containers": [
                {"name": "app", "image": "x", "command": ["python", SLOWAPP, str(PORT), "0"]}
            ],
        },
    }
    k.api("POST", f"/api/v1/namespaces/{ns}/pods", pod)
    got = wait_for(
        lambda: [p for p in k.pods(ns) if pod_ready(p)], 30, "the pod Ready", k.kubelet_log
    )
    uid = got[0]["metadata"]["uid"]
    proc = pod_process(k, uid)
    os.kill(k.kubelet.pid, signal.SIGKILL)  # no goodbye: only the cluster's record is left
    k.kubelet.popen.wait(timeout=10)
    assert is_running(proc.pid, proc.start_time)
    report = teardown(k.spec.name, k.state.dir.parent)
    assert netns_name(uid) in report.netns_removed
    assert not os.path.exists(nsutil.netns_path(netns_name(uid)))
    assert not is_running(proc.pid, proc.start_time)


def test_service_vip_reaches_ready_endpoints_from_another_node(kube_nodes: KubeNodes) -> None:
    k = kube_nodes
    ns = k.namespace()
    first, second = k.layout.nodes
    k.api(
        "POST",
        f"/apis/apps/v1/namespaces/{ns}/deployments",
        deployment("echo", 2, 0.0, node=second.name),
    )
    svc = k.api(
        "POST",
        f"/api/v1/namespaces/{ns}/services",
        {
            "metadata": {"name": "echo"},
            "spec": {"selector": {"app": "echo"}, "ports": [{"port": 80, "targetPort": PORT}]},
        },
    )
    vip = svc["spec"]["clusterIP"]
    pods = wait_for(
        lambda: [p for p in k.pods(ns, "app=echo") if pod_ready(p)][1:] and k.pods(ns, "app=echo"),
        60,
        "2 Ready echo pods",
        k.kubelet_log,
    )
    names = {p["metadata"]["name"] for p in pods}
    # A hostNetwork-less client: the first node's netns (a pod there routes the same way).
    served: set[str] = set()

    def through_vip() -> bool:
        try:
            status, body = http_get(first.netns_path, vip, 80)
        except OSError:
            return False
        served.add(body.decode())
        return status == 200 and served == names

    deadline = time.monotonic() + 30
    while not through_vip():
        assert time.monotonic() < deadline, f"served by {served}, want {names}\n{k.kubelet_log()}"
        time.sleep(0.1)
    assert socket.inet_aton(vip)  # a real IPv4 VIP from the API server's range
    assert vip.startswith("10.96.")
    # Scaled down: the nodes' rules follow, and only the pod left serves the VIP.
    k.api("PATCH", f"/apis/apps/v1/namespaces/{ns}/deployments/echo", {"spec": {"replicas": 1}})
    left = wait_for(
        lambda: (
            [p for p in k.pods(ns, "app=echo") if not p["metadata"].get("deletionTimestamp")][:1]
            if len(k.pods(ns, "app=echo")) == 1
            else []
        ),
        30,
        "one echo pod left",
        k.kubelet_log,
    )
    for _ in range(10):
        assert http_get(first.netns_path, vip, 80) == (200, left[0]["metadata"]["name"].encode())


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
