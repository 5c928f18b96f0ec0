"""Which pods of a node belong in the mesh: the watched pod source and the pure decision.

A node agent sees pods through a `PodSource`: an object that, once started, calls back with
a complete `NodeView` (this node's pods and every namespace's labels) whenever something
changed. The local cluster's source is a JSON file the cluster writes (`FilePodSource`); a
Kubernetes informer source can sit behind the same interface later.

`redirection_enabled` is the decision, written from istio-cni's `PodRedirectionEnabled`
(cni/pkg/util/podutil.go) plus the exclusions its snapshot applies (informers.go):
- the namespace OR the pod is labelled `istio.io/dataplane-mode=ambient`;
- the pod is not labelled `istio.io/dataplane-mode=none` (the pod-level opt-out wins);
- the pod has no sidecar (annotation `sidecar.istio.io/status`): both at once is unsupported;
- the pod is not on the host network: its "pod netns" would be the node's own;
- the pod is not terminal (phase Succeeded/Failed): its processes are gone;
- the pod is not a tunnel pod (label app=ztunnel in the system namespace).
A pod that should be enrolled but has no IP or netns yet waits (`wanted` leaves it out),
as upstream skips a pod update without IPs until its CNI plugin ran.

Invariants:
- Parsing is all-or-nothing: a malformed file raises `SourceError` naming the field, and
  the file source then keeps its last good view (an agent never un-enrols a node's pods
  because someone saved half a file).
- Every value inside a `NodeView` is immutable.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

import structlog

from meshcore.defaults import ROOT_NAMESPACE, SERVICE_ACCOUNT
from meshcore.reader import Reader

log = structlog.get_logger(__name__)

DATAPLANE_MODE_LABEL = "istio.io/dataplane-mode"
DATAPLANE_MODE_AMBIENT = "ambient"
DATAPLANE_MODE_NONE = "none"
SIDECAR_STATUS_ANNOTATION = "sidecar.istio.io/status"
TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})
SOURCE_VERSION = 1

_EMPTY: Mapping[str, str] = MappingProxyType({})
_EMPTY_NS: Mapping[str, Mapping[str, str]] = MappingProxyType({})


class SourceError(ValueError):
    """The pod source document is malformed; the message names the offending field."""


@dataclass(frozen=True, slots=True)
class PodInfo:
    """One pod as the node agent needs it."""

    uid: str
    name: str
    namespace: str
    node: str
    service_account: str = SERVICE_ACCOUNT
    ip: IPv4Address | None = None  # None until the pod network is set up
    netns: str = ""  # path of the pod's network namespace; "" until known
    labels: Mapping[str, str] = field(default_factory=lambda: _EMPTY, hash=False)
    annotations: Mapping[str, str] = field(default_factory=lambda: _EMPTY, hash=False)
    host_network: bool = False
    phase: str = "Running"

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


_EMPTY_PODS: Mapping[str, PodInfo] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class NodeView:
    """Everything the source says about one node at one moment."""

    node: str
    pods: Mapping[str, PodInfo] = field(default_factory=lambda: _EMPTY_PODS, hash=False)  # uid
    namespaces: Mapping[str, Mapping[str, str]] = field(
        default_factory=lambda: _EMPTY_NS, hash=False
    )  # namespace -> its labels


def redirection_enabled(
    namespace_labels: Mapping[str, str] | None,
    pod: PodInfo,
    system_namespace: str = ROOT_NAMESPACE,
) -> bool:
    """Whether `pod` should have its traffic redirected through the node's tunnel.

    `namespace_labels` None means the namespace is unknown: upstream skips such a pod.
    """
    if namespace_labels is None:
        return False
    mode = pod.labels.get(DATAPLANE_MODE_LABEL)
    if namespace_labels.get(DATAPLANE_MODE_LABEL) != DATAPLANE_MODE_AMBIENT and (
        mode != DATAPLANE_MODE_AMBIENT
    ):
        return False
    if SIDECAR_STATUS_ANNOTATION in pod.annotations:
        return False
    if mode == DATAPLANE_MODE_NONE:
        return False
    if pod.host_network:
        return False
    if pod.phase in TERMINAL_PHASES:
        return False
    return not (pod.namespace == system_namespace and pod.labels.get("app") == "ztunnel")


def wanted(view: NodeView, system_namespace: str = ROOT_NAMESPACE) -> dict[str, PodInfo]:
    """The pods of `view.node` to enrol now (by uid): enabled, with an IP and a netns."""
    return {
        uid: pod
        for uid, pod in view.pods.items()
        if pod.node == view.node
        and pod.ip is not None
        and pod.netns
        and redirection_enabled(view.namespaces.get(pod.namespace), pod, system_namespace)
    }


# --- the document (wire shape) --------------------------------------------------------------
#
# {"version": 1,
#  "namespaces": {"<ns>": {"labels": {...}}},
#  "pods": [{"uid", "name", "namespace", "node", "serviceAccount", "ip", "netns",
#            "labels", "annotations", "hostNetwork", "phase"}]}


# The pod source is read strictly, worded as every other input of the mesh.
_R = Reader(SourceError)


def parse_source(text: str, node: str) -> NodeView:
    """The view of `node` in a pod-source document. Raises SourceError."""
    try:
        doc = json.loads(text) if text.strip() else {}
    except ValueError as e:
        raise SourceError(f"pod source is not JSON: {e}") from None
    doc = _R.mapping(doc, "pod source", required=True)
    _R.check_keys(doc, ("version", "namespaces", "pods"), "")
    version = doc.get("version", SOURCE_VERSION)
    if version != SOURCE_VERSION:
        _R.fail("version", f"{version!r} is not supported (expected {SOURCE_VERSION})")
    namespaces: dict[str, Mapping[str, str]] = {}
    for name, entry in _R.mapping(doc.get("namespaces"), "namespaces").items():
        where = f"namespaces.{name}"
        body = _R.mapping(entry, where, required=True)
        _R.check_keys(body, ("labels",), where)
        namespaces[str(name)] = MappingProxyType(
            _R.string_map(body.get("labels"), f"{where}.labels")
        )
    pods: dict[str, PodInfo] = {}
    for i, entry in enumerate(_R.items(doc.get("pods"), "pods")):
        pod = _parse_pod(entry, f"pods[{i}]")
        if pod.uid in pods:
            _R.fail(f"pods[{i}].uid", f"{pod.uid!r} appears twice")
        if pod.node == node:
            pods[pod.uid] = pod
    return NodeView(node, MappingProxyType(pods), MappingProxyType(namespaces))


_POD_KEYS = frozenset(
    {
        "uid",
        "name",
        "namespace",
        "node",
        "serviceAccount",
        "ip",
        "netns",
        "labels",
        "annotations",
        "hostNetwork",
        "phase",
    }
)


def _parse_pod(value: Any, where: str) -> PodInfo:
    entry = _R.mapping(value, where, required=True)
    _R.check_keys(entry, _POD_KEYS, where)
    ip: IPv4Address | None = None
    raw_ip = entry.get("ip")
    if raw_ip not in (None, ""):
        parsed = _R.ip(raw_ip, f"{where}.ip")
        if not isinstance(parsed, IPv4Address):
            _R.fail(f"{where}.ip", f"{raw_ip!r}: only IPv4 pods are supported")
        ip = parsed
    return PodInfo(
        uid=_R.string(entry, "uid", where),
        name=_R.string(entry, "name", where),
        namespace=_R.string(entry, "namespace", where),
        node=_R.string(entry, "node", where),
        service_account=_R.string(entry, "serviceAccount", where, SERVICE_ACCOUNT),
        ip=ip,
        netns=_R.string(entry, "netns", where, "", empty_ok=True),
        labels=_labels(entry.get("labels"), f"{where}.labels"),
        annotations=_labels(entry.get("annotations"), f"{where}.annotations"),
        host_network=_R.boolean(entry, "hostNetwork", where, False),
        phase=_R.string(entry, "phase", where, "Running"),
    )


def _labels(value: Any, where: str) -> Mapping[str, str]:
    return MappingProxyType(_R.string_map(value, where)) if value else _EMPTY


def pod_doc(pod: PodInfo) -> dict[str, Any]:
    """The wire form of one pod (the inverse of the parser)."""
    doc: dict[str, Any] = {
        "uid": pod.uid,
        "name": pod.name,
        "namespace": pod.namespace,
        "node": pod.node,
        "serviceAccount": pod.service_account,
        "ip": str(pod.ip) if pod.ip is not None else "",
        "netns": pod.netns,
        "labels": dict(pod.labels),
    }
    if pod.annotations:
        doc["annotations"] = dict(pod.annotations)
    if pod.host_network:
        doc["hostNetwork"] = True
    if pod.phase != "Running":
        doc["phase"] = pod.phase
    return doc


# --- sources ---------------------------------------------------------------------------


class PodSource(Protocol):
    """A live view of one node's pods. `start` delivers the first view before it returns
    (if there is a readable one), then every change; `close` stops the deliveries."""

    async def start(self, on_change: Callable[[NodeView], None]) -> None: ...

    async def close(self) -> None: ...


class FilePodSource:
    """Polls a pod-source file; calls back with the node's view whenever its text changed.

    A file that does not exist yet is an empty cluster. A malformed one is logged once (per
    distinct content) and ignored: the last good view stays in force.
    """

    def __init__(self, path: Path, node: str, interval: float = 0.2) -> None:
        self.path = path
        self.node = node
        self.interval = interval
        self.last_error: str | None = None
        self._digest: bytes | None = None
        self._on_change: Callable[[NodeView], None] | None = None
        self._task: asyncio.Task[None] | None = None

    def check(self) -> NodeView | None:
        """Read the file once; returns the new view if it changed and parsed, else None."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            text = ""
        except OSError as e:
            log.error(
                "pod source unreadable; keeping the last view", path=str(self.path), error=str(e)
            )
            return None
        digest = hashlib.sha256(text.encode()).digest()
        if digest == self._digest:
            return None
        self._digest = digest
        try:
            view = parse_source(text, self.node)
        except SourceError as e:
            self.last_error = str(e)
            log.error(
                "pod source rejected; keeping the last view", path=str(self.path), error=str(e)
            )
            return None
        self.last_error = None
        if self._on_change is not None:
            self._on_change(view)
        return view

    async def start(self, on_change: Callable[[NodeView], None]) -> None:
        self._on_change = on_change
        self.check()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="pod-source")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.check()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
