"""Is the node agent being uninstalled, or only restarted? (istio-cni asks the same.)

On SIGTERM the agent normally leaves every capture rule in place: pods keep failing closed
while no agent runs, and the next agent (a rolling upgrade, a node drain and return)
adopts them. But when the mesh is uninstalled (`helm uninstall`, or the DaemonSet deleted
by hand) no agent will come back, and the rules would block the pods' traffic for good.
So, before it exits, the agent reads its own Pod and the DaemonSet that owns it: a
DaemonSet that is gone or being deleted means uninstall, and the agent releases every pod
(rules, probe entries, the redirection annotation) as a label removal would. Anything it
cannot read (no credentials, the API server down) means "not an uninstall": keeping the
rules fails closed, removing them by mistake would open the pods.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import aiohttp
import structlog

from kube import kinds
from kube.client import KubeApiError, KubeClient

log = structlog.get_logger("redirect.uninstall")


def owning_daemonset(pod: Mapping[str, Any]) -> str | None:
    """The name of the DaemonSet that controls this pod, if one does."""
    for ref in (pod.get("metadata") or {}).get("ownerReferences") or ():
        if (
            isinstance(ref, Mapping)
            and ref.get("kind") == "DaemonSet"
            and str(ref.get("apiVersion", "")).startswith("apps/")
            and ref.get("controller")
        ):
            name = ref.get("name")
            return name if isinstance(name, str) and name else None
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


def _owner_uid(pod: Mapping[str, Any], name: str) -> str:
    for ref in (pod.get("metadata") or {}).get("ownerReferences") or ():
        if isinstance(ref, Mapping) and ref.get("kind") == "DaemonSet" and ref.get("name") == name:
            return str(ref.get("uid", ""))
    return ""


async def being_uninstalled(client: KubeClient, namespace: str, pod_name: str) -> bool:
    """Whether this agent's DaemonSet is going away; False whenever it cannot tell."""
    try:
        pod = await client.get(kinds.POD, pod_name, namespace)
    except KubeApiError as e:
        log.warning("own pod unreadable; keeping the capture rules", status=e.status)
        return False
    except (OSError, TimeoutError, aiohttp.ClientError) as e:
        log.warning("API server unreachable; keeping the capture rules", error=str(e))
        return False
    name = owning_daemonset(pod)
    if name is None:
        return False  # not run by a DaemonSet: nothing says the mesh is going
    try:
        ds = await client.get(kinds.DAEMON_SET, name, namespace)
    except KubeApiError as e:
        if e.status != 404:
            log.warning("DaemonSet unreadable; keeping the capture rules", status=e.status)
            return False
        ds = None
    except (OSError, TimeoutError, aiohttp.ClientError) as e:
        log.warning("API server unreachable; keeping the capture rules", error=str(e))
        return False
    going = daemonset_going(ds, _owner_uid(pod, name))
    log.info("uninstall check", daemonset=f"{namespace}/{name}", uninstall=going)
    return going
