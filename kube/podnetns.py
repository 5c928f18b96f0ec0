"""Where a pod's network namespace is, by the pod's UID: the local kubelet's CNI contract.

A real node agent learns a new pod's netns from the CNI plugin (or, for pods that were running
before it, by scanning /proc). The local cluster's kubelet creates every pod netns under a name
derived from the pod's UID alone, so the node agent finds it without any other channel.
"""

from __future__ import annotations

import re
from pathlib import Path

NETNS_DIR = Path("/var/run/netns")
PREFIX = "kpod-"
_UID = re.compile(r"^[0-9a-f-]{8,64}$")


def netns_name(pod_uid: str) -> str:
    """`kpod-` + the first 12 hex digits of the UID (netns names are file names; 15 chars are
    also what an interface name may hold, so the same token names the pod's veth)."""
    if not _UID.match(pod_uid):
        raise ValueError(f"not a pod UID: {pod_uid!r}")
    return PREFIX + pod_uid.replace("-", "")[:12]


def netns_path(pod_uid: str) -> Path:
    return NETNS_DIR / netns_name(pod_uid)
