"""`explain`, as a table: the route, how the destination was found, every candidate
endpoint and, for each, the destination's verdict and how the connection would be
delivered (no sockets: it runs the data path's own `outbound.decide` and `authorize`).

Each row's expectation is a frozen summary of the answer; one test checks the whole JSON
an operator sees, and the errors name what was wrong with the question.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import pytest

from meshcore.defaults import ROOT_NAMESPACE
from meshcore.policy.index import PolicyIndex
from meshcore.state import HealthStatus, MeshState, TunnelProtocol, Workload
from tests.support.mesh import (
    CLIENT_POD,
    LEGACY_POD,
    LEGACY_SERVICE,
    WEB_SERVICE,
    authorization_policy,
    ips,
    mesh_state,
    peer_authentication,
    vips,
    web_pod,
)
from ztunnel.explain import explain

WEB, LEGACY, CLIENT = WEB_SERVICE, LEGACY_SERVICE, CLIENT_POD
WEB_0 = web_pod("web-0", "10.244.2.20")
WEB_1 = web_pod("web-1", "10.244.1.21", node="node1")
SICK = web_pod("web-2", "10.244.2.22", status=HealthStatus.UNHEALTHY)
LEGACY_0 = LEGACY_POD
OUTSIDER = replace(
    CLIENT,
    uid="Kubernetes//Pod/shop/outsider",
    name="outsider",
    ips=ips("10.244.1.99"),
    protocol=TunnelProtocol.NONE,
)
DENY_CLIENT = authorization_policy(
    "deny-client",
    {
        "action": "DENY",
        "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/client"]}}]}],
    },
    "shop",
)
STRICT = peer_authentication("strict", {"mtls": {"mode": "STRICT"}}, "shop")
WORLD = (CLIENT, WEB_0, WEB_1, SICK, LEGACY_0, OUTSIDER)


@dataclass(frozen=True)
class Endpoint:
    workload: str | None
    target: str | None  # ip:port
    hbone: str | None
    delivery: str | None  # hbone | in-process; None when not HBONE
    allowed: bool | None  # the destination's verdict; None when not HBONE
    policy: str | None = None


@dataclass(frozen=True)
class Explained:
    route: str
    via: str
    service: str | None
    selection: str | None
    endpoints: tuple[Endpoint, ...]


def summary(doc: dict[str, Any]) -> Explained:
    endpoints = []
    for e in doc["endpoints"]:
        verdict = e.get("authorization")
        endpoints.append(
            Endpoint(
                e["workload"],
                f"{e['ip']}:{e['port']}" if e["ip"] is not None else None,
                e["hbone"],
                e.get("delivery"),
                verdict["allowed"] if verdict else None,
                verdict["policy"] if verdict else None,
            )
        )
    return Explained(
        doc["route"],
        doc["destination"]["via"],
        doc["destination"].get("service"),
        doc.get("selection"),
        tuple(endpoints),
    )


def hbone_to(w: Workload, port: int = 8080, delivery: str = "hbone", **verdict: Any) -> Endpoint:
    ip = str(w.ips[0])
    return Endpoint(
        f"{w.namespace}/{w.name}",
        f"{ip}:{port}",
        f"{ip}:15008",
        delivery,
        verdict.get("allowed", True),
        verdict.get("policy"),
    )


TWO = "one of 2 healthy endpoints, chosen at random per connection"
PLAIN_TWO = "one of 2 endpoints, chosen by the service's rules per connection"
DENY_ANY_PRINCIPAL = authorization_policy(
    "deny-principals",
    {"action": "DENY", "rules": [{"from": [{"source": {"principals": ["*"]}}]}]},
    "shop",
)


def plaintext_to(w: Workload, port: int = 8080, **verdict: Any) -> Endpoint:
    """A client outside the mesh: no HBONE; the destination's plaintext verdict."""
    return Endpoint(
        f"{w.namespace}/{w.name}",
        f"{w.ips[0]}:{port}",
        None,
        "plaintext",
        verdict.get("allowed", True),
        verdict.get("policy"),
    )


WEB_SVC = "shop/web.shop.svc.cluster.local"


