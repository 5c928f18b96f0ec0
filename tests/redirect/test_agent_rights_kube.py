"""The node agent's API rights, as the node-agent chart grants them (`files/rbac.yaml`), held
by a real service-account token against the real API server: the agent's own code marks a
pod with them, and what a compromised node could try with the same token is refused or has
no effect.

The mark is written through the pods/status subresource (as istio-cni does), so the rights
include no write on pods themselves: the API server keeps a pod's spec on a status write,
so the token cannot change what any pod in the cluster runs.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from kube.client import KubeClient, KubeConfig
from localcluster.kube.apiserver import KubeControlPlane
from localcluster.kube.meshrbac import CHARTS_DIR
from redirect.enrolment import PodInfo
from redirect.kubesource import REDIRECTION_ANNOTATION, REDIRECTION_ENABLED, KubePodSource
from tests.support.kubetokens import api_ok

pytestmark = pytest.mark.kube

IMAGE = "registry.invalid/app:1"


@dataclass
class Rights:
    cp: KubeControlPlane
    ns: str
    node: str
    token: str  # the agent's service-account token, bound to the chart's ClusterRole

    def pod(self, name: str) -> dict[str, Any]:
        return dict(api_ok(self.cp, "GET", f"/api/v1/namespaces/{self.ns}/pods/{name}"))

    def create_pod(self, name: str) -> str:
        """A Pod bound to a node no kubelet runs (the object is all these tests need); its UID.
        A new namespace's default ServiceAccount comes a moment after it, and until then the
        API server refuses its pods."""
        obj = {
            "metadata": {"name": name, "labels": {"app": name}},
            "spec": {
                "nodeName": self.node,
                "automountServiceAccountToken": False,
                "containers": [{"name": "app", "image": IMAGE}],
            },
        }
        deadline = time.monotonic() + 30
        while True:
            status, raw = self.cp.request("POST", f"/api/v1/namespaces/{self.ns}/pods", obj)
            if status < 300:
                return str(json.loads(raw)["metadata"]["uid"])
            assert status == 403 and time.monotonic() < deadline, (status, raw[:300])
            time.sleep(0.1)

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


@pytest.fixture
def rights(kube_cp: KubeControlPlane) -> Iterator[Rights]:
    suffix = secrets.token_hex(3)
    ns, role = f"agentrights-{suffix}", f"agentrights-{suffix}"
    rules = yaml.safe_load(
        (CHARTS_DIR / "node-agent" / "files" / "rbac.yaml").read_text(encoding="utf-8")
    )["clusterRules"]
    rbac = "/apis/rbac.authorization.k8s.io/v1"
    try:
        api_ok(kube_cp, "POST", "/api/v1/namespaces", {"metadata": {"name": ns}})
        api_ok(
            kube_cp,
            "POST",
            f"/api/v1/namespaces/{ns}/serviceaccounts",
            {"metadata": {"name": "ambient-node-agent"}},
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
            "subjects": [{"kind": "ServiceAccount", "name": "ambient-node-agent", "namespace": ns}],
        }
        api_ok(kube_cp, "POST", f"{rbac}/clusterrolebindings", binding)
        token = api_ok(
            kube_cp,
            "POST",
            f"/api/v1/namespaces/{ns}/serviceaccounts/ambient-node-agent/token",
            {"spec": {"expirationSeconds": 600}},
        )["status"]["token"]
        yield Rights(kube_cp, ns, f"agentrights-node-{suffix}", str(token))
    finally:
        kube_cp.request("DELETE", f"{rbac}/clusterrolebindings/{role}")
        kube_cp.request("DELETE", f"{rbac}/clusterroles/{role}")
        kube_cp.request("DELETE", f"/api/v1/namespaces/{ns}")


async def _mark(rights: Rights, info: PodInfo, enabled: bool) -> bool:
    """The agent's own code (`KubePodSource`'s mark worker) with the agent's token: whether
    the wish was settled (applied, or the pod is gone) within 30 s."""
    config = KubeConfig(server=rights.cp.server, token=rights.token, ca_file=str(rights.cp.ca_path))
    async with KubeClient(config) as client:
        source = KubePodSource(client, rights.node, sync_wait=10)
        await source.start(lambda view: None)
        try:
            source.mark_redirection(info, enabled)
            # The binding reaches the API server's authorizer within a moment; until then
            # the worker retries its refused patch.
            return await source.flush_marks(30)
        finally:
            await source.close()


def test_the_agent_marks_its_pods_with_the_charts_rights(rights: Rights) -> None:
    info = PodInfo(uid=rights.create_pod("web"), name="web", namespace=rights.ns, node=rights.node)
    assert asyncio.run(_mark(rights, info, True)), "the mark was never applied"
    annotations = rights.pod("web")["metadata"].get("annotations") or {}
    assert annotations.get(REDIRECTION_ANNOTATION) == REDIRECTION_ENABLED
    assert asyncio.run(_mark(rights, info, False)), "the mark was never removed"
    annotations = rights.pod("web")["metadata"].get("annotations") or {}
    assert REDIRECTION_ANNOTATION not in annotations


def test_a_pod_recreated_under_the_same_name_is_not_marked(rights: Rights) -> None:
    """The UID precondition holds on the status subresource too: the wish for the deleted
    pod is settled as gone, and the new pod of that name stays unmarked."""
    old = PodInfo(uid=rights.create_pod("db"), name="db", namespace=rights.ns, node=rights.node)
    path = f"/api/v1/namespaces/{rights.ns}/pods/db"
    api_ok(rights.cp, "DELETE", path, {"gracePeriodSeconds": 0})
    new_uid = rights.create_pod("db")
    assert asyncio.run(_mark(rights, old, True)), "the wish for the old pod was never settled"
    pod = rights.pod("db")
    assert pod["metadata"]["uid"] == new_uid
    assert REDIRECTION_ANNOTATION not in (pod["metadata"].get("annotations") or {})


def test_the_agents_token_cannot_change_what_a_pod_runs(rights: Rights) -> None:
    rights.create_pod("victim")
    path = f"/api/v1/namespaces/{rights.ns}/pods/victim"
    evil = {"spec": {"containers": [{"name": "app", "image": "evil.invalid/shell:1"}]}}
    # A write on the pod itself (spec, metadata, anything) and a deletion are refused...
    assert rights.as_agent("PATCH", path, evil) == 403
    assert rights.as_agent("PATCH", path, {"metadata": {"labels": {"app": "other"}}}) == 403
    assert rights.as_agent("DELETE", path) == 403
    # ... and a spec sent to the status subresource is dropped by the API server. The
    # annotation patch alongside shows the status write itself went through (and that the
    # binding is in effect, which the first refusals alone could not tell).
    evil_status = {**evil, "metadata": {"annotations": {"probe": "1"}}}
    assert rights.as_agent_once_bound("PATCH", path + "/status", evil_status) == 200
    pod = rights.pod("victim")
    assert (pod["metadata"].get("annotations") or {}).get("probe") == "1"
    assert [c["image"] for c in pod["spec"]["containers"]] == [IMAGE]


def test_what_the_agents_token_still_can_labels_through_status(rights: Rights) -> None:
    """The right that is left (SECURITY.md, "Not yet proven" 3): metadata, labels
    included, through pods/status. Kept as a test so the threat model stays true."""
    rights.create_pod("other")
    path = f"/api/v1/namespaces/{rights.ns}/pods/other/status"
    relabel = {"metadata": {"labels": {"app": "relabelled"}}}
    assert rights.as_agent_once_bound("PATCH", path, relabel) == 200
    assert rights.pod("other")["metadata"]["labels"] == {"app": "relabelled"}
