"""The node agent's uninstall check at SIGTERM, against the real API server (no kubelet:
the agent's own Pod and its DaemonSet are plain objects here).

The check must hold when the watch trails the deletion that stops the agent (helm deletes
the DaemonSet and the garbage collector stops its pods at once): the API server is asked
first. And when the agent's ServiceAccount is gone, its refused token (401) says uninstall
too, since only an uninstall deletes it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
from typing import Any

import pytest

from kube import kinds
from kube.client import KubeApiError, KubeClient, load_kubeconfig
from localcluster.kube.apiserver import KubeControlPlane
from redirect.uninstall import UninstallWatch

pytestmark = [pytest.mark.kube]


def _ok(cp: KubeControlPlane, method: str, path: str, body: object | None = None) -> Any:
    status, raw = cp.request(method, path, body)
    assert status < 300, f"{method} {path}: {status} {raw[:300]!r}"
    return json.loads(raw)


def _objects(cp: KubeControlPlane) -> str:
    """A namespace with a DaemonSet `agent` and a Pod it owns; its name."""
    ns = "un-" + secrets.token_hex(3)
    _ok(cp, "POST", "/api/v1/namespaces", {"metadata": {"name": ns}})
    labels = {"app": "agent"}
    ds = _ok(
        cp,
        "POST",
        f"/apis/apps/v1/namespaces/{ns}/daemonsets",
        {
            "metadata": {"name": "agent"},
            "spec": {
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    # Pinned to a node that does not exist: no pod of the controller's own.
                    "spec": {
                        "nodeSelector": {"none": "none"},
                        "containers": [{"name": "c", "image": "x"}],
                    },
                },
            },
        },
    )
    ref = {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "name": "agent",
        "uid": ds["metadata"]["uid"],
        "controller": True,
    }
    pod = {
        "metadata": {"name": "agent-x", "labels": labels, "ownerReferences": [ref]},
        # No token mounted: the namespace's default ServiceAccount may not be there yet.
        "spec": {
            "automountServiceAccountToken": False,
            "containers": [{"name": "c", "image": "x"}],
        },
    }
    _ok(cp, "POST", f"/api/v1/namespaces/{ns}/pods", pod)
    return ns


async def _started(client: KubeClient, ns: str) -> UninstallWatch:
    watch = UninstallWatch(client, ns, "agent-x")
    await watch.start()
    assert watch.informer is not None
    await asyncio.wait_for(watch.informer.synced.wait(), 30)
    return watch


async def _until_refused(client: KubeClient, ns: str, within: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        try:
            await client.get(kinds.POD, "agent-x", ns)
        except KubeApiError as e:
            if e.status == 401:
                return
            raise
        assert loop.time() < deadline, "the token of a deleted ServiceAccount still works"
        await asyncio.sleep(0.2)


def test_a_deletion_the_watch_has_not_delivered_is_seen(kube_cp: KubeControlPlane) -> None:
    async def scenario() -> None:
        ns = _objects(kube_cp)
        async with KubeClient(load_kubeconfig(kube_cp.kubeconfig)) as client:
            watch = await _started(client, ns)
            try:
                assert not await watch.going()  # a restart, an upgrade: keep the rules
                # The watch stops delivering (its cache keeps the DaemonSet), then the
                # DaemonSet is deleted: only the API server knows.
                assert watch.informer is not None
                await watch.informer.stop()
                _ok(kube_cp, "DELETE", f"/apis/apps/v1/namespaces/{ns}/daemonsets/agent")
                assert watch.informer.get(f"{ns}/agent") is not None
                assert await watch.going()
            finally:
                await watch.stop()

    asyncio.run(scenario())


def test_a_token_refused_because_its_service_account_is_gone_means_uninstall(
    kube_cp: KubeControlPlane,
) -> None:
    async def scenario() -> None:
        ns = _objects(kube_cp)
        _ok(
            kube_cp, "POST", f"/api/v1/namespaces/{ns}/serviceaccounts", {"metadata": {"name": "a"}}
        )
        rules = [
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]},
            {"apiGroups": ["apps"], "resources": ["daemonsets"], "verbs": ["get", "list", "watch"]},
        ]
        rbac = f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}"
        _ok(kube_cp, "POST", f"{rbac}/roles", {"metadata": {"name": "a"}, "rules": rules})
        binding = {
            "metadata": {"name": "a"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "a"},
            "subjects": [{"kind": "ServiceAccount", "name": "a", "namespace": ns}],
        }
        _ok(kube_cp, "POST", f"{rbac}/rolebindings", binding)
        path = f"/api/v1/namespaces/{ns}/serviceaccounts/a/token"
        token = _ok(kube_cp, "POST", path, {"spec": {"expirationSeconds": 600}})["status"]["token"]
        config = dataclasses.replace(
            load_kubeconfig(kube_cp.kubeconfig), token=token, cert_file=None, key_file=None
        )
        async with KubeClient(config) as client:
            watch = await _started(client, ns)
            try:
                assert not await watch.going()
                _ok(kube_cp, "DELETE", f"/api/v1/namespaces/{ns}/serviceaccounts/a")
                # The API server refuses the token once it has noticed (it caches a
                # token's authentication for a few seconds).
                await _until_refused(client, ns)
                # The DaemonSet is still there; the refused token is the answer.
                assert await watch.going()
            finally:
                await watch.stop()

    asyncio.run(scenario())
