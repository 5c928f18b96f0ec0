"""The cluster's host (10.10.0.1, served by the kubelet): the API server and the cluster DNS, as
pods and nodes reach them."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import nsutil
from kube.podnetns import netns_name
from localcluster.kube import hostnet
from localcluster.kube.cluster import start_kubelet
from localcluster.processes import is_running

from .conftest import DEMO, KubeNodes, pod_ready, wait_for

pytestmark = [pytest.mark.kube, pytest.mark.netns]

PROJECT = str(Path(__file__).resolve().parents[3])

# Run in a pod's (or node's) netns: GET /version over HTTPS with the cluster CA; `host` an
# address or a name (resolved by glibc: see `with_resolv`), `name` the one verified.
HTTPS_CLIENT = r"""
import json, socket, ssl, sys
ca, host, port, name = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
ctx = ssl.create_default_context(cafile=ca)
with socket.create_connection((host, port), timeout=5) as raw:
    with ctx.wrap_socket(raw, server_hostname=name) as s:
        s.sendall(f"GET /version HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
head, _, body = data.partition(b"\r\n\r\n")
print(json.dumps({"status": head.split()[1].decode(), "body": body.decode(errors="replace")}))
"""

# Run in a pod's netns: the kube client's own in-cluster configuration (a service-account
# directory with token and ca.crt, KUBERNETES_SERVICE_HOST/PORT from the environment).
IN_CLUSTER_CLIENT = r"""
import asyncio, json, sys
from pathlib import Path
import kube.client as kc
kc.SA_DIR = Path(sys.argv[1])

async def main():
    cfg = kc.in_cluster()
    async with kc.KubeClient(cfg) as c:
        version = await c.request("GET", "/version")
        api = await c.request("GET", "/api")
    print(json.dumps({"server": cfg.server, "version": version, "api": api}))

asyncio.run(main())
"""


def run_in(netns_path: str, argv: list[str], env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=30,
        preexec_fn=nsutil.preexec_enter(netns_path),
        env=env,
        check=False,
    )
    if done.returncode != 0:
        raise OSError(f"{argv[:3]}... failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout


def bind_resolv(resolv: Path) -> str:
    """A `sh -c` script under `unshare --mount` that runs its arguments with `resolv` as
    /etc/resolv.conf (a private mount namespace: the machine's own file is untouched)."""
    return f'mount --bind "{resolv}" /etc/resolv.conf && exec "$0" "$@"'


def https_version(
    netns_path: str, ca: Path, host: str, port: int, name: str, resolv: Path
) -> dict[str, Any]:
    out = run_in(
        netns_path,
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            bind_resolv(resolv),
            sys.executable,
            "-c",
            HTTPS_CLIENT,
            str(ca),
            host,
            str(port),
            name,
        ],
    )
    got: dict[str, Any] = json.loads(out)
    return got


def sleeper(name: str, labels: dict[str, str], node: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "automountServiceAccountToken": False,
            "nodeName": node,
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {
                    "name": "c",
                    "image": "x",
                    "command": ["python3", "-c", "import time; time.sleep(3600)"],
                }
            ],
        },
    }


def ready_pod(k: KubeNodes, ns: str, name: str) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        for p in k.pods(ns):
            if p["metadata"]["name"] == name and pod_ready(p) and p["status"].get("podIP"):
                return p
        return None

    got: dict[str, Any] = wait_for(ready, 60, f"pod {name} Ready", k.kubelet_log)
    return got


def pod_netns_path(pod: dict[str, Any]) -> str:
    return nsutil.netns_path(netns_name(pod["metadata"]["uid"]))


