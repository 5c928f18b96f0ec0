"""What the node agent may write through pods/status: the admission decision (pure).

The agent marks each pod it captured with istio-cni's `ambient.istio.io/redirection`
annotation, written through the pods/status subresource, which is also how every kubelet
reports a pod's status. RBAC cannot narrow that right further: the agent's token could
change any pod's labels, its other annotations or its status (its podIP among them)
anywhere in the cluster, and labels decide which Services, policies and waypoints select a
pod. This check, run by the API server as a validating webhook, lets a node agent's write
through pods/status change that one annotation and nothing else, set to `enabled` or
removed, and only on a pod of the agent's own node. Calls of anyone else (kubelets,
controllers) are not judged.

The agent's node comes from its token: a bound service-account token (what a kubelet
mounts) carries the name and UID of the agent's pod, which the caller looks up; a token
not bound to a pod says no node, and is refused (fail closed).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from controlplane.ca_grpc_auth import EXTRA_POD_NAME, EXTRA_POD_UID, SA_PREFIX, first_value
from meshcore.defaults import REDIRECTION_ANNOTATION, REDIRECTION_ENABLED

# What the API server itself changes on every write: never a change of the caller's.
NODE_AGENT_ACCOUNT = "ambient-node-agent"  # the node-agent chart's ServiceAccount
_SERVER_OWNED = frozenset({"resourceVersion", "managedFields"})


@dataclass(frozen=True, slots=True)
class AgentPod:
    """The pod a node agent's token is bound to (from the review's userInfo)."""

    namespace: str
    name: str
    uid: str


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    message: str = ""


ALLOWED = Decision(True)


def agent_account(username: str, agents: Collection[str]) -> bool:
    """Whether `username` is one of the node agents' service accounts (`ns/name`)."""
    if not username.startswith(SA_PREFIX):
        return False
    ns, _, name = username[len(SA_PREFIX) :].partition(":")
    return f"{ns}/{name}" in agents


def agent_pod(user_info: Mapping[str, Any]) -> AgentPod | None:
    """The pod the caller's token is bound to, or None (a token bound to nothing)."""
    username = str(user_info.get("username", ""))
    if not username.startswith(SA_PREFIX):
        return None
    namespace = username[len(SA_PREFIX) :].partition(":")[0]
    extra = user_info.get("extra")
    if not isinstance(extra, Mapping):
        return None
    name, uid = first_value(extra.get(EXTRA_POD_NAME)), first_value(extra.get(EXTRA_POD_UID))
    if not (namespace and name and uid):
        return None
    return AgentPod(namespace, name, uid)


def is_agent_call(request: Mapping[str, Any], agents: Collection[str]) -> bool:
    user = request.get("userInfo")
    return isinstance(user, Mapping) and agent_account(str(user.get("username", "")), agents)


def decide(request: Mapping[str, Any], agents: Collection[str], agent_node: str | None) -> Decision:
    """The verdict on one AdmissionReview request. `agent_node` is the node of the pod the
    caller's token is bound to, as the caller found it (None: not bound, or no such pod)."""
    if not is_agent_call(request, agents):
        return ALLOWED  # kubelets and controllers: not ours to judge
    resource = request.get("resource")
    plural = resource.get("resource") if isinstance(resource, Mapping) else None
    if (
        plural != "pods"
        or request.get("subResource") != "status"
        or request.get("operation") != "UPDATE"
    ):
        what = f"{request.get('operation')} {plural}/{request.get('subResource') or ''}"
        return _refuse(f"the node agent may only update pods/status, not {what.rstrip('/')}")
    old, new = request.get("oldObject"), request.get("object")
    if not isinstance(old, Mapping) or not isinstance(new, Mapping):
        return _refuse("the review carries no old and new pod to compare")
    changed = changed_fields(old, new)
    if changed:
        return _refuse(
            f"the node agent may change only the {REDIRECTION_ANNOTATION} annotation "
            f"through pods/status; this request also changes {', '.join(changed)}"
        )
    value = _annotations(new).get(REDIRECTION_ANNOTATION)
    if value is not None and value != REDIRECTION_ENABLED:
        return _refuse(
            f"{REDIRECTION_ANNOTATION} may only be {REDIRECTION_ENABLED!r}, not {value!r}"
        )
    if agent_node is None:
        return _refuse(
            "the node agent's token is not bound to a running pod of its own, so its node "
            "is unknown (a kubelet mounts a bound token; a legacy secret token says no node)"
        )
    spec = old.get("spec")
    pod_node = str(spec.get("nodeName") or "") if isinstance(spec, Mapping) else ""
    if pod_node != agent_node:
        where = f"node {pod_node!r}" if pod_node else "no node yet"
        return _refuse(
            f"the node agent of node {agent_node!r} may mark only its own node's pods; "
            f"this pod is on {where}"
        )
    return ALLOWED


def changed_fields(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """The fields `new` changes, as dotted paths (sorted), besides the redirection
    annotation and what the API server writes itself. Compared a level into metadata,
    annotations and labels, so the message names the key that changed."""
    out: list[str] = []
    for key in sorted(set(old) | set(new)):
        if key == "metadata":
            out += _metadata_changes(_mapping(old.get(key)), _mapping(new.get(key)))
        elif old.get(key) != new.get(key):
            out.append(key)
    return out


def _metadata_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    out: list[str] = []
    for key in sorted(set(old) | set(new)):
        if key in _SERVER_OWNED:
            continue
        if key in ("annotations", "labels"):
            a, b = _mapping(old.get(key)), _mapping(new.get(key))
            for name in sorted(set(a) | set(b)):
                if a.get(name) != b.get(name) and not (
                    key == "annotations" and name == REDIRECTION_ANNOTATION
                ):
                    out.append(f"metadata.{key}[{name}]")
        elif old.get(key) != new.get(key):
            out.append(f"metadata.{key}")
    return out


def _annotations(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return _mapping(_mapping(obj.get("metadata")).get("annotations"))


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _refuse(message: str) -> Decision:
    return Decision(False, message)
