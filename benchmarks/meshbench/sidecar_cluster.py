"""The local cluster both sidecar scenarios run on: one client pod and one server pod,
on two nodes (cross-node) or on one (same-node), in a namespace of their own.

The cluster file is generated (pure: `cluster_doc`) into the scenario's work directory,
so each scenario and placement gets its own cluster name and never meets another
cluster's namespaces. Commands are absolute, as the file's directory is the workdir.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from localcluster import mesh
from localcluster.apps import INHERITED_ENV, process_name

PLACEMENTS = ("cross-node", "same-node")
NAMESPACE = "bench"
CLIENT_POD = "client-0"
SERVER_POD = "server-0"
TRUST_DOMAIN = "cluster.local"
# The server pod's two app ports: the 1 KB HTTP/1.1 server and the bulk sink, served by
# the same program as in every other scenario (apps/mb_server.py).
HTTP_PORT = 8080
BULK_PORT = 5001
SERVER_APP = Path(__file__).resolve().parent / "apps" / "mb_server.py"


class PlacementError(ValueError):
    """An unknown placement; the message lists the known ones."""


def check_placement(placement: str) -> str:
    if placement not in PLACEMENTS:
        raise PlacementError(f"placement {placement!r} is not one of {', '.join(PLACEMENTS)}")
    return placement


def server_command() -> list[str]:
    return [
        sys.executable,
        str(SERVER_APP),
        "--http-port",
        str(HTTP_PORT),
        "--sink-port",
        str(BULK_PORT),
    ]


def cluster_doc(name: str, placement: str, ambient_label: bool) -> dict[str, Any]:
    """The cluster file. `ambient_label` makes the mesh config say the pods speak HBONE
    (the `sidecar` scenario's tunnels read it); no node agent runs either way."""
    check_placement(placement)
    server_node = "node2" if placement == "cross-node" else "node1"
    nodes = [{"name": "node1"}] + ([{"name": "node2"}] if server_node == "node2" else [])
    labels = {"istio.io/dataplane-mode": "ambient"} if ambient_label else {}
    return {
        "name": name,
        "trustDomain": TRUST_DOMAIN,
        "nodes": nodes,
        "namespaces": [{"name": NAMESPACE, "labels": labels}],
        "pods": [
            {
                "name": CLIENT_POD,
                "namespace": NAMESPACE,
                "serviceAccount": "client",
                "labels": {"app": "client"},
                "node": "node1",
                # Keeps the pod alive; the load runs inside its netns.
                "command": ["sleep", "infinity"],
            },
            {
                "name": SERVER_POD,
                "namespace": NAMESPACE,
                "serviceAccount": "server",
                "labels": {"app": "server"},
                "node": server_node,
                "command": server_command(),
            },
        ],
        # The service only makes `up` wait until the server listens; clients use pod IPs.
        "services": [
            {
                "name": "server",
                "namespace": NAMESPACE,
                "selector": {"app": "server"},
                "ports": [
                    {"port": HTTP_PORT, "targetPort": HTTP_PORT, "name": "http"},
                    {"port": BULK_PORT, "targetPort": BULK_PORT, "name": "bulk"},
                ],
            }
        ],
    }


def write_cluster_file(workdir: Path, name: str, placement: str, ambient_label: bool) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"cluster-{name}.yaml"
    path.write_text(yaml.safe_dump(cluster_doc(name, placement, ambient_label), sort_keys=False))
    return path


def base_env() -> dict[str, str]:
    """A sidecar's environment: only what a program needs to run at all."""
    env = {k: os.environ[k] for k in INHERITED_ENV if k in os.environ}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def pod_ip(cluster: mesh.Cluster, name: str) -> str:
    return str(cluster.layout.pod(NAMESPACE, name).ip)


def server_pids(cluster: mesh.Cluster) -> list[int]:
    """The server pod's app process, if it runs (for CPU pinning; empty otherwise)."""
    rec = mesh.process_record(cluster, process_name(NAMESPACE, SERVER_POD))
    return [] if rec is None else [rec.pid]


def pod_netns(cluster: mesh.Cluster, name: str) -> str:
    return cluster.layout.pod(NAMESPACE, name).netns_path


def http_get_json(netns_path: str, port: int, path: str, timeout: float = 2.0) -> Any:
    """GET http://127.0.0.1:<port><path> from inside a netns; the decoded JSON body, or
    None when unreachable or not JSON (a sidecar's admin ports listen in its pod)."""
    try:
        _, body = mesh.netns_http(netns_path, port, path, timeout=timeout)
        return json.loads(body)
    except (OSError, ValueError):
        return None
