"""A Kubernetes pod's network on a local-cluster node: its netns, veth and address (I/O).

The pod netns is named by the pod's UID (`kube.podnetns.netns_name`, the contract with the
node agent), its veth's node end `kv<12 hex of the UID>` (an interface name holds at most 15
characters), and both are built exactly as the cluster-file pods are
(`localcluster.network.build_pod`): the netns recorded in the cluster state before it exists,
the veth created with its peer already inside it, a default route via the node's gateway.
"""

from __future__ import annotations

import os
import threading
from ipaddress import IPv4Address

from pyroute2 import netns as pr_netns

import nsutil
from kube.podnetns import netns_name
from localcluster.network import NetworkError, NodeLayout, PodLayout, build_pod
from localcluster.state import ClusterState

# pyroute2 and the state file are touched from worker threads: one change at a time.
_LOCK = threading.Lock()


def veth_name(pod_uid: str) -> str:
    return "kv" + netns_name(pod_uid).removeprefix("kpod-")


def pod_layout(node: NodeLayout, uid: str, namespace: str, name: str, ip: IPv4Address) -> PodLayout:
    return PodLayout(
        namespace=namespace,
        name=name,
        node=node.name,
        netns=netns_name(uid),
        ip=ip,
        gateway=node.gateway,
        host_ifname=veth_name(uid),
    )


def create(node: NodeLayout, pod: PodLayout, state: ClusterState) -> None:
    """Build the pod's netns; on failure remove what was built and raise NetworkError."""
    with _LOCK:
        try:
            build_pod(node, pod, state)
        except BaseException:
            _remove(pod.netns, state)
            raise


def remove(netns: str, state: ClusterState) -> None:
    """Remove a pod netns (the veth goes with it), then forget it in the record."""
    with _LOCK:
        _remove(netns, state)


def _remove(netns: str, state: ClusterState) -> None:
    if os.path.exists(nsutil.netns_path(netns)):
        try:
            pr_netns.remove(netns)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise NetworkError(f"remove netns {netns}: {e}") from e
    state.forget_netns(netns)
