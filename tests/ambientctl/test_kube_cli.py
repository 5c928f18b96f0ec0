"""`ambientctl --kubeconfig` against the real API server (no kubelet: the tests play it,
patching pods' status as a kubelet would), with the real control plane (`python -m
controlplane`) computing the mesh config the CLI's views must agree with."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from ambientctl import cli
from controlplane.install import install_crds
from kube import kinds
from kube.client import KubeApiError, KubeClient, load_kubeconfig
from localcluster.kube.apiserver import KubeControlPlane
from tests.controlplane.kubeobjects import authorization_policy
from tests.controlplane.test_kube_controlplane import ensure_node, kubelet_ready, running_pod

pytestmark = pytest.mark.kube

T = TypeVar("T")
Ctl = Callable[..., tuple[int, str, str]]
AMBIENT = {"istio.io/dataplane-mode": "ambient"}
REDIRECTION = "ambient.istio.io/redirection"


def on_api(cp: KubeControlPlane, work: Callable[[KubeClient], Awaitable[T]]) -> T:
    async def main() -> T:
        async with KubeClient(load_kubeconfig(cp.kubeconfig)) as c:
            return await work(c)

    return asyncio.run(main())


def until(
    check: Callable[[], T],
    what: str,
    within: float = 60.0,
    describe: Callable[[], object] = lambda: "",
) -> T:
    deadline = time.monotonic() + within
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"{what}: not within {within} s {describe()}"
        time.sleep(0.3)


@pytest.fixture
def ctl(kube_cp: KubeControlPlane, capsys: pytest.CaptureFixture[str]) -> Ctl:
    """`ambientctl --kubeconfig K ARGS...` in process: (exit code, stdout, stderr)."""

    def run(*argv: str) -> tuple[int, str, str]:
        rc = cli.main(["--kubeconfig", str(kube_cp.kubeconfig), *argv])
        out, err = capsys.readouterr()
        return rc, out, err

    return run


def _delete_namespaces(cp: KubeControlPlane, *names: str) -> None:
    async def work(c: KubeClient) -> None:
        for ns in names:
            with contextlib.suppress(KubeApiError):
                await c.delete(kinds.NAMESPACE, ns)

    on_api(cp, work)


# ---- status --------------------------------------------------------------------------------


def _pod_template(app: str, node_label: dict[str, str]) -> dict[str, Any]:
    return {
        "metadata": {"labels": {"app": app}},
        "spec": {
            "nodeSelector": node_label,
            "tolerations": [{"operator": "Exists"}],
            "automountServiceAccountToken": False,
            "containers": [{"name": app, "image": "ambient-mesh/mesh:0.13.0"}],
        },
    }


def _mesh_components(ns: str, node_label: dict[str, str]) -> list[tuple[kinds.Kind, Any]]:
    def workload(kind: str, name: str) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "selector": {"matchLabels": {"app": name}},
            "template": _pod_template(name, node_label),
        }
        if kind == "Deployment":
            spec["replicas"] = 1
        return {"metadata": {"name": name}, "spec": spec}

    return [
        (kinds.DEPLOYMENT, workload("Deployment", "istiod")),
        (kinds.DAEMON_SET, workload("DaemonSet", "ztunnel")),
        (kinds.DAEMON_SET, workload("DaemonSet", "ambient-node-agent")),
    ]


def test_status_needs_istiod_and_both_daemonsets_ready(kube_cp: KubeControlPlane, ctl: Ctl) -> None:
    tag = secrets.token_hex(3)
    ns, node = f"ctl-istio-{tag}", f"ctl-node-{tag}"
    node_label = {"ambientctl-test": tag}  # the DaemonSets run on this node only
    try:

        async def setup(c: KubeClient) -> None:
            await c.create(kinds.NAMESPACE, {"metadata": {"name": ns}})
            await c.create(kinds.NODE, {"metadata": {"name": node, "labels": node_label}})

        on_api(kube_cp, setup)
        rc, _, err = ctl("status", "--istio-namespace", ns)
        assert rc == 1
        assert f"Deployment {ns}/istiod: not found" in err
        assert f"DaemonSet {ns}/ztunnel: not found" in err
        assert f"DaemonSet {ns}/ambient-node-agent: not found" in err

        async def install(c: KubeClient) -> None:
            for kind, obj in _mesh_components(ns, node_label):
                await c.create(kind, obj, ns)

        on_api(kube_cp, install)

        def scheduled() -> bool:
            async def work(c: KubeClient) -> bool:
                ds = (await c.list(kinds.DAEMON_SET, ns))["items"]
                return len(ds) == 2 and all(
                    (d.get("status") or {}).get("desiredNumberScheduled") == 1 for d in ds
                )

            return on_api(kube_cp, work)

        until(scheduled, "the DaemonSet controller's status")
        # Every pod is still waiting for its kubelet: not ready, and said per component.
        rc, out, err = ctl("status", "--istio-namespace", ns)
        assert rc == 1, out
        assert f"DaemonSet {ns}/ztunnel: 0/1 pods ready" in err
        assert f"DaemonSet {ns}/ambient-node-agent: 0/1 pods ready" in err

        # Play the kubelet: every pod of the namespace ready (the DaemonSets' and istiod's).
        def all_ready() -> bool:
            async def work(c: KubeClient) -> bool:
                pods = (await c.list(kinds.POD, ns))["items"]
                for i, p in enumerate(pods):
                    await kubelet_ready(c, ns, p["metadata"]["name"], f"10.251.{i}.{i + 10}")
                return len(pods) >= 3

            on_api(kube_cp, work)
            last[:] = ctl("status", "--istio-namespace", ns)
            return bool(last[0] == 0)

        last: list[Any] = []
        until(all_ready, "status exits 0 once every component is ready", describe=lambda: last)
        rc, out, err = ctl("status", "--istio-namespace", ns)
        assert rc == 0 and err == ""
        assert f"ztunnel             DaemonSet   {ns}  1/1    Ready" in out
        assert f"istiod              Deployment  {ns}  1/1    Ready" in out
        rc, out, _ = ctl("status", "--istio-namespace", ns, "-o", "json")
        doc = json.loads(out)
        assert [c["ok"] for c in doc["components"]] == [True, True, True]
        (row,) = [n for n in doc["nodes"] if n["node"] == node]
        assert [(p["component"], p["ready"]) for p in row["pods"]] == [
            ("ztunnel", True),
            ("ambient-node-agent", True),
        ]
    finally:
        _delete_namespaces(kube_cp, ns)

        async def drop_node(c: KubeClient) -> None:
            with contextlib.suppress(KubeApiError):
                await c.delete(kinds.NODE, node)

        on_api(kube_cp, drop_node)


def test_status_from_the_installed_program(kube_cp: KubeControlPlane) -> None:
    """The real entry point, as a user runs it: no mesh in that namespace, exit 1."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ambientctl.cli",
            "--kubeconfig",
            str(kube_cp.kubeconfig),
            "status",
            "--istio-namespace",
            "ctl-no-mesh-here",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert "DaemonSet ctl-no-mesh-here/ztunnel: not found" in done.stderr
    assert "NotReady: not found" in done.stdout


