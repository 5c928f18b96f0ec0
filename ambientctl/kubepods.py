"""`ambientctl get pods` on a Kubernetes cluster: the API server's Pods as `PodRow`s.

READY, STATUS, RESTARTS and AGE as kubectl derives them from a Pod's status; MESH from the
node agent's own enrolment rule (`redirect.enrolment`, on the pod's and its namespace's
labels) and its `ambient.istio.io/redirection` mark on each pod it captured; a waypoint's
pod by its Gateway label. NETNS is the local kubelet's name for the pod's netns
(`kube.podnetns`) when such a netns exists on this machine. `pod_row` is pure.
"""

from __future__ import annotations

import calendar
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import nsutil
from ambientctl import kubefetch, podsview
from ambientctl.kubefetch import KubeTarget
from ambientctl.kubeviews import ISTIO_NAMESPACE, Snapshot, annotated
from ambientctl.podsview import PodRow
from controlplane.endpoints import labels, pod_ips
from controlplane.waypoints import GATEWAY_NAME_LABEL
from kube.podnetns import netns_name
from redirect.enrolment import PodInfo, redirection_enabled

Obj = Mapping[str, Any]


def _dict(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def created(pod: Obj) -> float | None:
    stamp = _dict(pod.get("metadata")).get("creationTimestamp")
    if not isinstance(stamp, str):
        return None
    try:
        return float(calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ")))
    except ValueError:
        return None


def status_of(pod: Obj) -> tuple[bool, str, int, int | None]:
    """(ready, STATUS, restarts, last exit code) as kubectl prints them."""
    st = _dict(pod.get("status"))
    reason = str(st.get("reason") or st.get("phase") or "Pending")
    restarts = 0
    code: int | None = None
    statuses = [_dict(c) for c in st.get("containerStatuses") or ()]
    for c in statuses:
        count = c.get("restartCount")
        restarts += count if isinstance(count, int) else 0
        state = _dict(c.get("state"))
        term = _dict(state.get("terminated")) or _dict(_dict(c.get("lastState")).get("terminated"))
        if isinstance(term.get("exitCode"), int):
            code = term["exitCode"]
        waiting = _dict(state.get("waiting"))
        if waiting.get("reason"):
            reason = str(waiting["reason"])
        elif state.get("terminated"):
            t = _dict(state["terminated"])
            reason = str(t.get("reason") or f"ExitCode:{t.get('exitCode')}")
    if _dict(pod.get("metadata")).get("deletionTimestamp"):
        reason = "Terminating"
    ready = bool(statuses) and all(c.get("ready") is True for c in statuses)
    return ready, reason, restarts, code


def pod_row(
    pod: Obj,
    namespace_labels: Mapping[str, Mapping[str, str]],
    trust_domain: str,
    netns_exists: Callable[[str], bool],
) -> PodRow:
    md, spec = _dict(pod.get("metadata")), _dict(pod.get("spec"))
    ns, name, uid = str(md.get("namespace", "")), str(md.get("name", "")), str(md.get("uid", ""))
    pod_labels = labels(pod)
    ready, status, restarts, code = status_of(pod)
    info = PodInfo(
        uid=uid,
        name=name,
        namespace=ns,
        node=str(spec.get("nodeName") or ""),
        labels=pod_labels,
        annotations={str(k): str(v) for k, v in _dict(md.get("annotations")).items()},
        host_network=spec.get("hostNetwork") is True,
        phase=str(_dict(pod.get("status")).get("phase") or "Pending"),
    )
    wanted = redirection_enabled(namespace_labels.get(ns), info)
    if GATEWAY_NAME_LABEL in pod_labels and not wanted:
        mesh, reason = podsview.WAYPOINT, ""
    elif annotated(pod):
        mesh, reason = podsview.ENROLLED, ""
    elif wanted:
        mesh, reason = podsview.PENDING, "not captured by the node agent yet"
    else:
        mesh, reason = podsview.NOT_ENROLLED, ""
    try:
        netns = netns_name(uid)
    except ValueError:
        netns = ""
    sa = str(spec.get("serviceAccountName") or "default")
    ips = pod_ips(pod)
    return PodRow(
        namespace=ns,
        name=name,
        ready=ready,
        status=status,
        mesh=mesh,
        mesh_reason=reason,
        restarts=restarts,
        created_at=created(pod),
        node=info.node,
        ip=ips[0] if ips else "",
        netns=netns if netns and netns_exists(netns) else "",
        identity=f"spiffe://{trust_domain}/ns/{ns}/sa/{sa}"
        if mesh != podsview.NOT_ENROLLED
        else "",
        exit_code=code,
        labels=pod_labels,
    )


def rows_of(snap: Snapshot, netns_exists: Callable[[str], bool]) -> list[PodRow]:
    ns_labels = {
        str(_dict(n.get("metadata")).get("name")): labels(n) for n in snap.of("namespaces")
    }
    td = snap.settings().trust_domain
    return [pod_row(p, ns_labels, td, netns_exists) for p in snap.of("pods")]


def _netns_exists(name: str) -> bool:
    return os.path.exists(nsutil.netns_path(name))


def rows(target: KubeTarget, istio_namespace: str = ISTIO_NAMESPACE) -> list[PodRow]:
    snap = kubefetch.run(target, lambda c: kubefetch.snapshot(c, istio_namespace, mesh=False))
    return rows_of(snap, _netns_exists)
