"""The control plane's admission webhook (`controlplane.admission`, istiod's 15017): the
AdmissionReview body any pod that reaches the port may send, read and judged as the
server does (`read_review`, then the node agent's decision and the answer's JSON).

Contract: `read_review` raises ReviewError and nothing else (the server answers 400); a
review it accepted is judged and answered without raising (a handler that raised would be
a 500, not the verdict), and an agent's write is never allowed unless it is the mark, on
the agent's own node.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any

from controlplane.admission import ReviewError, read_review, review_answer
from controlplane.agentadmission import agent_pod, decide, is_agent_call
from meshcore.defaults import REDIRECTION_ANNOTATION, REDIRECTION_ENABLED

AGENTS = frozenset({"istio-system/ambient-node-agent"})
AGENT_NODE = "node1"  # where the lookup says every agent pod runs


def test_one_input(data: bytes) -> None:
    try:
        version, review = read_review(data)
    except ReviewError:
        return
    node = None
    if is_agent_call(review, AGENTS):
        user = review.get("userInfo")
        assert isinstance(user, dict)
        node = AGENT_NODE if agent_pod(user) is not None else None
    decision = decide(review, AGENTS, node)
    answer = review_answer(version, str(review["uid"]), decision)
    json.dumps(answer)
    if decision.allowed and is_agent_call(review, AGENTS):
        # Fail closed: an allowed agent write is an UPDATE of pods/status on its own node
        # whose only change, if any, is the mark.
        assert review.get("operation") == "UPDATE" and review.get("subResource") == "status"
        assert node == AGENT_NODE and review["oldObject"]["spec"]["nodeName"] == AGENT_NODE
        mark = ((review["object"].get("metadata") or {}).get("annotations") or {}).get(
            REDIRECTION_ANNOTATION
        )
        assert mark in (None, REDIRECTION_ENABLED)
        assert _without_mark(review["oldObject"]) == _without_mark(review["object"])


def _without_mark(pod: dict[str, Any]) -> dict[str, Any]:
    """The pod as the agent may not change it: without the mark and what the API server
    writes itself. A metadata, annotations or labels that is empty or not a mapping counts
    as absent (the API server never sends one that is not)."""
    out = dict(pod)  # only its top level and a new metadata are changed
    meta = out.pop("metadata", None)
    meta = dict(meta) if isinstance(meta, dict) else {}
    for owned in ("resourceVersion", "managedFields"):
        meta.pop(owned, None)
    annotations = meta.get("annotations")
    if isinstance(annotations, dict):
        meta["annotations"] = {k: v for k, v in annotations.items() if k != REDIRECTION_ANNOTATION}
    for key in ("annotations", "labels"):
        if not isinstance(meta.get(key), dict) or not meta[key]:
            meta.pop(key, None)
    if meta:
        out["metadata"] = meta
    return out


def _review(
    user: Mapping[str, object], old: Mapping[str, object], new: Mapping[str, object]
) -> bytes:
    return json.dumps(
        {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "subResource": "status",
                "name": "frontend-0",
                "namespace": "travel",
                "operation": "UPDATE",
                "userInfo": user,
                "oldObject": old,
                "object": new,
                "dryRun": False,
            },
        },
        sort_keys=True,
    ).encode()


def seeds() -> dict[str, bytes]:
    agent = {
        "username": "system:serviceaccount:istio-system:ambient-node-agent",
        "groups": ["system:serviceaccounts", "system:authenticated"],
        "extra": {
            "authentication.kubernetes.io/pod-name": ["ambient-node-agent-x7k2p"],
            "authentication.kubernetes.io/pod-uid": ["4f6c1c52-1b6e-4a53-9d0e-2f1a3c5b7d90"],
        },
    }
    pod: dict[str, Any] = {
        "metadata": {"name": "frontend-0", "namespace": "travel", "labels": {"app": "frontend"}},
        "spec": {"nodeName": "node1"},
        "status": {"podIP": "10.244.1.10"},
    }
    marked = copy.deepcopy(pod)
    marked["metadata"]["annotations"] = {REDIRECTION_ANNOTATION: REDIRECTION_ENABLED}
    relabelled = copy.deepcopy(pod)
    relabelled["metadata"]["labels"] = {"app": "payments"}
    kubelet = {"username": "system:node:node1", "groups": ["system:nodes"]}
    return {
        "agent_mark": _review(agent, pod, marked),
        "agent_unmark": _review(agent, marked, pod),
        "agent_relabel": _review(agent, pod, relabelled),
        "kubelet_status": _review(kubelet, pod, relabelled),
    }
