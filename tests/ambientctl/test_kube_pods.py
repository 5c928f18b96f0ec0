"""`get pods` against the real API server (no kubelet: the test patches the pods' status
as a kubelet would, and the node agent's redirection mark as the agent would)."""

from __future__ import annotations

import argparse
import secrets
from typing import Any

import pytest

from ambientctl import pods
from kube import kinds
from kube.client import KubeClient
from localcluster.kube.apiserver import KubeControlPlane
from tests.controlplane.test_kube_controlplane import ensure_node, running_pod

from .test_kube_cli import AMBIENT, REDIRECTION, _delete_namespaces, on_api

pytestmark = pytest.mark.kube


def _args(cp: KubeControlPlane, **kw: Any) -> argparse.Namespace:
    base: dict[str, Any] = dict(
        cluster_file=None, state_root=None, namespace=None, all_namespaces=True, name=None,
        output="wide", show_labels=False, kubeconfig=str(cp.kubeconfig), context=None,
    )  # fmt: skip
    base.update(kw)
    return argparse.Namespace(**base)


def _status(ip: str, ready: bool, state: dict[str, Any], restarts: int) -> dict[str, Any]:
    return {
        "phase": "Running",
        "podIP": ip,
        "podIPs": [{"ip": ip}],
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        "containerStatuses": [
            {"name": "app", "image": "app", "imageID": "", "ready": ready,
             "restartCount": restarts, "state": state}
        ],
    }  # fmt: skip


def test_get_pods_from_the_api_server(
    kube_cp: KubeControlPlane, capsys: pytest.CaptureFixture[str]
) -> None:
    suffix = secrets.token_hex(3)
    mesh_ns, plain_ns = f"pods-mesh-{suffix}", f"pods-plain-{suffix}"

    async def setup(c: KubeClient) -> None:
        await ensure_node(c)
        await c.create(kinds.NAMESPACE, {"metadata": {"name": mesh_ns, "labels": AMBIENT}})
        await c.create(kinds.NAMESPACE, {"metadata": {"name": plain_ns}})
        await running_pod(c, mesh_ns, "a", "10.244.1.5", {"app": "a"})
        await running_pod(c, mesh_ns, "b", "10.244.1.6", {"app": "b"})
        await running_pod(c, plain_ns, "c", "10.244.1.7", {"app": "c"})
        running = {"running": {"startedAt": "2026-01-01T00:00:00Z"}}
        crash = {"waiting": {"reason": "CrashLoopBackOff"}}
        for ns, name, ip, ready, state, restarts in (
            (mesh_ns, "a", "10.244.1.5", True, running, 0),
            (mesh_ns, "b", "10.244.1.6", True, running, 1),
            (plain_ns, "c", "10.244.1.7", False, crash, 4),
        ):
            body = {"status": _status(ip, ready, state, restarts)}
            await c.patch(kinds.POD, name, body, ns, subresource="status")
        mark = {"metadata": {"annotations": {REDIRECTION: "enabled"}}}
        await c.patch(kinds.POD, "a", mark, mesh_ns)

    try:
        on_api(kube_cp, setup)
        capsys.readouterr()
        assert pods.run_get_pods(_args(kube_cp)) == 0
        out = capsys.readouterr().out
        rows = {
            tuple(line.split()[:2]): line.split()
            for line in out.splitlines()
            if line.startswith((mesh_ns, plain_ns))
        }
        a, b, c = rows[(mesh_ns, "a")], rows[(mesh_ns, "b")], rows[(plain_ns, "c")]
        assert a[2:5] == ["1/1", "Running", "enrolled"]
        assert a[-1] == f"spiffe://cluster.local/ns/{mesh_ns}/sa/default"
        assert b[2:5] == ["1/1", "Running", "pending:"]
        assert c[2:6] == ["0/1", "CrashLoopBackOff", "not-enrolled", "4"]
        assert out.splitlines()[0].split()[:3] == ["NAMESPACE", "NAME", "READY"]

        capsys.readouterr()
        one = _args(kube_cp, all_namespaces=False, namespace=mesh_ns, name="a", output="json")
        assert pods.run_get_pods(one) == 0
        assert '"state": "enrolled"' in capsys.readouterr().out
        missing = _args(kube_cp, all_namespaces=False, namespace=mesh_ns, name="zz")
        assert pods.run_get_pods(missing) == 1
        assert 'pods "zz" not found' in capsys.readouterr().err
    finally:
        _delete_namespaces(kube_cp, mesh_ns, plain_ns)