def to_web(*endpoints: Endpoint, via: str = f"service {WEB_SVC}") -> Explained:
    """The web service's answer: an HBONE route to each of its healthy pods."""
    return Explained("HBONE", via, WEB_SVC, TWO, endpoints)


BOTH_PODS = to_web(hbone_to(WEB_0), hbone_to(WEB_1))


def case(
    id: str,
    destination: str,
    expected: Explained,
    source: str = "shop/client-0",
    policies: tuple[Any, ...] = (),
    in_process: tuple[str, ...] = (),
) -> object:
    return pytest.param(source, destination, policies, in_process, expected, id=id)


CASES = [
    case(
        "service by short name: every healthy endpoint, each with its verdict",
        "web:80",
        BOTH_PODS,
    ),
    case(
        "service as name.namespace",
        "web.shop:80",
        BOTH_PODS,
    ),
    case(
        "service as name.namespace.svc",
        "web.shop.svc:80",
        BOTH_PODS,
    ),
    case(
        "service by its VIP",
        "10.96.0.20:80",
        to_web(hbone_to(WEB_0), hbone_to(WEB_1), via="address"),
    ),
    case(
        "a pod IP: that pod only",
        "10.244.2.20:8080",
        Explained("HBONE", "address", None, "direct", (hbone_to(WEB_0),)),
    ),
    case(
        "a pod this tunnel serves too: delivered in process, still authorized",
        "web:80",
        to_web(hbone_to(WEB_0), hbone_to(WEB_1, delivery="in-process")),
        in_process=("web-1",),
    ),
    case(
        "denied by policy: the verdict names it, on every endpoint",
        "web:80",
        to_web(
            hbone_to(WEB_0, allowed=False, policy="shop/deny-client"),
            hbone_to(WEB_1, allowed=False, policy="shop/deny-client"),
        ),
        policies=(DENY_CLIENT,),
    ),
    case(
        "STRICT: a mesh client proves its identity, so allowed",
        "web:80",
        BOTH_PODS,
        policies=(STRICT,),
    ),
    case(
        "a non-mesh service: PASSTHROUGH, no verdict",
        "legacy.legacy:80",
        Explained(
            "PASSTHROUGH",
            "service legacy/legacy.legacy.svc.cluster.local",
            "legacy/legacy.legacy.svc.cluster.local",
            "the only endpoint",
            (Endpoint("legacy/legacy-0", "10.244.3.30:8080", None, None, None),),
        ),
    ),
    case(
        "an address the mesh does not know: PASSTHROUGH",
        "93.184.216.34:443",
        Explained(
            "PASSTHROUGH",
            "address",
            None,
            "direct",
            (Endpoint(None, "93.184.216.34:443", None, None, None),),
        ),
    ),
    case(
        "a port the service does not have: refused, no endpoints",
        "web:8080",
        Explained("REFUSE", f"service {WEB_SVC}", WEB_SVC, "direct", ()),
    ),
    case(
        "a tunnel port: refused",
        "10.244.2.20:15008",
        Explained("REFUSE", "address", None, "direct", ()),
    ),
    case(
        "a source outside the mesh: not captured; each endpoint's plaintext verdict",
        "web:80",
        Explained(
            "NOT_CAPTURED",
            f"service {WEB_SVC}",
            WEB_SVC,
            PLAIN_TWO,
            (plaintext_to(WEB_0), plaintext_to(WEB_1)),
        ),
        source="shop/outsider",
    ),
    case(
        "outside the mesh: a DENY on principals cannot match a plaintext client",
        "10.244.2.20:8080",
        Explained("NOT_CAPTURED", "address", None, "direct", (plaintext_to(WEB_0),)),
        source="shop/outsider",
        policies=(DENY_ANY_PRINCIPAL,),
    ),
    case(
        "outside the mesh: STRICT mTLS at the destination refuses it",
        "10.244.2.20:8080",
        Explained(
            "NOT_CAPTURED",
            "address",
            None,
            "direct",
            (plaintext_to(WEB_0, allowed=False, policy="shop/strict"),),
        ),
        source="shop/outsider",
        policies=(STRICT,),
    ),
    case(
        "outside the mesh to a pod outside it: no tunnel decides",
        "legacy.legacy:80",
        Explained(
            "NOT_CAPTURED",
            "service legacy/legacy.legacy.svc.cluster.local",
            "legacy/legacy.legacy.svc.cluster.local",
            "the only endpoint",
            (Endpoint("legacy/legacy-0", "10.244.3.30:8080", None, "plaintext", None),),
        ),
        source="shop/outsider",
    ),
]


