"""`authorize`, the one inbound decision, as a table: PeerAuthentication (STRICT,
PERMISSIVE, DISABLE; mesh, namespace, port level) x plaintext or mTLS x ALLOW and DENY
policies. Each row expects the whole `Verdict`: allowed or not, which policy and rule
decided (or none), the action, the reason the operator reads, and the mTLS mode.

Istio's order (protocols.md): STRICT refuses plaintext before any AuthorizationPolicy;
then any matching DENY denies; no ALLOW policy allows; a matching ALLOW allows; otherwise
denied. A plaintext client has no principal or namespace.
"""

from __future__ import annotations

from ipaddress import ip_address
from typing import Any

import pytest

from meshcore.defaults import ROOT_NAMESPACE
from meshcore.identity.spiffe import SpiffeId
from meshcore.policy.authz import authorize
from meshcore.policy.index import PolicyIndex
from meshcore.policy.model import Action
from meshcore.policy.peerauth import MtlsMode
from meshcore.policy.verdict import DryRunResult, Verdict
from meshcore.sockets import SocketAddr
from meshcore.state import RawPolicy
from tests.support.mesh import (
    addr,
    authorization_policy,
    mesh_state,
    peer_authentication,
    web_pod,
)

WEB = web_pod("web-0", "10.244.2.20")
CLIENT = SpiffeId("cluster.local", "shop", "client")
OTHER = SpiffeId("cluster.local", "shop", "other")
CLIENT_IP = ip_address("10.244.1.10")
APP = addr("10.244.2.20:8080")
ADMIN = addr("10.244.2.20:9090")
S, P, D = MtlsMode.STRICT, MtlsMode.PERMISSIVE, MtlsMode.DISABLE


def mtls(name: str, mode: str, ns: str = "shop", **spec: Any) -> RawPolicy:
    return peer_authentication(name, {"mtls": {"mode": mode}, **spec}, ns)


def authz(name: str, action: str, *rules: dict[str, Any], ns: str = "shop") -> RawPolicy:
    spec: dict[str, Any] = {"action": action}
    if rules:
        spec["rules"] = list(rules)
    return authorization_policy(name, spec, ns)


FROM_CLIENT = {"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/client"]}}]}
FROM_CLIENT_IPS = {"from": [{"source": {"ipBlocks": ["10.244.1.0/24"]}}]}
TO_9090 = {"to": [{"operation": {"ports": ["9090"]}}]}

STRICT = mtls("strict", "STRICT")
PERMISSIVE = mtls("permissive", "PERMISSIVE")
DISABLE = mtls("disable", "DISABLE")
MESH_STRICT = mtls("mesh", "STRICT", ns=ROOT_NAMESPACE)
# The workload's own: STRICT, but plaintext still welcome on 8080.
PORT_8080_PERMISSIVE = mtls(
    "web-ports",
    "STRICT",
    selector={"matchLabels": {"app": "web"}},
    portLevelMtls={"8080": {"mode": "PERMISSIVE"}},
)
ALLOW_CLIENT = authz("allow-client", "ALLOW", FROM_CLIENT)
ALLOW_CLIENT_IPS = authz("allow-ips", "ALLOW", FROM_CLIENT_IPS)
ALLOW_NOTHING = authz("allow-nothing", "ALLOW")  # no rules: matches nothing
DENY_CLIENT = authz("deny-client", "DENY", FROM_CLIENT)
DENY_9090 = authz("deny-9090", "DENY", TO_9090)
DENY_ALL = authz("deny-all", "DENY", {})
DENY_ALL_ELSEWHERE = authz("deny-all", "DENY", {}, ns="other")
MESH_DENY_ALL = authz("deny-all", "DENY", {}, ns=ROOT_NAMESPACE)
DRY_DENY_ALL = authorization_policy(
    "dry-deny", {"action": "DENY", "rules": [{}]}, "shop", {"istio.io/dry-run": "true"}
)


