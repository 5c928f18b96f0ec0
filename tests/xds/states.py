"""Mesh states for the xDS tests: the travel demo's, with policies and L7 resources of every
shape the mesh config takes."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from localcluster.spec import parse_cluster
from localcluster.xds import local_xds
from meshcore.discovery import parse_local_config
from meshcore.state import MeshState

DEMO = Path(__file__).resolve().parents[2] / "demo" / "travel-cluster.yaml"

POLICIES: list[dict[str, Any]] = [
    {  # Istio form with a selector, from/to/when and an L7 field (dropped at L4)
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "pricing-allow", "namespace": "travel"},
        "spec": {
            "selector": {"matchLabels": {"app": "pricing"}},
            "action": "ALLOW",
            "rules": [
                {
                    "from": [{"source": {"principals": ["cluster.local/ns/travel/sa/*"]}}],
                    "to": [{"operation": {"ports": ["8080"]}}],
                    "when": [{"key": "source.ip", "values": ["10.244.0.0/16"]}],
                },
                {"to": [{"operation": {"methods": ["GET"]}}]},
            ],
        },
    },
    {  # flat form, DENY, namespaces and not-ports
        "name": "deny-legacy",
        "namespace": "travel",
        "action": "DENY",
        "rules": [{"from": [{"source": {"namespaces": ["legacy"], "notIpBlocks": ["10.0.0.1"]}}]}],
    },
    {  # xDS form, mesh-wide
        "name": "global",
        "namespace": "istio-system",
        "scope": "GLOBAL",
        "action": "ALLOW",
        "groups": [
            {
                "rules": [
                    {
                        "matches": [
                            {
                                "serviceAccounts": [{"namespace": "travel", "serviceAccount": "x"}],
                                "destinationPorts": [80, 443],
                                "principals": [{"presence": {}}],
                                "notPrincipals": [{"suffix": "/sa/bad"}],
                            }
                        ]
                    }
                ]
            }
        ],
    },
    {  # a waypoint's policy: never enforced by the tunnel
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "post-denied", "namespace": "travel"},
        "spec": {
            "targetRefs": [{"kind": "Service", "group": "", "name": "pricing"}],
            "action": "DENY",
            "rules": [{"to": [{"operation": {"methods": ["POST"]}}]}],
        },
    },
    {  # broken: sent as the fail-closed stand-in
        "name": "broken",
        "namespace": "travel",
        "action": "ALLOW",
        "rules": [{"from": [{"source": {"ipBlocks": ["not-an-ip"]}}]}],
    },
    {
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": "strict", "namespace": "travel"},
        "spec": {"mtls": {"mode": "STRICT"}},
    },
]

RESOURCES: list[dict[str, Any]] = [
    {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "flights-canary", "namespace": "travel"},
        "spec": {
            "parentRefs": [{"kind": "Service", "group": "", "name": "flights"}],
            "rules": [
                {
                    "backendRefs": [
                        {"name": "flights-v1", "port": 80, "weight": 90},
                        {"name": "flights-v2", "port": 80, "weight": 10},
                    ]
                }
            ],
        },
    },
]


def demo_document(
    policies: list[dict[str, Any]] | None = None, resources: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    spec = parse_cluster(DEMO.read_text(), DEMO.parent)
    return local_xds(
        spec,
        POLICIES if policies is None else policies,
        RESOURCES if resources is None else resources,
    )


@cache
def demo_state() -> MeshState:
    return parse_local_config(json.dumps(demo_document()))


def large_state(n: int) -> MeshState:
    """`n` workloads behind n/10 services: a first push of several HTTP/2 windows."""
    import dataclasses
    import ipaddress

    base = demo_state()
    template = base.workloads[0]
    svc = base.services[0]
    workloads = [
        dataclasses.replace(
            template,
            uid=f"c//Pod/ns/w{i}",
            name=f"w{i}",
            ips=(ipaddress.IPv4Address(0x0AF00000 + i),),
            services=((svc.key, ((80, 8080),)),),
        )
        for i in range(n)
    ]
    return MeshState.build(workloads, [svc], base.policies)
