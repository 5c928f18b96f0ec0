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
from collections.abc import Iterator

import pytest

from localcluster.kube.apiserver import KubeControlPlane
from meshcore.defaults import REDIRECTION_ANNOTATION, REDIRECTION_ENABLED
from redirect.enrolment import PodInfo
from tests.support.agentrights import IMAGE, Rights, agent_rights, mark_as_agent
from tests.support.kubetokens import api_ok

pytestmark = pytest.mark.kube


@pytest.fixture
def rights(kube_cp: KubeControlPlane) -> Iterator[Rights]:
    yield from agent_rights(kube_cp)


def test_the_agent_marks_its_pods_with_the_charts_rights(rights: Rights) -> None:
    info = PodInfo(uid=rights.create_pod("web"), name="web", namespace=rights.ns, node=rights.node)
    assert asyncio.run(mark_as_agent(rights, info, True)), "the mark was never applied"
    annotations = rights.pod("web")["metadata"].get("annotations") or {}
    assert annotations.get(REDIRECTION_ANNOTATION) == REDIRECTION_ENABLED
    assert asyncio.run(mark_as_agent(rights, info, False)), "the mark was never removed"
    annotations = rights.pod("web")["metadata"].get("annotations") or {}
    assert REDIRECTION_ANNOTATION not in annotations


def test_a_pod_recreated_under_the_same_name_is_not_marked(rights: Rights) -> None:
    """The UID precondition holds on the status subresource too: the wish for the deleted
    pod is settled as gone, and the new pod of that name stays unmarked."""
    old = PodInfo(uid=rights.create_pod("db"), name="db", namespace=rights.ns, node=rights.node)
    path = f"/api/v1/namespaces/{rights.ns}/pods/db"
    api_ok(rights.cp, "DELETE", path, {"gracePeriodSeconds": 0})
    new_uid = rights.create_pod("db")
    assert asyncio.run(mark_as_agent(rights, old, True)), (
        "the wish for the old pod was never settled"
    )
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
    """What RBAC alone leaves (SECURITY.md; istiod's webhook narrows it): metadata, labels
    included, through pods/status. Kept as a test so the threat model stays true."""
    rights.create_pod("other")
    path = f"/api/v1/namespaces/{rights.ns}/pods/other/status"
    relabel = {"metadata": {"labels": {"app": "relabelled"}}}
    assert rights.as_agent_once_bound("PATCH", path, relabel) == 200
    assert rights.pod("other")["metadata"]["labels"] == {"app": "relabelled"}
