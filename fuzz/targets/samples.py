"""Small real documents the seeds are built from: the travel demo's shapes, cut down to a
few workloads, one of each policy form and one of each route kind."""

from __future__ import annotations

import json
from typing import Any

WORKLOADS: list[dict[str, Any]] = [
    {
        "uid": "travel//Pod/travel/frontend-0",
        "name": "frontend-0",
        "namespace": "travel",
        "serviceAccount": "frontend",
        "trustDomain": "cluster.local",
        "workloadIps": ["10.244.1.10"],
        "protocol": "HBONE",
        "node": "node1",
        "canonicalName": "frontend",
        "canonicalRevision": "v1",
        "workloadName": "frontend",
        "workloadType": "pod",
        "clusterId": "travel",
        "status": "Healthy",
        "services": {"travel/frontend.travel.svc.cluster.local": {"80": 8080}},
        "labels": {"app": "frontend", "version": "v1"},
    },
    {
        "uid": "travel//Pod/travel/flights-0",
        "name": "flights-0",
        "namespace": "travel",
        "serviceAccount": "flights",
        "trustDomain": "cluster.local",
        "workloadIps": ["10.244.2.10"],
        "protocol": "HBONE",
        "node": "node2",
        "workloadType": "pod",
        "clusterId": "travel",
        "status": "Healthy",
        "services": {"travel/flights.travel.svc.cluster.local": {"80": 8080}},
        "labels": {"app": "flights", "version": "v1"},
    },
]

SERVICES: list[dict[str, Any]] = [
    {
        "name": "frontend",
        "namespace": "travel",
        "hostname": "frontend.travel.svc.cluster.local",
        "vips": ["/10.96.0.10"],
        "ports": {"80": {"targetPort": 8080, "name": "http"}},
        "subjectAltNames": [],
    },
    {
        "name": "flights",
        "namespace": "travel",
        "hostname": "flights.travel.svc.cluster.local",
        "vips": ["/10.96.0.11"],
        "ports": {"80": {"targetPort": 8080, "name": "http"}},
        "subjectAltNames": [],
    },
]

POLICIES: list[dict[str, Any]] = [
    {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "flights-allow", "namespace": "travel"},
        "spec": {
            "selector": {"matchLabels": {"app": "flights"}},
            "action": "ALLOW",
            "rules": [
                {
                    "from": [{"source": {"principals": ["cluster.local/ns/travel/sa/*"]}}],
                    "to": [{"operation": {"ports": ["8080"], "methods": ["GET"]}}],
                    "when": [{"key": "source.ip", "values": ["10.244.0.0/16"]}],
                }
            ],
        },
    },
    {
        "name": "deny-legacy",
        "namespace": "travel",
        "action": "DENY",
        "rules": [{"from": [{"source": {"namespaces": ["legacy"], "notIpBlocks": ["10.0.0.1"]}}]}],
    },
    {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "post-denied", "namespace": "travel"},
        "spec": {
            "targetRefs": [{"kind": "Service", "group": "", "name": "flights"}],
            "action": "DENY",
            "rules": [{"to": [{"operation": {"methods": ["POST"], "paths": ["/admin/*"]}}]}],
        },
    },
    {
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": "strict", "namespace": "travel"},
        "spec": {"mtls": {"mode": "STRICT"}, "portLevelMtls": {"8080": {"mode": "PERMISSIVE"}}},
    },
]

ROUTES: list[dict[str, Any]] = [
    {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "flights-canary", "namespace": "travel"},
        "spec": {
            "parentRefs": [{"kind": "Service", "group": "", "name": "flights"}],
            "rules": [
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": "/api"}}],
                    "backendRefs": [
                        {"name": "flights", "port": 80, "weight": 90},
                        {"name": "frontend", "port": 80, "weight": 10},
                    ],
                }
            ],
        },
    },
    {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "frontend", "namespace": "travel"},
        "spec": {
            "hosts": ["frontend"],
            "http": [
                {
                    "match": [{"uri": {"prefix": "/api"}, "headers": {"x-user": {"exact": "a"}}}],
                    "route": [{"destination": {"host": "flights"}, "weight": 100}],
                    "retries": {"attempts": 3, "retryOn": "5xx,503", "perTryTimeout": "1s"},
                    "timeout": "5s",
                    "fault": {"abort": {"httpStatus": 418, "percentage": {"value": 50}}},
                    "rewrite": {"uri": "/v2"},
                },
                {"route": [{"destination": {"host": "frontend", "subset": "v1"}}]},
            ],
        },
    },
    {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": "frontend", "namespace": "travel"},
        "spec": {
            "host": "frontend",
            "trafficPolicy": {"loadBalancer": {"simple": "ROUND_ROBIN"}},
            "subsets": [{"name": "v1", "labels": {"version": "v1"}}],
        },
    },
]


def config(**parts: list[dict[str, Any]]) -> dict[str, Any]:
    """A mesh config (the LOCAL_XDS document) of the sample parts, or those given."""
    doc: dict[str, Any] = {
        "workloads": WORKLOADS,
        "services": SERVICES,
        "policies": POLICIES + ROUTES,
    }
    doc.update(parts)
    return doc


def text(value: Any) -> bytes:
    return json.dumps(value).encode()
