"""The node agent's pod source from the Kubernetes API server, and the pod's enrolment mark.

`KubePodSource` follows two informers: the Pods bound to this node (field selector
`spec.nodeName=<node>`) and every Namespace (their labels decide enrolment). It hands the
agent the same `NodeView` the file source gives, so the enrolment decision
(`redirect.enrolment.redirection_enabled`, istio-cni's) is the one and only rule.

A pod's network namespace is found by the local kubelet's contract: its path is
`kube.podnetns.netns_path(uid)`. A pod whose netns does not exist yet is passed with no netns
(not yet enrollable, as upstream waits for the CNI plugin); a pod without a podIP likewise.
Nothing announces a netns appearing, so while some pod with an IP has a netns that is not
there (or one goes away), its existence is checked again every `netns_poll` seconds.

Robust by construction:
- no view is delivered before both informers have listed once: a view with pods but not
  their namespaces would release every pod of the node;
- the informers keep their caches while the API server is away and resume (or relist) with
  backoff; a relist reports only what was really deleted, so a watch error or an API server
  restart never releases a pod. Only an actual delete or label change does;
- a pod object that cannot be read (which the API server should never hand out) keeps its
  last good reading and is logged, never crashes the agent;
- changes are coalesced: a relist of a thousand pods builds one view, not a thousand.

The mark: while the agent holds a pod's capture it sets the pod annotation
`ambient.istio.io/redirection: enabled` (istio-cni's) and removes it on release
(`mark_redirection`). Patches go through one background worker, latest wish per pod, with
the pod's UID as a precondition (a recreated pod of the same name is not marked), retried
with backoff while the API server is away; a pod that is gone is dropped.

RBAC the agent needs: list/watch pods and namespaces, patch pods/status. The mark is patched
through the status subresource, as istio-cni does: it changes metadata as a patch of the pod
would, but the API server keeps the pod's spec (containers, images, commands) as it was, so
the agent's right to write every pod cannot swap what a pod runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Mapping
from ipaddress import IPv4Address, ip_address
from types import MappingProxyType
from typing import Any

import aiohttp
import structlog

from kube.client import KubeApiError, KubeClient, Obj
from kube.informer import Event, Informer
from kube.kinds import NAMESPACE, POD
from kube.podnetns import netns_path
from meshcore.defaults import REDIRECTION_ANNOTATION, REDIRECTION_ENABLED, SERVICE_ACCOUNT
from redirect.enrolment import NodeView, PodInfo, SourceError

log = structlog.get_logger(__name__)

NETNS_POLL_S = 0.5
SYNC_WAIT_S = 10.0
_MARK_BACKOFF_MIN_S = 0.2
_MARK_BACKOFF_MAX_S = 10.0
_NOT_SYNCED = "waiting for the first list of pods and namespaces from the API server"

_EMPTY: Mapping[str, str] = MappingProxyType({})


# ---- the pure mapping: a Pod object to the agent's pod view ---------------------------------


def pod_from_object(obj: Obj, netns_exists: Callable[[str], bool] = os.path.exists) -> PodInfo:
    """The agent's view of one Pod object. Raises SourceError naming the bad field.

    The netns is set only once it exists (and the pod has an IP): until then the pod is
    known but not enrollable.
    """
    md = _mapping(obj.get("metadata"), "metadata")
    spec = _mapping(obj.get("spec"), "spec")
    status = _mapping(obj.get("status"), "status")
    uid = _string(md, "uid", "metadata")
    name = _string(md, "name", "metadata")
    namespace = _string(md, "namespace", "metadata")
    try:
        path = str(netns_path(uid))
    except ValueError as e:
        raise SourceError(f"metadata.uid: {e}") from None
    ip = _pod_ip(status.get("podIP"))
    sa = spec.get("serviceAccountName") or SERVICE_ACCOUNT
    if not isinstance(sa, str):
        raise SourceError("spec.serviceAccountName: not a string")
    phase = status.get("phase") or "Pending"
    if not isinstance(phase, str):
        raise SourceError("status.phase: not a string")
    return PodInfo(
        uid=uid,
        name=name,
        namespace=namespace,
        node=_string(spec, "nodeName", "spec"),
        service_account=sa,
        ip=ip,
        netns=path if ip is not None and netns_exists(path) else "",
        labels=_string_map(md.get("labels"), "metadata.labels"),
        annotations=_string_map(md.get("annotations"), "metadata.annotations"),
        host_network=spec.get("hostNetwork") is True,
        phase=phase,
    )


def namespace_labels(obj: Obj) -> Mapping[str, str]:
    """A Namespace object's labels. Raises SourceError."""
    md = _mapping(obj.get("metadata"), "metadata")
    return _string_map(md.get("labels"), "metadata.labels")


