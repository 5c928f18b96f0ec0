"""Fill a real API server with a mesh-sized cluster: Nodes, Namespaces, Pods, Services, policies.

Pods are bound to Node objects (spec.nodeName) and given a status as a kubelet would (podIP,
Running, Ready), so no network namespace is needed. Creation runs `concurrency` requests at a
time; every loop is bounded by the counts given.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from kube.client import KubeApiError, KubeClient
from kube.kinds import AUTHORIZATION_POLICY, NAMESPACE, NODE, POD, SERVICE, Kind

POD_CIDR = ipaddress.IPv4Network("10.240.0.0/12")


@dataclass(frozen=True, slots=True)
class Scale:
    pods: int
    services: int
    policies: int
    nodes: int = 10
    namespaces: int = 20

    def namespace(self, i: int) -> str:
        return f"bench-{i % self.namespaces}"

    def node(self, i: int) -> str:
        return f"bench-node-{i % self.nodes}"


async def bounded(jobs: Iterable[Callable[[], Awaitable[Any]]], concurrency: int) -> int:
    """Run every job, `concurrency` at a time; returns how many failed (already-exists counts
    as done, so a second run on the same server fills only what is missing)."""
    it = iter(jobs)
    failed = 0

    async def worker() -> None:
        nonlocal failed
        for job in it:
            for attempt in range(5):
                try:
                    await job()
                    break
                except KubeApiError as e:
                    if e.status == 409:
                        break
                    # A namespace's default ServiceAccount is made just after the namespace:
                    # a pod created in between is refused for a moment (500 or 403).
                    if attempt == 4 or e.status not in (403, 500, 503):
                        failed += 1
                        break
                    await asyncio.sleep(0.2 * (attempt + 1))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return failed


def node_obj(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
    }


def pod_obj(scale: Scale, i: int) -> dict[str, Any]:
    svc = i % max(scale.services, 1)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"pod-{i}",
            "namespace": scale.namespace(svc),
            "labels": {"app": f"svc-{svc}", "version": "v1"},
        },
        "spec": {
            "nodeName": scale.node(i),
            "serviceAccountName": "default",
            "automountServiceAccountToken": False,
            "containers": [
                {"name": "app", "image": "bench/app", "ports": [{"containerPort": 8080}]}
            ],
        },
    }


def pod_status(i: int) -> dict[str, Any]:
    ip = str(POD_CIDR.network_address + 10 + i)
    return {
        "status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": "True"}],
        }
    }


def service_obj(scale: Scale, j: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": f"svc-{j}", "namespace": scale.namespace(j)},
        "spec": {
            "selector": {"app": f"svc-{j}"},
            "ports": [{"name": "http", "port": 80, "targetPort": 8080}],
        },
    }


def policy_obj(scale: Scale, k: int) -> dict[str, Any]:
    return {
        "apiVersion": f"{AUTHORIZATION_POLICY.group}/{AUTHORIZATION_POLICY.version}",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": f"allow-{k}", "namespace": scale.namespace(k)},
        "spec": {
            "selector": {"matchLabels": {"app": f"svc-{k % max(scale.services, 1)}"}},
            "action": "ALLOW",
            "rules": [{"from": [{"source": {"namespaces": [scale.namespace(k + 1)]}}]}],
        },
    }


async def populate(client: KubeClient, scale: Scale, concurrency: int = 24) -> dict[str, int]:
    """Create everything; returns failures per kind (0 everywhere on success)."""

    def create(kind: Kind, obj: dict[str, Any]) -> Callable[[], Awaitable[Any]]:
        ns = obj["metadata"].get("namespace")
        return lambda: client.create(kind, obj, ns)

    out: dict[str, int] = {}
    out["nodes"] = await bounded(
        (create(NODE, node_obj(scale.node(i))) for i in range(scale.nodes)), concurrency
    )
    out["namespaces"] = await bounded(
        (
            create(NAMESPACE, {"metadata": {"name": scale.namespace(i)}})
            for i in range(scale.namespaces)
        ),
        concurrency,
    )
    out["services"] = await bounded(
        (create(SERVICE, service_obj(scale, j)) for j in range(scale.services)), concurrency
    )
    out["pods"] = await bounded(
        (create(POD, pod_obj(scale, i)) for i in range(scale.pods)), concurrency
    )

    def status(i: int) -> Callable[[], Awaitable[Any]]:
        ns = pod_obj(scale, i)["metadata"]["namespace"]
        return lambda: client.patch(POD, f"pod-{i}", pod_status(i), ns, subresource="status")

    out["pod-status"] = await bounded((status(i) for i in range(scale.pods)), concurrency)
    out["policies"] = await bounded(
        (create(AUTHORIZATION_POLICY, policy_obj(scale, k)) for k in range(scale.policies)),
        concurrency,
    )
    return out
