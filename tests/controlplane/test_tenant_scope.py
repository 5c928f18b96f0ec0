"""A tenant who may write custom resources in its own namespace only: whatever it writes
there, through the whole compute (Kubernetes objects -> mesh state -> the tunnel's
authorization), changes nothing for a workload of another namespace. Its policies do take
effect on its own workloads, so the test would see a policy that was dropped altogether."""

from __future__ import annotations

import ipaddress
from typing import Any

from controlplane.compute import Inputs, build_state, compute
from meshcore.identity.spiffe import SpiffeId
from meshcore.policy.authz import authorize
from meshcore.policy.index import PolicyIndex
from meshcore.policy.peerauth import MtlsMode
from meshcore.sockets import SocketAddr
from meshcore.state import MeshState, Workload
from tests.controlplane.kubeobjects import authorization_policy, namespace, pod

AMBIENT = {"istio.io/dataplane-mode": "ambient"}
CLIENT = SpiffeId("cluster.local", "shop", "client")
CLIENT_IP = ipaddress.ip_address("10.1.0.9")
DENY_ALL = {"action": "DENY", "rules": [{}]}


def peer_authentication(ns: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }


# Everything the tenant of "evil" writes, aimed at shop's `app: api` pods by label.
TENANT_POLICIES = [
    authorization_policy(
        "evil", "deny-api", {"selector": {"matchLabels": {"app": "api"}}, **DENY_ALL}
    ),
    authorization_policy("evil", "deny-all", DENY_ALL),
    authorization_policy(
        "evil", "broken", {"selector": {"matchLabels": {"app": "api"}}, "action": "DENNY"}
    ),
    authorization_policy(
        "evil",
        "only-me",
        {
            "selector": {"matchLabels": {"app": "api"}},
            "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/evil/sa/x"]}}]}],
        },
    ),
]
TENANT_PEER_AUTH = [
    peer_authentication("evil", "open", {"mtls": {"mode": "DISABLE"}}),
    peer_authentication(
        "evil",
        "open-api",
        {"selector": {"matchLabels": {"app": "api"}}, "mtls": {"mode": "DISABLE"}},
    ),
]


def mesh(
    authorization: list[dict[str, Any]], peer_auth: list[dict[str, Any]]
) -> tuple[MeshState, PolicyIndex]:
    inputs = Inputs(
        namespaces=[namespace("shop", **AMBIENT), namespace("evil", **AMBIENT)],
        pods=[
            pod("shop", "api-0", "10.1.0.5", {"app": "api"}),
            pod("evil", "api-0", "10.1.0.6", {"app": "api"}),
        ],
        authorization_policies=authorization,
        peer_authentications=[
            # shop's owner asks for mTLS; the tenant must not be able to lift it.
            peer_authentication("shop", "strict", {"mtls": {"mode": "STRICT"}}),
            *peer_auth,
        ],
    )
    _, state, dropped = build_state(compute(inputs).document)
    assert dropped == []
    return state, PolicyIndex.build(state)


def workload(state: MeshState, ns: str) -> Workload:
    w = state.workload_by_uid(f"Kubernetes//Pod/{ns}/api-0")
    assert w is not None
    return w


def allowed(index: PolicyIndex, w: Workload, peer: SpiffeId | None) -> bool:
    target = SocketAddr(w.ips[0], 8080)
    return authorize(index, w, peer, CLIENT_IP, target).allowed


def test_a_tenants_policies_change_nothing_in_another_namespace() -> None:
    state, index = mesh(TENANT_POLICIES, TENANT_PEER_AUTH)
    shop, evil = workload(state, "shop"), workload(state, "evil")
    # Another namespace: a mesh client is let in, a plaintext one still refused (STRICT).
    assert allowed(index, shop, CLIENT)
    assert not allowed(index, shop, None)
    assert index.mtls_mode(shop, 8080) is MtlsMode.STRICT
    assert [p.key for p in index.applicable(shop)] == []
    # Its own namespace: the same objects apply (deny-all; mTLS disabled).
    assert not allowed(index, evil, CLIENT)
    assert index.mtls_mode(evil, 8080) is MtlsMode.DISABLE


def test_without_the_tenants_objects_the_verdicts_are_the_same_for_others() -> None:
    state, index = mesh([], [])
    shop = workload(state, "shop")
    assert allowed(index, shop, CLIENT) and not allowed(index, shop, None)