def index(state: MeshState) -> PolicyIndex:
    return PolicyIndex.build(state, ROOT_NAMESPACE)


@pytest.mark.parametrize(("source", "destination", "policies", "in_process", "expected"), CASES)
def test_explain(
    source: str,
    destination: str,
    policies: tuple[Any, ...],
    in_process: tuple[str, ...],
    expected: Explained,
) -> None:
    state = mesh_state(WORLD, (WEB, LEGACY), policies)

    def served_here(_src: Workload, dst: Workload) -> bool:
        return dst.name in in_process

    got = explain(state, index(state), source, destination, in_process=served_here)
    assert summary(got) == expected


def test_the_whole_answer_for_one_endpoint() -> None:
    state = mesh_state(WORLD, (WEB, LEGACY), (STRICT, DENY_CLIENT))
    got = explain(state, index(state), "shop/client-0", "10.244.2.20:8080")
    assert got == {
        "source": {
            "workload": "shop/client-0",
            "identity": "spiffe://cluster.local/ns/shop/sa/client",
            "ip": "10.244.1.10",
            "enrolled": True,
        },
        "destination": {
            "input": "10.244.2.20:8080",
            "ip": "10.244.2.20",
            "port": 8080,
            "via": "address",
            "service": None,
        },
        "route": "HBONE",
        "reason": "destination is in the mesh",
        "waypoint": None,
        "waypoint_reason": (
            "workload shop/web-0 is not bound to a waypoint (a service's waypoint applies "
            "only to traffic sent to the service's VIP; a pod binding needs a waypoint for "
            "workload or all)"
        ),
        "selection": "direct",
        "endpoints": [
            {
                "workload": "shop/web-0",
                "ip": "10.244.2.20",
                "port": 8080,
                "hbone": "10.244.2.20:15008",
                "identity": "spiffe://cluster.local/ns/shop/sa/web",
                "node": "node2",
                "healthy": True,
                "route": "HBONE",
                "delivery": "hbone",
                "authorization": {
                    "allowed": False,
                    "policy": "shop/deny-client",
                    "rule": 0,
                    "action": "DENY",
                    "reason": "denied by DENY policy shop/deny-client rule 0",
                    "mtls": "STRICT",
                    "dryRun": [],
                },
                "mtls": "STRICT",
            }
        ],
    }


@pytest.mark.parametrize(
    ("source", "destination", "says"),
    [
        pytest.param(
            "client-0", "web:80", "must be <namespace>/<pod name>", id="source without namespace"
        ),
        pytest.param("shop/ghost", "web:80", "no workload shop/ghost", id="unknown source"),
        pytest.param("shop/client-0", "web", "must be <host or ip>:<port>", id="no port"),
        pytest.param("shop/client-0", "web:0", "must be <host or ip>:<port>", id="port 0"),
        pytest.param("shop/client-0", "web:http", "must be <host or ip>:<port>", id="named port"),
        pytest.param(
            "shop/client-0",
            "fd00::20:8080",
            r"must be <host or ip>:<port> \(an IPv6 address in brackets:",
            id="IPv6 without brackets (is 8080 a port or part of the address?)",
        ),
        pytest.param(
            "shop/client-0",
            "nowhere:80",
            "neither an IP address nor a known service",
            id="unknown host",
        ),
    ],
)
def test_a_question_that_cannot_be_answered_says_what_is_wrong(
    source: str, destination: str, says: str
) -> None:
    state = mesh_state(WORLD, (WEB, LEGACY))
    with pytest.raises(ValueError, match=says):
        explain(state, index(state), source, destination)


def test_a_service_without_a_vip_on_the_source_network_is_an_error() -> None:
    state = mesh_state(WORLD, (replace(WEB, vips=vips("10.96.0.20", network="net2")), LEGACY))
    with pytest.raises(ValueError, match="has no VIP on network ''"):
        explain(state, index(state), "shop/client-0", "web:80")
