"""Is the node agent being uninstalled, or only restarted? (istio-cni asks the same.)

On SIGTERM the agent normally leaves every capture rule in place: pods keep failing closed
while no agent runs, and the next agent (a rolling upgrade, a node drain and return)
adopts them. But when the mesh is uninstalled (`helm uninstall`, or the DaemonSet deleted
by hand) no agent will come back, and the rules would block the pods' traffic for good.
So the agent reads its own Pod at start and follows the DaemonSet that owns it: a
DaemonSet that is gone or being deleted at SIGTERM means uninstall, and the agent releases
every pod (rules, probe entries, the redirection annotation) as a label removal would.
Anything it could not learn (no credentials, the API server down) means "not an
uninstall": keeping the rules fails closed, removing them by mistake would open the pods.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import aiohttp
import structlog

from kube import kinds
from kube.client import KubeApiError, KubeClient
from kube.informer import Informer

log = structlog.get_logger("redirect.uninstall")


def owning_daemonset(pod: Mapping[str, Any]) -> tuple[str, str] | None:
    """(name, uid) of the DaemonSet that controls this pod, if one does."""
    for ref in (pod.get("metadata") or {}).get("ownerReferences") or ():
        if (
            isinstance(ref, Mapping)
            and ref.get("kind") == "DaemonSet"
            and str(ref.get("apiVersion", "")).startswith("apps/")
            and ref.get("controller")
        ):
            name = ref.get("name")
            return (name, str(ref.get("uid", ""))) if isinstance(name, str) and name else None
    return None


def daemonset_going(ds: Mapping[str, Any] | None, owner_uid: str) -> bool:
    """True when the owning DaemonSet is gone (None), replaced by another object of the
    same name (its uid differs), or has a deletionTimestamp."""
    if ds is None:
        return True
    md = ds.get("metadata") or {}
    if owner_uid and md.get("uid") != owner_uid:
        return True
    return bool(md.get("deletionTimestamp"))


class UninstallWatch:
    """Follows the agent's own DaemonSet from the start, so the answer at SIGTERM does not
    depend on the API at that moment: `helm uninstall` deletes the DaemonSet first and the
    agent's RBAC objects and ServiceAccount right after, so by the time the garbage
    collector stops the agent's pod, its credentials no longer work. The DaemonSet's own
    deletion, seen by the watch while they still did, is the answer."""

    def __init__(self, client: KubeClient, namespace: str, pod_name: str) -> None:
        self.client = client
        self.namespace = namespace
        self.pod_name = pod_name
        self.daemonset = ""
        self.owner_uid = ""
        self.informer: Informer | None = None

    async def start(self) -> None:
        """Find the owning DaemonSet (the agent's own Pod) and start following it; any
        failure leaves it off, which answers "not an uninstall"."""
        try:
            pod = await self.client.get(kinds.POD, self.pod_name, self.namespace)
        except (KubeApiError, OSError, TimeoutError, aiohttp.ClientError) as e:
            log.warning(
                "own pod unreadable; an uninstall will keep the capture rules", error=str(e)
            )
            return
        owner = owning_daemonset(pod)
        if owner is None:
            log.info("not run by a DaemonSet; stopping never removes the capture rules")
            return
        self.daemonset, self.owner_uid = owner
        name = owner[0]
        self.informer = Informer(
            self.client, kinds.DAEMON_SET, self.namespace, field_selector=f"metadata.name={name}"
        )
        self.informer.start()

    async def stop(self) -> None:
        if self.informer is not None:
            await self.informer.stop()

    async def going(self) -> bool:
        """Whether the DaemonSet is going away: gone from the watch, replaced, or being
        deleted. Without a synced watch: False (keeping the rules fails closed)."""
        inf = self.informer
        if inf is None or not inf.synced.is_set():
            return False
        cached = inf.get(f"{self.namespace}/{self.daemonset}")
        going = daemonset_going(cached, self.owner_uid)
        log.info("uninstall check", daemonset=f"{self.namespace}/{self.daemonset}", uninstall=going)
        return going