def attempt(fn: Any) -> Any:
    """fn's result, or None while the path is not there yet (rules not programmed)."""
    try:
        return fn()
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def test_api_server_reachable_from_pods_and_nodes(kube_nodes: KubeNodes) -> None:
    k = kube_nodes
    ns = k.namespace("api")
    first, second = k.layout.nodes
    # The objects that point the cluster at the host.
    eps = wait_for(
        lambda: (k.try_api("GET", "/api/v1/namespaces/default/endpoints/kubernetes")[1] or {}).get(
            "subsets"
        ),
        30,
        "the kubernetes Endpoints",
        k.kubelet_log,
    )
    assert eps == [
        {
            "addresses": [{"ip": "10.10.0.1"}],
            "ports": [{"name": "https", "port": 6443, "protocol": "TCP"}],
        }
    ]
    svc = k.api("GET", "/api/v1/namespaces/default/services/kubernetes")
    assert svc["spec"]["clusterIP"] == "10.96.0.1"
    assert [(p["name"], p["port"]) for p in svc["spec"]["ports"]] == [("https", 443)]

    ca = k.cp.ca_path
    # From a node netns (a hostNetwork pod's view, ClusterFirstWithHostNet): the ClusterIP,
    # by address and by the names the cluster DNS resolves.
    node_resolv = k.state.dir / "resolv-node.conf"
    text = hostnet.resolv_conf("kube-system", "ClusterFirstWithHostNet", True)
    node_resolv.write_text(text, encoding="ascii")
    for host, port, name in [
        ("10.96.0.1", 443, "10.96.0.1"),
        ("10.96.0.1", 443, "kubernetes.default.svc"),
        ("10.10.0.1", 6443, "kubernetes.default.svc.cluster.local"),
        ("kubernetes.default.svc.cluster.local", 443, "kubernetes.default.svc.cluster.local"),
        ("kubernetes.default", 443, "kubernetes.default"),
    ]:

        def get(h: str = host, p: int = port, n: str = name) -> Any:
            return attempt(lambda: https_version(first.netns_path, ca, h, p, n, node_resolv))

        got = wait_for(
            get,
            30,
            f"HTTPS {name} via {host}:{port} from {first.netns}",
            k.kubelet_log,
        )
        assert got["status"] == "200"
        assert json.loads(got["body"])["gitVersion"] == "v1.20.2"

    # From a pod netns on the other node: in-cluster configuration with a real
    # service-account token of the pod's namespace.
    k.api("POST", f"/api/v1/namespaces/{ns}/pods", sleeper("client", {"app": "c"}, second.name))
    pod = ready_pod(k, ns, "client")
    netns = pod_netns_path(pod)
    wait_for(
        lambda: k.try_api("GET", f"/api/v1/namespaces/{ns}/serviceaccounts/default")[0] == 200,
        30,
        "the default ServiceAccount",
        k.kubelet_log,
    )
    token = k.api(
        "POST",
        f"/api/v1/namespaces/{ns}/serviceaccounts/default/token",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {}},
    )["status"]["token"]
    sa = k.state.dir / "sa-test"
    sa.mkdir()
    (sa / "token").write_text(token, encoding="ascii")
    (sa / "ca.crt").write_bytes(ca.read_bytes())
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": PROJECT,
        "KUBERNETES_SERVICE_HOST": "10.96.0.1",
        "KUBERNETES_SERVICE_PORT": "443",
    }
    out = wait_for(
        lambda: attempt(
            lambda: run_in(netns, [sys.executable, "-c", IN_CLUSTER_CLIENT, str(sa)], env)
        ),
        30,
        "the in-cluster client from a pod",
        k.kubelet_log,
    )
    got = json.loads(out)
    assert got["server"] == "https://10.96.0.1:443"
    assert got["version"]["gitVersion"] == "v1.20.2"
    assert "v1" in got["api"]["versions"]  # /api needs an authenticated caller
    # And by the names the cluster DNS gives, through the pod's search path.
    resolv = k.state.dir / "resolv-pod.conf"
    resolv.write_text(hostnet.resolv_conf(ns, "ClusterFirst", False), encoding="ascii")
    for host in ("kubernetes.default.svc", "kubernetes.default"):
        got = https_version(netns, ca, host, 443, "kubernetes.default.svc", resolv)
        assert got["status"] == "200", host
    # `kubernetes` alone is a name of the default namespace only, as in any cluster.
    with pytest.raises(OSError, match="name resolution"):
        https_version(netns, ca, "kubernetes", 443, "kubernetes", resolv)