# ---- the mesh: workloads, policies, explain, waypoint --------------------------------------


@contextlib.contextmanager
def control_plane(cp: KubeControlPlane, out: Path) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "controlplane",
            "--kubeconfig",
            str(cp.kubeconfig),
            "--mesh-out",
            str(out),
            "--no-install-crds",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _file_workloads(out: Path, ns: str) -> dict[str, str]:
    try:
        doc = json.loads(out.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return {w["name"]: w["protocol"] for w in doc.get("workloads", ()) if w["namespace"] == ns}


def _setup_mesh(cp: KubeControlPlane, ns: str, plain: str) -> None:
    async def work(c: KubeClient) -> None:
        await install_crds(c)
        await ensure_node(c)
        await c.create(kinds.NAMESPACE, {"metadata": {"name": ns, "labels": AMBIENT}})
        await c.create(kinds.NAMESPACE, {"metadata": {"name": plain}})
        tag = ns.rsplit("-", 1)[1]
        third = int(tag[:2], 16)
        await running_pod(c, ns, "web-0", f"10.252.{third}.10", {"app": "web"}, {"http": 8080})
        await running_pod(c, ns, "db-0", f"10.252.{third}.11", {"app": "db"}, {"pg": 5432})
        await running_pod(c, plain, "client", f"10.252.{third}.20", {"app": "client"})
        # The node agent's mark on the pod it captured (db-0 is not captured yet).
        await c.patch(
            kinds.POD, "web-0", {"metadata": {"annotations": {REDIRECTION: "enabled"}}}, ns
        )
        svc = {
            "metadata": {"name": "web"},
            "spec": {
                "selector": {"app": "web"},
                "ports": [{"name": "http", "port": 80, "targetPort": 8080}],
            },
        }
        await c.create(kinds.SERVICE, svc, ns)
        broken = {"rules": [{"from": [{"source": {"nmespaces": ["x"]}}]}]}
        await c.create(kinds.AUTHORIZATION_POLICY, authorization_policy(ns, "broken", broken), ns)

    on_api(cp, work)


def test_views_explain_and_waypoint_against_kubernetes(
    kube_cp: KubeControlPlane, ctl: Ctl, tmp_path: Path
) -> None:
    tag = secrets.token_hex(3)
    ns, plain = f"ctl-{tag}", f"ctl-plain-{tag}"
    out = tmp_path / "mesh.json"
    try:
        _setup_mesh(kube_cp, ns, plain)
        with control_plane(kube_cp, out):
            until(lambda: len(_file_workloads(out, ns)) == 2, "the control plane's mesh config")
            _views(ctl, ns, plain, out)
            _waypoint(kube_cp, ctl, ns, f"10.252.{int(tag[:2], 16)}.30")
    finally:
        _delete_namespaces(kube_cp, ns, plain)


def _views(ctl: Ctl, ns: str, plain: str, out: Path) -> None:
    rc, text, _ = ctl("workloads", "-n", ns, "-o", "json")
    assert rc == 0
    rows = {r["name"]: r for r in json.loads(text)}
    assert {n: (r["protocol"], r["configProtocol"]) for n, r in rows.items()} == {
        "web-0": ("HBONE", "HBONE"),  # captured
        "db-0": ("TCP", "HBONE"),  # in the mesh by its namespace's label, not captured yet
    }
    # What the CLI computes is what the control plane wrote.
    assert {n: r["configProtocol"] for n, r in rows.items()} == _file_workloads(out, ns)
    assert rows["web-0"]["identity"] == f"spiffe://cluster.local/ns/{ns}/sa/default"
    rc, text, _ = ctl("workloads", "-n", ns)
    assert rc == 0
    assert text.splitlines()[0].split() == [
        "NAMESPACE", "POD", "NAME", "ADDRESS", "NODE", "WAYPOINT", "PROTOCOL", "IDENTITY",
    ]  # fmt: skip
    assert f"Not captured yet (no {REDIRECTION}=enabled):\n  {ns}/db-0\n" in text

    rc, text, _ = ctl("policies", "-n", ns)
    assert rc == 0
    assert f"{ns}  broken       DENY    NAMESPACE  no       FailClosed" in text
    assert f"  {ns}/broken: AuthorizationPolicy {ns}/broken: spec.rules[0]" in text

    rc, text, _ = ctl("explain", f"{ns}/db-0", f"{ns}/web-0")
    assert rc == 0, text
    assert f"authorization:  DENIED by policy {ns}/broken" in text
    rc, text, _ = ctl("explain", "-n", plain, "client", f"web.{ns}", "-o", "json")
    doc = json.loads(text)
    assert (doc["route"], doc["destination"]["port"]) == ("NOT_CAPTURED", 80)
    assert doc["destination"]["via"] == f"service {ns}/web.{ns}.svc.cluster.local"
    rc, _, err = ctl("explain", f"{ns}/nope", f"{ns}/web-0")
    assert rc == 1 and f"no pod {ns}/nope" in err


def _waypoint(cp: KubeControlPlane, ctl: Ctl, ns: str, ip: str) -> None:
    rc, _, err = ctl("waypoint", "status", "-n", ns)
    assert rc == 1 and f"no waypoint in namespace {ns}" in err
    rc, text, err = ctl("waypoint", "apply", "-n", ns, "--enroll-namespace")
    assert rc == 0, err
    assert f"namespace {ns} labeled with istio.io/use-waypoint=waypoint" in text

    async def objects(c: KubeClient) -> tuple[Any, Any]:
        return await c.get(kinds.GATEWAY, "waypoint", ns), await c.get(kinds.NAMESPACE, ns)

    gateway, namespace = on_api(cp, objects)
    assert gateway["spec"] == {
        "gatewayClassName": "istio-waypoint",
        "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
    }
    assert namespace["metadata"]["labels"]["istio.io/use-waypoint"] == "waypoint"
    # No kubelet has started its pod: not ready, whatever the control plane says yet.
    rc, text, _ = ctl("waypoint", "status", "-n", ns)
    assert rc == 1 and "waypoint" in text

    def pod_ready() -> bool:
        async def work(c: KubeClient) -> bool:
            selector = "gateway.networking.k8s.io/gateway-name=waypoint"
            pods = (await c.list(kinds.POD, ns, label_selector=selector))["items"]
            for p in pods:
                await kubelet_ready(c, ns, p["metadata"]["name"], ip)
            return bool(pods)

        return on_api(cp, work)

    until(pod_ready, "the waypoint Deployment's pod")
    until(lambda: ctl("waypoint", "status", "-n", ns)[0] == 0, "waypoint status exits 0")
    rc, text, _ = ctl("waypoint", "status", "-n", ns)
    assert text.splitlines()[1].split()[:4] == [ns, "waypoint", "True", "1/1"]
    rc, text, _ = ctl("waypoint", "list", "-n", ns, "-o", "json")
    (row,) = json.loads(text)
    assert row["ready"] and row["programmed"] == "True" and row["address"]

    # The service is bound to it now: the connection goes through it.
    def through_waypoint() -> dict[str, Any] | None:
        rc, text, _ = ctl("explain", f"{ns}/db-0", f"web.{ns}", "-o", "json")
        doc: dict[str, Any] = json.loads(text) if rc == 0 else {}
        return doc if (doc.get("waypoint") or {}).get("status") == "used" else None

    doc = until(through_waypoint, "explain through the waypoint")
    assert doc is not None and doc["endpoints"][0]["ip"] == ip
    # And what the waypoint would do with a request (its own functions).
    rc, text, err = ctl("explain", f"{ns}/db-0", f"web.{ns}", "--http", "GET /x")
    assert rc == 0, err
    assert f"  Waypoint:       {ns}/waypoint (CONNECT " in text
    assert f"  Request:        GET /x (host web.{ns}:80)" in text

    rc, text, _ = ctl("waypoint", "delete", "-n", ns, "waypoint")
    assert rc == 0 and f"waypoint {ns}/waypoint deleted" in text
    rc, _, err = ctl("waypoint", "delete", "-n", ns, "waypoint")
    assert rc == 1 and f"no waypoint {ns}/waypoint" in err