def default_allow(mode: MtlsMode = P) -> Verdict:
    return Verdict(True, None, None, None, "allowed: no ALLOW policy applies", mode)


def by(key: str, action: Action, rule: int = 0, mode: MtlsMode = P) -> Verdict:
    word = "allowed" if action is Action.ALLOW else "denied"
    return Verdict(
        action is Action.ALLOW,
        key,
        rule,
        action,
        f"{word} by {action.value} policy {key} rule {rule}",
        mode,
    )


def none_matched(*keys: str, mode: MtlsMode = P) -> Verdict:
    reason = f"denied: ALLOW policies apply ({', '.join(keys)}) but none matched"
    return Verdict(False, None, None, None, reason, mode)


def plaintext_refused(key: str, port: int) -> Verdict:
    reason = (
        f"denied: PeerAuthentication {key} requires mTLS (STRICT) on port {port} and the "
        "connection is plaintext"
    )
    return Verdict(False, key, None, Action.DENY, reason, S)


def row(
    id: str,
    policies: tuple[RawPolicy, ...],
    peer: SpiffeId | None,
    expected: Verdict,
    target: SocketAddr = APP,
) -> object:
    return pytest.param(policies, peer, target, expected, id=id)


CASES = [
    # -- PeerAuthentication alone
    row("nothing, mTLS: allowed", (), CLIENT, default_allow()),
    row("nothing, plaintext: allowed (PERMISSIVE by default)", (), None, default_allow()),
    row(
        "namespace STRICT, plaintext: refused, naming the PeerAuthentication",
        (STRICT,),
        None,
        plaintext_refused("shop/strict", 8080),
    ),
    row("namespace STRICT, mTLS: allowed", (STRICT,), CLIENT, default_allow(S)),
    row(
        "mesh-wide STRICT, plaintext: refused",
        (MESH_STRICT,),
        None,
        plaintext_refused("istio-system/mesh", 8080),
    ),
    row(
        "namespace PERMISSIVE over mesh STRICT, plaintext: allowed",
        (MESH_STRICT, PERMISSIVE),
        None,
        default_allow(P),
    ),
    row("namespace PERMISSIVE, plaintext: allowed", (PERMISSIVE,), None, default_allow(P)),
    row("namespace DISABLE, plaintext: allowed", (DISABLE,), None, default_allow(D)),
    row("namespace DISABLE, mTLS: still allowed (ambient)", (DISABLE,), CLIENT, default_allow(D)),
    row(
        "port-level PERMISSIVE, plaintext to that port: allowed",
        (PORT_8080_PERMISSIVE,),
        None,
        default_allow(P),
    ),
    row(
        "port-level PERMISSIVE, plaintext to another port: the workload's STRICT refuses",
        (PORT_8080_PERMISSIVE,),
        None,
        plaintext_refused("shop/web-ports", 9090),
        target=ADMIN,
    ),
    # -- AuthorizationPolicy ALLOW
    row(
        "ALLOW by principal, that principal: allowed by the policy and rule",
        (ALLOW_CLIENT,),
        CLIENT,
        by("shop/allow-client", Action.ALLOW),
    ),
    row(
        "ALLOW by principal, another principal: no ALLOW matched",
        (ALLOW_CLIENT,),
        OTHER,
        none_matched("shop/allow-client"),
    ),
    row(
        "ALLOW by principal, plaintext (no principal): no ALLOW matched",
        (ALLOW_CLIENT,),
        None,
        none_matched("shop/allow-client"),
    ),
    row(
        "ALLOW by IP block, plaintext from inside it: allowed",
        (ALLOW_CLIENT_IPS,),
        None,
        by("shop/allow-ips", Action.ALLOW),
    ),
    row(
        "STRICT and ALLOW by IP block, plaintext: PeerAuthentication decides first",
        (STRICT, ALLOW_CLIENT_IPS),
        None,
        plaintext_refused("shop/strict", 8080),
    ),
    row(
        "STRICT and ALLOW by principal, mTLS: allowed, mode STRICT",
        (STRICT, ALLOW_CLIENT),
        CLIENT,
        by("shop/allow-client", Action.ALLOW, mode=S),
    ),
    row(
        "ALLOW without rules: matches nothing, so denies everything",
        (ALLOW_NOTHING,),
        CLIENT,
        none_matched("shop/allow-nothing"),
    ),
    row(
        "two ALLOW policies, neither matches: both named",
        (ALLOW_CLIENT, ALLOW_NOTHING),
        OTHER,
        none_matched("shop/allow-client", "shop/allow-nothing"),
    ),
    # -- AuthorizationPolicy DENY
    row(
        "DENY by principal, that principal: denied by the policy and rule",
        (DENY_CLIENT,),
        CLIENT,
        by("shop/deny-client", Action.DENY),
    ),
    row(
        "DENY by principal, plaintext (no principal): not matched, allowed",
        (DENY_CLIENT,),
        None,
        default_allow(),
    ),
    row(
        "DENY and ALLOW both match: DENY wins",
        (ALLOW_CLIENT, DENY_CLIENT),
        CLIENT,
        by("shop/deny-client", Action.DENY),
    ),
    row("DENY to port 9090, to 8080: allowed", (DENY_9090,), CLIENT, default_allow()),
    row(
        "DENY to port 9090, to 9090: denied",
        (DENY_9090,),
        CLIENT,
        by("shop/deny-9090", Action.DENY),
        target=ADMIN,
    ),
    row(
        "STRICT and DENY all, plaintext: the PeerAuthentication is named, not the DENY",
        (STRICT, DENY_ALL),
        None,
        plaintext_refused("shop/strict", 8080),
    ),
    row(
        "DENY all in another namespace: not in scope, allowed",
        (DENY_ALL_ELSEWHERE,),
        CLIENT,
        default_allow(),
    ),
    row(
        "DENY all in the root namespace: mesh-wide, denied",
        (MESH_DENY_ALL,),
        CLIENT,
        by("istio-system/deny-all", Action.DENY),
    ),
    # -- dry run: reported, never enforced
    row(
        "dry-run DENY all: allowed, and what it would have done is reported",
        (DRY_DENY_ALL,),
        CLIENT,
        Verdict(
            True,
            None,
            None,
            None,
            "allowed: no ALLOW policy applies",
            P,
            (DryRunResult("shop/dry-deny", Action.DENY, True, 0),),
        ),
    ),
]


