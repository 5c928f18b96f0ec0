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

import asyncio
from collections.abc import Mapping
from typing import Any

import aiohttp
import structlog

from kube import kinds
from kube.client import KubeApiError, KubeClient
from kube.informer import Informer

log = structlog.get_logger("redirect.uninstall")

ASK_TIMEOUT_S = 2.0  # the API server's answer at SIGTERM, at most this long
WATCH_SETTLE_S = 1.0  # without it, how long the watch may take to deliver a deletion


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
        """Whether the DaemonSet is going away: gone, replaced, or being deleted. Asked of
        the API server first: the watch can trail the deletion that stops this very pod
        (helm deletes the DaemonSet and the garbage collector stops its pods at once), and
        then the cache still holds the DaemonSet. When the API cannot answer, the watch
        decides, given a moment to deliver a deletion in flight. Without a synced watch
        and no answer: False (keeping the rules fails closed)."""
        inf = self.informer
        if inf is None:
            return False
        asked = await self._asked()
        if asked is not None:
            going = asked
        elif not inf.synced.is_set():
            going = False
        else:
            going = await self._watched()
        log.info("uninstall check", daemonset=f"{self.namespace}/{self.daemonset}", uninstall=going)
        return going

    async def _asked(self) -> bool | None:
        """The API server's answer, or None when it gives none. 404: gone. 401: this
        agent's ServiceAccount token is no longer valid, which happens when the
        ServiceAccount is deleted, and only an uninstall deletes it (403 is not taken as
        an answer: RBAC can be wrong for other reasons)."""
        try:
            async with asyncio.timeout(ASK_TIMEOUT_S):
                ds = await self.client.get(kinds.DAEMON_SET, self.daemonset, self.namespace)
        except KubeApiError as e:
            if e.status in (401, 404):
                return True
            log.warning("own DaemonSet unreadable at stop; the watch decides", error=str(e))
            return None
        except (OSError, TimeoutError, aiohttp.ClientError) as e:
            log.warning("own DaemonSet unreadable at stop; the watch decides", error=str(e))
            return None
        return daemonset_going(ds, self.owner_uid)

    async def _watched(self) -> bool:
        assert self.informer is not None
        key = f"{self.namespace}/{self.daemonset}"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WATCH_SETTLE_S
        while not (going := daemonset_going(self.informer.get(key), self.owner_uid)):
            if loop.time() >= deadline:
                break
            await asyncio.sleep(0.05)
        return going