def _pod_ip(value: object) -> IPv4Address | None:
    if value in (None, ""):
        return None
    try:
        ip = ip_address(str(value))
    except ValueError:
        raise SourceError(f"status.podIP: {value!r} is not an IP address") from None
    if not isinstance(ip, IPv4Address):
        # The mesh carries IPv4 only: such a pod is never enrolled, as one without an IP.
        return None
    return ip


def _mapping(value: object, where: str) -> Mapping[str, Any]:
    if value is None:
        return _EMPTY
    if not isinstance(value, dict):
        raise SourceError(f"{where}: not a mapping")
    return value


def _string(m: Mapping[str, Any], key: str, where: str) -> str:
    value = m.get(key)
    if not isinstance(value, str) or not value:
        raise SourceError(f"{where}.{key}: missing or not a string")
    return value


def _string_map(value: object, where: str) -> Mapping[str, str]:
    if not value:
        return _EMPTY
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise SourceError(f"{where}: not a map of strings")
    return MappingProxyType(dict(value))


# ---- the source -------------------------------------------------------------------------------


class KubePodSource:
    """This node's pods and every namespace's labels, followed from the API server.

    `client` stays the caller's (it closes it after `close`).
    """

    def __init__(
        self,
        client: KubeClient,
        node: str,
        *,
        netns_exists: Callable[[str], bool] = os.path.exists,
        netns_poll: float = NETNS_POLL_S,
        sync_wait: float = SYNC_WAIT_S,
    ) -> None:
        self.client = client
        self.node = node
        self.netns_exists = netns_exists
        self.netns_poll = netns_poll
        self.sync_wait = sync_wait
        self.last_error: str | None = _NOT_SYNCED
        self.pod_informer = Informer(client, POD, field_selector=f"spec.nodeName={node}")
        self.ns_informer = Informer(client, NAMESPACE)
        self._pods: dict[str, PodInfo] = {}  # "ns/name" -> last good reading
        self._bad: dict[str, str] = {}  # "ns/name" -> resourceVersion already logged as bad
        self._namespaces: dict[str, Mapping[str, str]] = {}
        self._on_change: Callable[[NodeView], None] | None = None
        self._publish_pending = False
        self._tasks: list[asyncio.Task[None]] = []
        self._marks: dict[str, tuple[PodInfo, bool]] = {}  # "ns/name" -> latest wish
        self._mark_wake = asyncio.Event()
        self.pod_informer.add_handler(self._on_pod)
        self.ns_informer.add_handler(self._on_namespace)

    # ---- PodSource ------------------------------------------------------------------------

    async def start(self, on_change: Callable[[NodeView], None]) -> None:
        """Start following; the first view is delivered before this returns if both lists
        arrive within `sync_wait` seconds, else as soon as they do."""
        self._on_change = on_change
        loop = asyncio.get_running_loop()
        self._tasks = [
            self.pod_informer.start(),
            self.ns_informer.start(),
            loop.create_task(self._first_view(), name="kube-pod-source-sync"),
            loop.create_task(self._poll_netns(), name="kube-pod-source-netns"),
            loop.create_task(self._mark_worker(), name="kube-pod-source-marks"),
        ]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.sync_wait):
                await self._synced()
                self._first_publish()
        if self.last_error is not None:
            log.warning("pod source not synced yet; the agent waits", node=self.node)

    async def close(self) -> None:
        await self.pod_informer.stop()
        await self.ns_informer.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    def view(self) -> NodeView:
        """The current view (what the last delivery said, or will say)."""
        return NodeView(
            self.node,
            MappingProxyType({p.uid: p for p in self._pods.values()}),
            MappingProxyType(dict(self._namespaces)),
        )

    # ---- informer events (event loop) -----------------------------------------------------

    def _on_pod(self, ev: Event, key: str, old: Obj | None, new: Obj | None) -> None:
        if ev is Event.DELETED or new is None:
            self._bad.pop(key, None)
            if self._pods.pop(key, None) is not None:
                self._changed()
            return
        try:
            pod = pod_from_object(new, self.netns_exists)
        except SourceError as e:
            version = str((new.get("metadata") or {}).get("resourceVersion", ""))
            if self._bad.get(key) != version:
                self._bad[key] = version
                log.error("pod unreadable; keeping its last reading", pod=key, error=str(e))
            return
        self._bad.pop(key, None)
        if pod.node != self.node:
            # The field selector should not let it through; never enrol another node's pod.
            if self._pods.pop(key, None) is not None:
                self._changed()
            return
        if self._pods.get(key) != pod:  # labels and annotations compare too
            self._pods[key] = pod
            self._changed()

    def _on_namespace(self, ev: Event, key: str, old: Obj | None, new: Obj | None) -> None:
        if ev is Event.DELETED or new is None:
            if self._namespaces.pop(key, None) is not None:
                self._changed()
            return
        try:
            labels = namespace_labels(new)
        except SourceError as e:
            log.error("namespace unreadable; keeping its last labels", namespace=key, error=str(e))
            return
        if self._namespaces.get(key) != labels:
            self._namespaces[key] = labels
            self._changed()

    def _changed(self) -> None:
        # Coalesced: every change of one loop iteration (a relist's burst) makes one view.
        if self._publish_pending or self.last_error is not None:
            return
        self._publish_pending = True
        asyncio.get_running_loop().call_soon(self._publish)

    def _publish(self) -> None:
        self._publish_pending = False
        if self._on_change is not None:
            self._on_change(self.view())

    # ---- background tasks -----------------------------------------------------------------

    async def _synced(self) -> None:
        await self.pod_informer.synced.wait()
        await self.ns_informer.synced.wait()

    async def _first_view(self) -> None:
        await self._synced()
        self._first_publish()

    def _first_publish(self) -> None:
        if self.last_error is None:
            return  # already delivered
        self.last_error = None
        log.info("pod source synced", node=self.node, pods=len(self._pods))
        self._publish()

    async def _poll_netns(self) -> None:
        """Pods with an IP whose netns appeared or went away since they were read."""
        while True:
            await asyncio.sleep(self.netns_poll)
            stale = [key for key, pod in self._pods.items() if self._netns_moved(pod)]
            for key in stale:
                obj = self.pod_informer.get(key)
                if obj is not None:  # always: the informer holds every pod we hold
                    self._on_pod(Event.MODIFIED, key, obj, obj)

    def _netns_moved(self, pod: PodInfo) -> bool:
        """Whether the pod's netns appeared or vanished since the pod was read."""
        if pod.ip is None:
            return False
        return bool(pod.netns) != self.netns_exists(str(netns_path(pod.uid)))

    # ---- the redirection mark ---------------------------------------------------------------

    def mark_redirection(self, pod: PodInfo, enabled: bool) -> None:
        """Ask for the pod's `ambient.istio.io/redirection` annotation to be set (enabled) or
        removed. Never blocks: the latest wish per pod is applied in the background."""
        self._marks[pod.key] = (pod, enabled)
        self._mark_wake.set()

    async def flush_marks(self, timeout: float) -> bool:  # noqa: ASYNC109
        """Wait until every asked-for mark is applied (or its pod is gone); False at the
        deadline. The agent's uninstall calls it before closing the source."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while self._marks:  # noqa: ASYNC110 (the worker pops entries; polled)
                    await asyncio.sleep(0.05)
        return not self._marks

    def marked(self) -> list[str]:
        """The UIDs of this node's pods that carry the mark (as last listed or watched)."""
        uids = []
        for obj in self.pod_informer.items():
            md = obj.get("metadata") or {}
            if (md.get("annotations") or {}).get(REDIRECTION_ANNOTATION) == REDIRECTION_ENABLED:
                uids.append(str(md.get("uid", "")))
        return uids

    def _marked(self, pod: PodInfo) -> bool | None:
        """Whether the cached object already carries the mark (None: not in the cache)."""
        obj = self.pod_informer.get(pod.key)
        if obj is None:
            return None
        md = obj.get("metadata") or {}
        if md.get("uid") != pod.uid:
            return None
        annotations = md.get("annotations") or {}
        return bool(annotations.get(REDIRECTION_ANNOTATION) == REDIRECTION_ENABLED)

    async def _mark_worker(self) -> None:
        backoff = _MARK_BACKOFF_MIN_S
        while True:
            await self._mark_wake.wait()
            self._mark_wake.clear()
            failed = False
            for key in list(self._marks):
                pod, enabled = self._marks[key]
                if self._marked(pod) == enabled:
                    self._marks.pop(key, None)
                    continue
                done = await self._patch_mark(pod, enabled)
                if done and self._marks.get(key) == (pod, enabled):
                    del self._marks[key]  # unless a newer wish arrived meanwhile
                failed = failed or not done
            if failed:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MARK_BACKOFF_MAX_S)
                self._mark_wake.set()
            else:
                backoff = _MARK_BACKOFF_MIN_S

    async def _patch_mark(self, pod: PodInfo, enabled: bool) -> bool:
        """One patch; True when nothing is left to do (done, or the pod is gone)."""
        # The UID in the patch is a precondition: the API server refuses to mark a pod that
        # was deleted and created again under the same name.
        patch = {
            "metadata": {
                "uid": pod.uid,
                "annotations": {REDIRECTION_ANNOTATION: REDIRECTION_ENABLED if enabled else None},
            }
        }
        try:
            await self.client.patch(POD, pod.name, patch, pod.namespace, subresource="status")
        except KubeApiError as e:
            if e.status in (404, 409, 422):
                log.info("pod gone; not marked", pod=pod.key, uid=pod.uid, status=e.status)
                return True
            log.warning("pod mark failed; retrying", pod=pod.key, error=str(e))
            return False
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            log.warning("pod mark failed; retrying", pod=pod.key, error=f"{type(e).__name__}: {e}")
            return False
        log.info("pod marked", pod=pod.key, redirection=enabled)
        return True