def index(*policies: RawPolicy) -> PolicyIndex:
    return PolicyIndex.build(mesh_state([WEB], (), policies), ROOT_NAMESPACE)


@pytest.mark.parametrize(("policies", "peer", "target", "expected"), CASES)
def test_authorize(
    policies: tuple[RawPolicy, ...], peer: SpiffeId | None, target: SocketAddr, expected: Verdict
) -> None:
    assert authorize(index(*policies), WEB, peer, CLIENT_IP, target) == expected


def test_a_policy_that_does_not_parse_denies_everything_in_its_scope_and_says_why() -> None:
    broken = authz("typo", "ALLOWW", FROM_CLIENT)
    got = authorize(index(broken), WEB, CLIENT, CLIENT_IP, APP)
    assert (got.allowed, got.policy, got.rule, got.action) == (
        False,
        "shop/typo",
        None,
        Action.DENY,
    )
    assert got.reason.startswith("denied: policy shop/typo is invalid")
    assert "ALLOWW" in got.reason  # the parse error: what to fix


def test_the_verdict_serialises_for_explain_and_views() -> None:
    got = authorize(index(STRICT, DENY_CLIENT), WEB, CLIENT, CLIENT_IP, APP)
    assert got.to_json() == {
        "allowed": False,
        "policy": "shop/deny-client",
        "rule": 0,
        "action": "DENY",
        "reason": "denied by DENY policy shop/deny-client rule 0",
        "mtls": "STRICT",
        "dryRun": [],
    }
