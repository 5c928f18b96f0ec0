"""Workloads from Pods and services from Services + selectors, as the LOCAL_XDS document
writes them (`meshcore.discovery`). Pure: Kubernetes objects (dicts) in, document entries out.

Rules (Istio ambient's, unless marked ours):
- a Pod is a workload once it has an IP and has not ended (phase Succeeded/Failed); a
  hostNetwork Pod is never one (its IP is the node's, shared by every such pod: ours);
- it speaks HBONE when enrolled: its own `istio.io/dataplane-mode` label, else its
  namespace's, is `ambient` (`none` on the pod opts out); a waypoint's own pods are never
  captured yet speak HBONE on 15008 themselves, so they are HBONE too;
- it is Healthy when its Ready condition is True;
- a Service selects the Pods of its namespace whose labels include its (non-empty)
  selector; ExternalName Services have no workloads and are left out; only TCP ports count;
- a Service without a selector (its Endpoints written by hand or by another controller, as
  for `default/kubernetes`) is left out too (ours, until Endpoints are read): the tunnels
  then pass its traffic through to its virtual IP, as upstream ztunnel does for an address
  it does not know, and the node's service proxy takes it from there. Published with no
  endpoints, it would be refused ("no healthy endpoints") to every enrolled pod;
- a port's targetPort is a number, or the name of a container port of the pod (resolved per
  pod; a pod without that port is not an endpoint of that port). The service-level
  targetPort of a named port is the first selected pod's (by namespace/name), else the
  service port itself (ours: the document needs a number there);
- no two workloads may hold the same IP (the document refuses that): the pod that is not
  being deleted wins, then the first by namespace/name; the other is reported.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from meshcore.state import parse_app_protocol

Obj = Mapping[str, Any]

DATAPLANE_MODE_LABEL = "istio.io/dataplane-mode"
AMBIENT = "ambient"
CANONICAL_NAME_LABEL = "service.istio.io/canonical-name"
CANONICAL_REVISION_LABEL = "service.istio.io/canonical-revision"
DEFAULT_SERVICE_ACCOUNT = "default"
ENDED_PHASES = frozenset({"Succeeded", "Failed"})


@dataclass(frozen=True, slots=True)
class Problem:
    """Something wrong with one object, for its status, an Event or a log line."""

    kind: str
    namespace: str
    name: str
    message: str

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}: {self.message}"


# Objects come decoded from JSON: `dict` checks (not the slower abstract `Mapping`) on the
# accessors every pod and service goes through.
def meta(obj: Obj) -> Obj:
    m = obj.get("metadata")
    return m if isinstance(m, dict) else {}


def spec(obj: Obj) -> Obj:
    s = obj.get("spec")
    return s if isinstance(s, dict) else {}


def status(obj: Obj) -> Obj:
    s = obj.get("status")
    return s if isinstance(s, dict) else {}


def labels(obj: Obj) -> dict[str, str]:
    raw = meta(obj).get("labels")
    if not isinstance(raw, dict):
        return {}
    return {str(k): v for k, v in raw.items() if isinstance(v, str)}


def name_of(obj: Obj) -> str:
    return str(meta(obj).get("name", ""))


def namespace_of(obj: Obj) -> str:
    return str(meta(obj).get("namespace", ""))


def key_of(obj: Obj) -> tuple[str, str]:
    return (namespace_of(obj), name_of(obj))


# ---- pods ---------------------------------------------------------------------------------


def pod_ips(pod: Obj) -> list[str]:
    st = status(pod)
    ips = [str(p["ip"]) for p in st.get("podIPs") or () if isinstance(p, Mapping) and p.get("ip")]
    if not ips and st.get("podIP"):
        ips = [str(st["podIP"])]
    return ips


def is_candidate(pod: Obj) -> bool:
    """Can this Pod be a workload at all (IP, running or starting, not hostNetwork)?"""
    if spec(pod).get("hostNetwork") is True:
        return False
    return status(pod).get("phase") not in ENDED_PHASES and bool(pod_ips(pod))


def is_ready(pod: Obj) -> bool:
    return any(
        isinstance(c, Mapping) and c.get("type") == "Ready" and c.get("status") == "True"
        for c in status(pod).get("conditions") or ()
    )


def enrolled(pod: Obj, namespace_labels: Mapping[str, str]) -> bool:
    """In ambient: the pod's `istio.io/dataplane-mode` label, else its namespace's."""
    if spec(pod).get("hostNetwork") is True:
        return False
    own = labels(pod).get(DATAPLANE_MODE_LABEL)
    if own is not None:
        return own == AMBIENT
    return namespace_labels.get(DATAPLANE_MODE_LABEL) == AMBIENT


def workload_name(pod: Obj) -> str:
    """The pod's workload, as Istio names it: a ReplicaSet's Deployment, another owner's
    name, or the pod itself."""
    pod_labels = labels(pod)
    for owner in meta(pod).get("ownerReferences") or ():
        if not isinstance(owner, Mapping) or not owner.get("controller"):
            continue
        owner_name = str(owner.get("name", ""))
        hash_ = pod_labels.get("pod-template-hash")
        if owner.get("kind") == "ReplicaSet" and hash_ and owner_name.endswith(f"-{hash_}"):
            return owner_name[: -len(hash_) - 1]
        if owner_name:
            return owner_name
    return name_of(pod)


def canonical_name(pod: Obj) -> str:
    lb = labels(pod)
    return (
        lb.get(CANONICAL_NAME_LABEL)
        or lb.get("app.kubernetes.io/name")
        or lb.get("app")
        or workload_name(pod)
    )


def canonical_revision(pod: Obj) -> str:
    lb = labels(pod)
    return (
        lb.get(CANONICAL_REVISION_LABEL)
        or lb.get("app.kubernetes.io/version")
        or lb.get("version")
        or "latest"
    )


def container_port(pod: Obj, port_name: str) -> int | None:
    for c in spec(pod).get("containers") or ():
        if not isinstance(c, Mapping):
            continue
        for p in c.get("ports") or ():
            if isinstance(p, Mapping) and p.get("name") == port_name:
                n = p.get("containerPort")
                if isinstance(n, int) and not isinstance(n, bool):
                    return n
    return None


def unique_by_ip(pods: Iterable[Obj]) -> tuple[list[Obj], list[Problem]]:
    """The pods that may be workloads, sorted, no IP held twice (see the module's rules)."""
    ordered = sorted(
        (p for p in pods if is_candidate(p)),
        key=lambda p: (bool(meta(p).get("deletionTimestamp")), key_of(p)),
    )
    owner: dict[str, tuple[str, str]] = {}
    kept: list[Obj] = []
    problems: list[Problem] = []
    for pod in ordered:
        clash = next((owner[ip] for ip in pod_ips(pod) if ip in owner), None)
        if clash is not None:
            ns, name = key_of(pod)
            problems.append(
                Problem("Pod", ns, name, f"its IP is also pod {clash[0]}/{clash[1]}'s; left out")
            )
            continue
        for ip in pod_ips(pod):
            owner[ip] = key_of(pod)
        kept.append(pod)
    kept.sort(key=key_of)
    return kept, problems


# ---- services -----------------------------------------------------------------------------


def hostname(svc: Obj, domain: str) -> str:
    return f"{name_of(svc)}.{namespace_of(svc)}.svc.{domain}"


def service_vips(svc: Obj) -> list[str]:
    sp = spec(svc)
    ips = [str(ip) for ip in sp.get("clusterIPs") or () if ip]
    if not ips and sp.get("clusterIP"):
        ips = [str(sp["clusterIP"])]
    return [f"/{ip}" for ip in ips if ip != "None"]


def tcp_ports(svc: Obj) -> list[Obj]:
    return [
        p
        for p in spec(svc).get("ports") or ()
        if isinstance(p, Mapping)
        and isinstance(p.get("port"), int)
        and p.get("protocol", "TCP") == "TCP"
    ]


def published(svc: Obj) -> bool:
    """Whether a Service is one the mesh knows (see the rules above)."""
    s = spec(svc)
    selector = s.get("selector")
    return s.get("type") != "ExternalName" and isinstance(selector, Mapping) and bool(selector)


def selects(svc: Obj, pod: Obj) -> bool:
    selector = spec(svc).get("selector")
    if not isinstance(selector, Mapping) or not selector:
        return False
    if namespace_of(svc) != namespace_of(pod):
        return False
    pod_labels = labels(pod)
    return all(pod_labels.get(k) == v for k, v in selector.items())


class PodIndex:
    """Pods by (namespace, label, value), so a selector is a few set lookups instead of a
    scan of every pod of the namespace (the scan was most of the compute at thousands)."""

    def __init__(self, pods: Iterable[Obj]) -> None:
        self.pods = list(pods)
        self._by_label: dict[tuple[str, str, str], list[int]] = {}
        for i, pod in enumerate(self.pods):
            ns = namespace_of(pod)
            for k, v in labels(pod).items():
                self._by_label.setdefault((ns, k, v), []).append(i)

    def selected(self, svc: Obj) -> list[Obj]:
        """The pods `selects(svc, pod)` holds for, in the index's order."""
        selector = spec(svc).get("selector")
        if not isinstance(selector, dict) or not selector:
            return []
        ns = namespace_of(svc)
        hits = [self._by_label.get((ns, str(k), v), []) for k, v in selector.items()]
        smallest = min(hits, key=len)
        others = [set(h) for h in hits if h is not smallest]
        return [self.pods[i] for i in smallest if all(i in o for o in others)]


def target_port(port: Obj, pod: Obj | None) -> int | None:
    """A service port's target on `pod` (None: the pod has no such named port)."""
    target = port.get("targetPort")
    if target is None:
        return int(port["port"])
    if isinstance(target, int) and not isinstance(target, bool):
        return target
    if isinstance(target, str) and target.isdigit():
        return int(target)
    if pod is None or not isinstance(target, str):
        return None
    return container_port(pod, target)


def service_ports(svc: Obj, selected: list[Obj], report: Callable[[str], None]) -> dict[int, Any]:
    """The document's `ports` of a service: `{port: {targetPort, name?, appProtocol?}}`."""
    out: dict[int, Any] = {}
    for p in tcp_ports(svc):
        number = int(p["port"])
        target = target_port(p, None)
        if target is None:
            target = next((t for t in (target_port(p, pod) for pod in selected) if t), number)
        entry: dict[str, Any] = {"targetPort": target}
        if isinstance(p.get("name"), str) and p["name"]:
            entry["name"] = p["name"]
        app = p.get("appProtocol")
        if isinstance(app, str) and app:
            try:
                parse_app_protocol(app)
                entry["appProtocol"] = app
            except ValueError as exc:
                # Unknown to the mesh: the port's name decides its protocol, as with none.
                report(f"port {number}: appProtocol ignored: {exc}")
        out[number] = entry
    return out


def workload_ports(svc: Obj, pod: Obj) -> dict[int, int]:
    """`services` of a workload: this service's ports that resolve on this pod."""
    out: dict[int, int] = {}
    for p in tcp_ports(svc):
        target = target_port(p, pod)
        if target is not None:
            out[int(p["port"])] = target
    return out
