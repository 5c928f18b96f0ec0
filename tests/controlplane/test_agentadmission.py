"""The admission decision on the node agent's pods/status writes (pure), and the review's
reading and answer."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from controlplane.admission import ReviewError, read_review, review_answer
from controlplane.agentadmission import (
    AgentPod,
    agent_account,
    agent_pod,
    changed_fields,
    decide,
)
from meshcore.defaults import REDIRECTION_ANNOTATION

AGENTS = frozenset({"istio-system/ambient-node-agent"})
AGENT = "system:serviceaccount:istio-system:ambient-node-agent"
EXTRA = {
    "authentication.kubernetes.io/pod-name": ["ambient-node-agent-x1"],
    "authentication.kubernetes.io/pod-uid": ["uid-agent"],
}


def pod(node: str = "node1", **meta: Any) -> dict[str, Any]:
    metadata = {
        "name": "app",
        "namespace": "default",
        "uid": "uid-app",
        "resourceVersion": "10",
        "labels": {"app": "app"},
        "annotations": {"team": "a"},
        "managedFields": [{"manager": "kubelet"}],
        **meta,
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": {"nodeName": node, "containers": [{"name": "app", "image": "app:1"}]},
        "status": {"podIP": "10.0.0.5", "phase": "Running"},
    }


def marked(old: dict[str, Any], value: str | None = "enabled") -> dict[str, Any]:
    new = copy.deepcopy(old)
    notes = new["metadata"]["annotations"]
    if value is None:
        notes.pop(REDIRECTION_ANNOTATION, None)
    else:
        notes[REDIRECTION_ANNOTATION] = value
    new["metadata"]["resourceVersion"] = "11"
    new["metadata"]["managedFields"].append({"manager": "ambient-node-agent"})
    return new


def request(
    old: dict[str, Any],
    new: dict[str, Any],
    user: str = AGENT,
    *,
    sub: str = "status",
    op: str = "UPDATE",
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "uid": "r-1",
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "subResource": sub,
        "operation": op,
        "name": "app",
        "namespace": "default",
        "userInfo": {"username": user, "extra": EXTRA if extra is None else extra},
        "object": new,
        "oldObject": old,
    }


def test_the_agent_marks_and_unmarks_a_pod_of_its_own_node() -> None:
    old = pod()
    assert decide(request(old, marked(old)), AGENTS, "node1").allowed
    on = marked(old)
    assert decide(request(on, marked(on, None)), AGENTS, "node1").allowed


def test_a_pod_of_another_node_is_refused_and_the_message_names_both_nodes() -> None:
    old = pod(node="node2")
    d = decide(request(old, marked(old)), AGENTS, "node1")
    assert not d.allowed
    assert "'node1'" in d.message and "'node2'" in d.message


def test_a_pod_not_yet_scheduled_is_refused() -> None:
    old = pod(node="")
    d = decide(request(old, marked(old)), AGENTS, "node1")
    assert not d.allowed and "no node yet" in d.message


def test_a_token_bound_to_no_pod_is_refused() -> None:
    old = pod()
    d = decide(request(old, marked(old)), AGENTS, None)
    assert not d.allowed and "not bound" in d.message


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda p: p["metadata"]["labels"].update(app="other"), "metadata.labels[app]"),
        (lambda p: p["metadata"]["labels"].update(extra="x"), "metadata.labels[extra]"),
        (lambda p: p["metadata"]["annotations"].pop("team"), "metadata.annotations[team]"),
        (lambda p: p["status"].update(podIP="10.0.0.9"), "status"),
        (lambda p: p["metadata"].update(finalizers=["x"]), "metadata.finalizers"),
        (
            lambda p: p["metadata"].update(ownerReferences=[{"uid": "u"}]),
            "metadata.ownerReferences",
        ),
        (lambda p: p["spec"].update(nodeName="node1x"), "spec"),
    ],
)
def test_any_other_change_is_refused_and_named(change: Any, named: str) -> None:
    old = pod()
    new = marked(old)
    change(new)
    d = decide(request(old, new), AGENTS, "node1")
    assert not d.allowed
    assert named in d.message


def test_only_enabled_is_a_mark() -> None:
    old = pod()
    d = decide(request(old, marked(old, "disabled")), AGENTS, "node1")
    assert not d.allowed and "'disabled'" in d.message


def test_the_agent_writes_only_pods_status_updates() -> None:
    old = pod()
    for sub, op in (("", "UPDATE"), ("ephemeralcontainers", "UPDATE"), ("status", "DELETE")):
        d = decide(request(old, marked(old), sub=sub, op=op), AGENTS, "node1")
        assert not d.allowed, (sub, op)


def test_writes_of_anyone_else_are_not_judged() -> None:
    old = pod(node="node2")
    new = marked(old)
    new["metadata"]["labels"]["app"] = "relabelled"
    for user in (
        "system:node:node2",
        "system:serviceaccount:kube-system:statefulset-controller",
        "system:serviceaccount:other-ns:ambient-node-agent",
        "system:serviceaccount:istio-system:ambient-node-agentx",
    ):
        assert decide(request(old, new, user), AGENTS, None).allowed, user


def test_a_review_without_objects_is_refused_for_the_agent() -> None:
    req = request(pod(), pod())
    del req["oldObject"]
    assert not decide(req, AGENTS, "node1").allowed


def test_server_written_metadata_is_no_change() -> None:
    old = pod()
    new = copy.deepcopy(old)
    new["metadata"]["resourceVersion"] = "99"
    new["metadata"]["managedFields"] = []
    assert changed_fields(old, new) == []


def test_agent_account_and_pod_from_user_info() -> None:
    assert agent_account(AGENT, AGENTS)
    assert not agent_account("system:serviceaccount:istio-system", AGENTS)
    assert not agent_account("ambient-node-agent", AGENTS)
    assert agent_pod({"username": AGENT, "extra": EXTRA}) == AgentPod(
        "istio-system", "ambient-node-agent-x1", "uid-agent"
    )
    assert agent_pod({"username": AGENT}) is None
    assert agent_pod({"username": AGENT, "extra": {"x": ["y"]}}) is None
    assert agent_pod({"username": "system:node:n1", "extra": EXTRA}) is None


def test_a_review_is_read_strictly_and_answered_in_its_own_version() -> None:
    req = request(pod(), marked(pod()))
    for version in ("admission.k8s.io/v1", "admission.k8s.io/v1beta1"):
        body = json.dumps({"apiVersion": version, "kind": "AdmissionReview", "request": req})
        assert read_review(body.encode()) == (version, req)
    for bad in (
        b"not json",
        b"[]",
        json.dumps({"apiVersion": "admission.k8s.io/v2", "kind": "AdmissionReview"}).encode(),
        json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "Pod", "request": req}).encode(),
        json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}).encode(),
        json.dumps(
            {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {}}
        ).encode(),
    ):
        with pytest.raises(ReviewError):
            read_review(bad)
    old = pod(node="node2")
    answer = review_answer(
        "admission.k8s.io/v1", "r-1", decide(request(old, marked(old)), AGENTS, "n")
    )
    assert answer["response"]["uid"] == "r-1"
    assert answer["response"]["allowed"] is False
    assert answer["response"]["status"]["code"] == 403
    assert review_answer(
        "admission.k8s.io/v1", "r-2", decide(request(old, old, "u"), AGENTS, None)
    )["response"] == {"uid": "r-2", "allowed": True}
