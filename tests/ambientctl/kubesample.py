"""A small mesh on Kubernetes, as the API server lists it: two ambient pods (one captured,
one not yet), a plain client, a waypoint with its pod and Service, a waypoint for workloads
that is not deployed, two policies (one broken), istiod and the two DaemonSets."""

from __future__ import annotations

import copy
from typing import Any

from ambientctl import kubeviews as kv
from meshcore.defaults import REDIRECTION_ANNOTATION
from tests.controlplane import kubeobjects as ko

GATEWAY_NAME = "gateway.networking.k8s.io/gateway-name"


def owned(pod: dict[str, Any], kind: str, name: str) -> dict[str, Any]:
    pod = copy.deepcopy(pod)
    pod["metadata"]["ownerReferences"] = [{"kind": kind, "name": name, "controller": True}]
    return pod


def captured(pod: dict[str, Any]) -> dict[str, Any]:
    pod["metadata"]["annotations"] = {REDIRECTION_ANNOTATION: "enabled"}
    return pod


def daemonset(name: str, desired: int, ready: int) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "istio-system"},
        "status": {"desiredNumberScheduled": desired, "numberReady": ready},
    }


def istiod(ready: int = 1) -> dict[str, Any]:
    container = {
        "name": "discovery",
        "command": ["python3", "-m", "controlplane"],
        "args": ["--in-cluster", "--trust-domain", "example.org", "--log-level", "info"],
    }
    return {
        "metadata": {"name": "istiod", "namespace": "istio-system"},
        "spec": {"replicas": 1, "template": {"spec": {"containers": [container]}}},
        "status": {"readyReplicas": ready},
    }


def snapshot(node_agent_ready: int = 1) -> kv.Snapshot:
    ambient = {"istio.io/dataplane-mode": "ambient", "istio.io/use-waypoint": "waypoint"}
    web = captured(
        ko.pod("shop", "web-0", "10.0.0.10", {"app": "web"}, sa="web", ports={"http": 8080})
    )
    db = ko.pod(
        "shop",
        "db-0",
        "10.0.0.11",
        {"app": "db", "istio.io/use-waypoint": "wl"},
        sa="db",
        node="node2",
        ports={"pg": 5432},
    )
    client = ko.pod("plain", "client", "10.0.0.20", {"app": "client"})
    starting = ko.pod("shop", "starting", None, {"app": "web"}, phase="Pending", ready=False)
    waypoint = captured(
        ko.pod("shop", "waypoint-5d9", "10.0.0.30", {GATEWAY_NAME: "waypoint"}, sa="waypoint")
    )
    agents = [
        owned(
            ko.pod(
                "istio-system",
                f"ambient-node-agent-{n[-1]}",
                None,
                {},
                node=n,
                host_network=True,
                ready=i < node_agent_ready,
            ),
            "DaemonSet",
            "ambient-node-agent",
        )
        for i, n in enumerate(("node1", "node2"))
    ]
    tunnels = [
        owned(
            ko.pod("istio-system", f"ztunnel-{n[-1]}", f"10.0.1.{i + 1}", {}, node=n),
            "DaemonSet",
            "ztunnel",
        )
        for i, n in enumerate(("node1", "node2"))
    ]
    objects = {
        "namespaces": [
            ko.namespace("shop", **ambient),
            ko.namespace("plain"),
            ko.namespace("istio-system"),
        ],
        "pods": [web, db, client, starting, waypoint, *agents, *tunnels],
        "services": [
            ko.service(
                "shop",
                "web",
                "10.96.0.10",
                {"app": "web"},
                [{"name": "http", "port": 80, "targetPort": 8080}],
            ),
            ko.service(
                "shop",
                "waypoint",
                "10.96.0.30",
                {GATEWAY_NAME: "waypoint"},
                [{"name": "mesh", "port": 15008}],
                labels={GATEWAY_NAME: "waypoint"},
            ),
        ],
        "gateways": [
            ko.waypoint_gateway("shop"),
            ko.waypoint_gateway("shop", "wl", **{"istio.io/waypoint-for": "workload"}),
        ],
        "authorization_policies": [
            ko.authorization_policy(
                "shop",
                "deny-plain",
                {
                    "action": "DENY",
                    "selector": {"matchLabels": {"app": "web"}},
                    "rules": [{"from": [{"source": {"namespaces": ["plain"]}}]}],
                },
            ),
            ko.authorization_policy(
                "shop", "broken", {"rules": [{"from": [{"source": {"nmespaces": ["x"]}}]}]}
            ),
        ],
    }
    nodes = [{"metadata": {"name": "node1"}}, {"metadata": {"name": "node2"}}]
    dss = [daemonset("ztunnel", 2, 2), daemonset("ambient-node-agent", 2, node_agent_ready)]
    return kv.Snapshot(objects, nodes, [istiod()], dss)