def dig(netns_path: str, *args: str) -> str:
    return run_in(netns_path, ["dig", "+time=2", "+tries=1", *args])


def dig_status(netns_path: str, name: str, *args: str) -> str:
    out = dig(netns_path, "@10.10.0.1", name, "+noall", "+comments", *args)
    for line in out.splitlines():
        if "status:" in line:
            return line.split("status:")[1].split(",")[0].strip()
    raise ValueError(f"no status in dig's output: {out}")


def dig_short(netns_path: str, server: str, name: str, *args: str) -> list[str]:
    return sorted(dig(netns_path, f"@{server}", name, "+short", *args).split())


def getent(netns_path: str, resolv: Path, name: str) -> list[str]:
    """glibc's own lookup of `name` with `resolv` as /etc/resolv.conf."""
    done = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            bind_resolv(resolv),
            "getent",
            "ahostsv4",
            name,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        preexec_fn=nsutil.preexec_enter(netns_path),
        check=False,
    )
    return sorted({line.split()[0] for line in done.stdout.splitlines() if line.strip()})


def test_cluster_dns_from_pods_and_nodes(kube_nodes: KubeNodes) -> None:
    k = kube_nodes
    ns = k.namespace("dns")
    first, second = k.layout.nodes
    k.api("POST", f"/api/v1/namespaces/{ns}/pods", sleeper("a", {"app": "hl"}, first.name))
    k.api("POST", f"/api/v1/namespaces/{ns}/pods", sleeper("b", {"app": "hl"}, second.name))
    web = k.api(
        "POST",
        f"/api/v1/namespaces/{ns}/services",
        {
            "metadata": {"name": "web"},
            "spec": {"selector": {"app": "none"}, "ports": [{"name": "http", "port": 80}]},
        },
    )
    vip = web["spec"]["clusterIP"]
    k.api(
        "POST",
        f"/api/v1/namespaces/{ns}/services",
        {
            "metadata": {"name": "hl"},
            "spec": {"clusterIP": "None", "selector": {"app": "hl"}, "ports": [{"port": 9}]},
        },
    )
    pod_a = ready_pod(k, ns, "a")
    pod_b = ready_pod(k, ns, "b")
    netns = pod_netns_path(pod_a)
    name = f"web.{ns}.svc.cluster.local"
    # Straight to the host, over UDP and TCP; from a pod and from a node.
    assert wait_for(
        lambda: attempt(lambda: dig_short(netns, "10.10.0.1", name)) == [vip],
        30,
        f"{name} from a pod",
        k.kubelet_log,
    )
    assert dig_short(netns, "10.10.0.1", name, "+tcp") == [vip]
    assert dig_short(second.netns_path, "10.10.0.1", name) == [vip]
    assert dig_short(netns, "10.10.0.1", "kubernetes.default.svc.cluster.local") == ["10.96.0.1"]
    # Through the kube-dns Service's ClusterIP (the kubelet's DNAT, UDP and TCP).
    dns_svc = k.api("GET", "/api/v1/namespaces/kube-system/services/kube-dns")
    assert dns_svc["spec"]["clusterIP"] == "10.96.0.10"
    assert {(p["port"], p["protocol"]) for p in dns_svc["spec"]["ports"]} == {
        (53, "UDP"),
        (53, "TCP"),
    }
    assert wait_for(
        lambda: attempt(lambda: dig_short(netns, "10.96.0.10", name)) == [vip],
        30,
        f"{name} via 10.96.0.10",
        k.kubelet_log,
    )
    assert dig_short(netns, "10.96.0.10", name, "+tcp") == [vip]
    # A headless Service: the ready pods' addresses.
    want = sorted([pod_a["status"]["podIP"], pod_b["status"]["podIP"]])
    assert wait_for(
        lambda: dig_short(netns, "10.10.0.1", f"hl.{ns}.svc.cluster.local") == want,
        30,
        "the headless Service's pods",
        k.kubelet_log,
    )
    # The search path of the pod's resolv.conf, through glibc.
    resolv = k.state.dir / "resolv-test.conf"
    resolv.write_text(hostnet.resolv_conf(ns, "ClusterFirst", False), encoding="ascii")
    for short in ("web", f"web.{ns}", f"web.{ns}.svc", name):
        assert getent(netns, resolv, short) == [vip], short
    assert getent(netns, resolv, "kubernetes.default") == ["10.96.0.1"]
    assert getent(netns, resolv, "nope") == []
    # What is not there: NXDOMAIN inside the domain, REFUSED outside; AAAA empty.
    assert dig_status(netns, f"nope.{ns}.svc.cluster.local") == "NXDOMAIN"
    assert dig_status(netns, "example.com") == "REFUSED"
    assert dig_status(netns, name, "AAAA") == "NOERROR"
    assert dig(netns, "@10.10.0.1", name, "AAAA", "+short").strip() == ""
    # A Service created now is answered within moments.
    late = k.api(
        "POST",
        f"/api/v1/namespaces/{ns}/services",
        {"metadata": {"name": "late"}, "spec": {"ports": [{"port": 1}]}},
    )
    assert wait_for(
        lambda: (
            dig_short(netns, "10.10.0.1", f"late.{ns}.svc.cluster.local")
            == [late["spec"]["clusterIP"]]
        ),
        30,
        "the new Service in the DNS",
        k.kubelet_log,
    )
    # Malformed and hostile packets: no answer or FORMERR, and the server goes on.
    s = nsutil.socket_at(netns, socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.settimeout(2)
        for junk in (b"", b"\x00", b"\x12\x34\x01\x00" + b"\xff" * 600, os.urandom(3000)):
            s.sendto(junk, ("10.10.0.1", 53))
        t = nsutil.socket_at(netns, socket.AF_INET, socket.SOCK_STREAM)
        with t:
            t.settimeout(5)
            t.connect(("10.10.0.1", 53))
            t.sendall(b"\xff\xff" + b"\x00" * 100)  # a length past the bound: closed
            assert t.recv(10) == b""
    finally:
        s.close()
    assert dig_short(netns, "10.10.0.1", name) == [vip]
    assert is_running(k.kubelet.pid, k.kubelet.record.start_time)


def test_a_restarted_kubelet_serves_the_host_again(kube_nodes: KubeNodes) -> None:
    """The host's address and routes are already there and the sockets were the killed
    kubelet's: a new kubelet serves DNS and the API server on the same address."""
    k = kube_nodes
    node = k.layout.nodes[0]
    ca = k.cp.ca_path
    resolv = k.state.dir / "resolv-node.conf"
    resolv.write_text(hostnet.resolv_conf("default", "ClusterFirstWithHostNet", True), "ascii")

    def both() -> bool:
        names = attempt(
            lambda: dig_short(node.netns_path, "10.10.0.1", "kubernetes.default.svc.cluster.local")
        )
        api = attempt(
            lambda: https_version(node.netns_path, ca, "kubernetes", 443, "kubernetes", resolv)
        )
        return names == ["10.96.0.1"] and bool(api) and api["status"] == "200"

    wait_for(both, 30, "the host served", k.kubelet_log)
    os.kill(k.kubelet.pid, signal.SIGKILL)
    k.kubelet.popen.wait(timeout=10)
    assert attempt(lambda: dig_short(node.netns_path, "10.10.0.1", "x.cluster.local")) is None
    cluster_file = Path(k.kubelet.record.argv[k.kubelet.record.argv.index("--cluster-file") + 1])
    k.kubelet = start_kubelet(cluster_file, k.state, k.cp.kubeconfig, k.state.dir.parent, DEMO)
    wait_for(both, 30, "the host served by the new kubelet", k.kubelet_log)
