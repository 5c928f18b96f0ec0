"""The node agent's API rights as the node-agent chart grants them (`files/rbac.yaml`), held
by a real service-account token in a namespace of its own, for the tests of what that token
can and cannot do (RBAC alone, and with the control plane's admission webhook)."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import yaml

from controlplane.agentadmission import NODE_AGENT_ACCOUNT
from kube.client import KubeClient, KubeConfig
from localcluster.kube.apiserver import KubeControlPlane
from localcluster.kube.meshrbac import CHARTS_DIR
from redirect.enrolment import PodInfo
from redirect.kubesource import KubePodSource
from tests.support.kubetokens import api_ok

IMAGE = "registry.invalid/app:1"
AGENT_ACCOUNT = NODE_AGENT_ACCOUNT  # the chart's ServiceAccount


@dataclass
class Rights:
    cp: KubeControlPlane
    ns: str
    node: str
    token: str  # the agent's service-account token, bound to the chart's ClusterRole

    def pod(self, name: str) -> dict[str, Any]:
        return dict(api_ok(self.cp, "GET", f"/api/v1/namespaces/{self.ns}/pods/{name}"))

    def create_pod(self, name: str, node: str | None = None, account: str | None = None) -> str:
        """A Pod bound to a node no kubelet runs (the object is all these tests need); its UID.
        A new namespace's default ServiceAccount comes a moment after it, and until then the
        API server refuses its pods."""
        spec: dict[str, Any] = {
            "nodeName": node or self.node,
            "automountServiceAccountToken": False,
            "containers": [{"name": "app", "image": IMAGE}],
        }
        if account is not None:
            spec["serviceAccountName"] = account
        obj = {"metadata": {"name": name, "labels": {"app": name}}, "spec": spec}
        deadline = time.monotonic() + 30
        while True:
            status, raw = self.cp.request("POST", f"/api/v1/namespaces/{self.ns}/pods", obj)
            if status < 300:
                return str(json.loads(raw)["metadata"]["uid"])
            assert status == 403 and time.monotonic() < deadline, (status, raw[:300])
            time.sleep(0.1)

    def bound_token(self, pod: str, uid: str) -> str:
        """A token of the agent's account bound to its pod `pod` (as a kubelet mounts one):
        the API server names that pod in the caller's userInfo."""
        body = {
            "spec": {
                "expirationSeconds": 600,
                "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": pod, "uid": uid},
            }
        }
        path = f"/api/v1/namespaces/{self.ns}/serviceaccounts/{AGENT_ACCOUNT}/token"
        return str(api_ok(self.cp, "POST", path, body)["status"]["token"])

    def as_agent(self, method: str, path: str, body: object | None = None) -> int:
        status, _ = self.cp.request(method, path, body, token=self.token)
        return status

    def as_agent_once_bound(self, method: str, path: str, body: object | None = None) -> int:
        """A call the rights allow: a 403 is retried for up to 10 s, while the new binding
        has not yet reached the API server's authorizer."""
        for _ in range(100):
            status = self.as_agent(method, path, body)
            if status != 403:
                break
            time.sleep(0.1)
        return status


def agent_rights(
    kube_cp: KubeControlPlane, labels: dict[str, str] | None = None
) -> Generator[Rights, None, None]:
    """A namespace (with `labels`) holding the agent's ServiceAccount bound to the chart's
    rules, and its token; all of it removed after."""
    suffix = secrets.token_hex(3)
    ns, role = f"agentrights-{suffix}", f"agentrights-{suffix}"
    rules = yaml.safe_load(
        (CHARTS_DIR / "node-agent" / "files" / "rbac.yaml").read_text(encoding="utf-8")
    )["clusterRules"]
    rbac = "/apis/rbac.authorization.k8s.io/v1"
    try:
        api_ok(
            kube_cp,
            "POST",
            "/api/v1/namespaces",
            {"metadata": {"name": ns, "labels": labels or {}}},
        )
        api_ok(
            kube_cp,
            "POST",
            f"/api/v1/namespaces/{ns}/serviceaccounts",
            {"metadata": {"name": AGENT_ACCOUNT}},
        )
        api_ok(
            kube_cp, "POST", f"{rbac}/clusterroles", {"metadata": {"name": role}, "rules": rules}
        )
        binding = {
            "metadata": {"name": role},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": role,
            },
            "subjects": [{"kind": "ServiceAccount", "name": AGENT_ACCOUNT, "namespace": ns}],
        }
        api_ok(kube_cp, "POST", f"{rbac}/clusterrolebindings", binding)
        token = api_ok(
            kube_cp,
            "POST",
            f"/api/v1/namespaces/{ns}/serviceaccounts/{AGENT_ACCOUNT}/token",
            {"spec": {"expirationSeconds": 600}},
        )["status"]["token"]
        yield Rights(kube_cp, ns, f"agentrights-node-{suffix}", str(token))
    finally:
        kube_cp.request("DELETE", f"{rbac}/clusterrolebindings/{role}")
        kube_cp.request("DELETE", f"{rbac}/clusterroles/{role}")
        kube_cp.request("DELETE", f"/api/v1/namespaces/{ns}")


async def mark_as_agent(
    rights: Rights,
    info: PodInfo,
    enabled: bool,
    token: str | None = None,
    timeout: float = 30,  # noqa: ASYNC109 (handed to flush_marks, which bounds its wait)
) -> bool:
    """The agent's own code (`KubePodSource`'s mark worker) with the agent's token: whether
    the wish was settled (applied, or the pod is gone) within `timeout` seconds."""
    config = KubeConfig(
        server=rights.cp.server, token=token or rights.token, ca_file=str(rights.cp.ca_path)
    )
    async with KubeClient(config) as client:
        source = KubePodSource(client, rights.node, sync_wait=10)
        await source.start(lambda view: None)
        try:
            source.mark_redirection(info, enabled)
            # The binding reaches the API server's authorizer within a moment; until then
            # the worker retries its refused patch.
            return await source.flush_marks(timeout)
        finally:
            await source.close()
