"""The gRPC CA's pure decisions, as tables: who is the caller, what may it be issued."""

from __future__ import annotations

import base64
import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from controlplane.ca_grpc_auth import (
    EXTRA_POD_NAME,
    EXTRA_POD_UID,
    Caller,
    Code,
    Issue,
    NodeFacts,
    PodFacts,
    Policy,
    RateLimiter,
    Refusal,
    bearer_token,
    caller_from_review,
    decide,
    explain_rejected_token,
    needs_node_facts,
    validity,
)
from meshcore.identity.spiffe import SpiffeId

TD = "cluster.local"
POLICY = Policy(TD)
ALICE = SpiffeId(TD, "app", "alice")
BOB = SpiffeId(TD, "app", "bob")
TUNNEL = Caller("istio-system", "ztunnel", "ztunnel-a", "uid-a")
TUNNEL_ID = SpiffeId(TD, "istio-system", "ztunnel")
ALICE_CALLER = Caller("app", "alice", "alice-1", "uid-1")
TUNNEL_POD = PodFacts("istio-system", "ztunnel-a", "uid-a", "ztunnel", "node-a")
ON_NODE = NodeFacts(TUNNEL_POD, True)
DAY = timedelta(hours=24)


@pytest.mark.parametrize(
    ("caller", "csr", "impersonated", "node", "expected"),
    [
        # its own identity, no impersonation
        (ALICE_CALLER, ALICE, "", None, Issue(ALICE, DAY, "")),
        # the tunnel, for a pod on its node
        (TUNNEL, ALICE, str(ALICE), ON_NODE, Issue(ALICE, DAY, "node-a")),
        # the tunnel, for its own identity through the metadata: no node check needed
        (TUNNEL, TUNNEL_ID, str(TUNNEL_ID), None, Issue(TUNNEL_ID, DAY, "")),
        # not a node proxy
        (ALICE_CALLER, BOB, str(BOB), None, (Code.PERMISSION_DENIED, "not a node proxy")),
        # no pod with that identity on the tunnel's node
        (
            TUNNEL,
            ALICE,
            str(ALICE),
            NodeFacts(TUNNEL_POD, False),
            (Code.PERMISSION_DENIED, "no such pod on your node.*node 'node-a'"),
        ),
        # the tunnel's pod is gone, replaced, runs as someone else, or is not scheduled
        (TUNNEL, ALICE, str(ALICE), NodeFacts(None, False), (Code.PERMISSION_DENIED, "no longer")),
        (
            TUNNEL,
            ALICE,
            str(ALICE),
            NodeFacts(PodFacts("istio-system", "ztunnel-a", "uid-x", "ztunnel", "node-a"), True),
            (Code.PERMISSION_DENIED, "replaced"),
        ),
        (
            TUNNEL,
            ALICE,
            str(ALICE),
            NodeFacts(PodFacts("istio-system", "ztunnel-a", "uid-a", "other", "node-a"), True),
            (Code.PERMISSION_DENIED, "runs as other"),
        ),
        (
            TUNNEL,
            ALICE,
            str(ALICE),
            NodeFacts(PodFacts("istio-system", "ztunnel-a", "uid-a", "ztunnel", ""), False),
            (Code.PERMISSION_DENIED, "not on a node"),
        ),
        # a tunnel token not bound to a pod: its node is unknown
        (
            Caller("istio-system", "ztunnel"),
            ALICE,
            str(ALICE),
            None,
            (Code.PERMISSION_DENIED, "not bound to a pod"),
        ),
        # facts that were needed but not looked up: fail closed
        (TUNNEL, ALICE, str(ALICE), None, (Code.UNAVAILABLE, "not looked up")),
        # bad impersonation targets
        (TUNNEL, ALICE, "alice", ON_NODE, (Code.INVALID_ARGUMENT, "ImpersonatedIdentity")),
        (
            TUNNEL,
            ALICE,
            "spiffe://other.td/ns/app/sa/alice",
            ON_NODE,
            (Code.PERMISSION_DENIED, "outside trust domain"),
        ),
        # CSR mismatch, with and without impersonation; an unreadable CSR
        (ALICE_CALLER, BOB, "", None, (Code.PERMISSION_DENIED, "CSR identity mismatch")),
        (TUNNEL, BOB, str(ALICE), ON_NODE, (Code.PERMISSION_DENIED, "CSR identity mismatch")),
        (TUNNEL, TUNNEL_ID, str(ALICE), ON_NODE, (Code.PERMISSION_DENIED, "CSR identity")),
        (ALICE_CALLER, "no SAN", "", None, (Code.INVALID_ARGUMENT, "invalid CSR: no SAN")),
    ],
)
def test_decide(caller, csr, impersonated, node, expected) -> None:
    got = decide(POLICY, caller, csr, impersonated, 0, node)
    if isinstance(expected, Issue):
        assert got == expected
    else:
        assert isinstance(got, Refusal), got
        code, words = expected
        assert got.code is code
        assert re.search(words, got.reason), got.reason


def test_node_facts_are_looked_up_only_for_a_bound_node_proxy_that_impersonates() -> None:
    assert needs_node_facts(POLICY, TUNNEL, str(ALICE))
    assert not needs_node_facts(POLICY, TUNNEL, "")
    assert not needs_node_facts(POLICY, ALICE_CALLER, str(BOB))
    assert not needs_node_facts(POLICY, Caller("istio-system", "ztunnel"), str(ALICE))
    custom = Policy(TD, frozenset({("kube-system", "node-proxy")}))
    assert not needs_node_facts(custom, TUNNEL, str(ALICE))
    assert decide(custom, TUNNEL, ALICE, str(ALICE), 0, None) == Refusal(
        Code.PERMISSION_DENIED,
        "not a node proxy: istio-system/ztunnel may not request another identity "
        f"({ALICE}); only kube-system/node-proxy may",
    )


@pytest.mark.parametrize(
    ("requested", "expected"),
    [
        (0, DAY),
        (-5, DAY),
        (3600, timedelta(hours=1)),
        (30 * 86400, timedelta(days=7)),
        (2**62, timedelta(days=7)),
    ],
)
def test_validity_defaults_and_caps(requested: int, expected: timedelta) -> None:
    assert validity(POLICY, requested) == expected
    assert validity(Policy(TD, max_validity=timedelta(hours=2)), requested) <= timedelta(hours=2)


def _status(
    username: str, audiences: list[str] | None = None, **extra: list[str]
) -> dict[str, Any]:
    user: dict[str, Any] = {"username": username}
    if extra:
        user["extra"] = extra
    out: dict[str, Any] = {"authenticated": True, "user": user}
    if audiences is not None:
        out["audiences"] = audiences
    return out


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (
            _status(
                "system:serviceaccount:app:alice",
                ["istio-ca"],
                **{EXTRA_POD_NAME: ["alice-1"], EXTRA_POD_UID: ["uid-1"]},
            ),
            ALICE_CALLER,
        ),
        (_status("system:serviceaccount:app:alice"), Caller("app", "alice")),
        ({"authenticated": False, "error": "token is expired"}, "unauthenticated: token is"),
        ({}, "not valid"),
        (_status("system:serviceaccount:app:alice", ["other"]), "wrong audience"),
        (_status("admin"), "not a service account"),
        (_status("system:serviceaccount:app"), "malformed"),
        (_status("system:serviceaccount:app:a:b"), "malformed"),
    ],
)
def test_caller_from_review(status: dict[str, Any], expected: Caller | str) -> None:
    got = caller_from_review(status)
    if isinstance(expected, Caller):
        assert got == expected
    else:
        assert isinstance(got, Refusal) and got.code is Code.UNAUTHENTICATED
        assert expected in got.reason


def _jwt(claims: dict[str, Any]) -> str:
    def b64(d: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()

    return f"{b64({'alg': 'RS256'})}.{b64(claims)}.c2ln"


NOW = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("token", "words"),
    [
        (_jwt({"exp": NOW.timestamp() - 60, "aud": ["istio-ca"]}), "expired at 2025-12-31T23:59"),
        (_jwt({"exp": NOW.timestamp() + 60, "aud": "kube"}), "wrong audience: the token is for"),
        (_jwt({"exp": NOW.timestamp() + 60, "aud": ["istio-ca"]}), "rejected the token: boom"),
        ("not-a-jwt", "rejected the token: boom"),
        ("a.!!!.c", "rejected the token: boom"),
        (_jwt({"exp": True}), "rejected the token: boom"),  # a bool is not a time
    ],
)
def test_a_refused_token_is_explained(token: str, words: str) -> None:
    reason = explain_rejected_token(token, "boom", "istio-ca", NOW)
    assert reason.startswith("unauthenticated: ") and words in reason


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ([("authorization", "Bearer abc")], "abc"),
        ([("Authorization", "bearer  abc ")], "abc"),
        ([], "no token"),
        ([("authorization", "Basic abc")], "not 'Bearer <token>'"),
        ([("authorization", "Bearer ")], "not 'Bearer <token>'"),
        ([("authorization", "Bearer a"), ("authorization", "Bearer b")], "more than one"),
    ],
)
def test_bearer_token(metadata: list[tuple[str, str]], expected: str) -> None:
    got = bearer_token(metadata)
    if isinstance(got, Refusal):
        assert got.code is Code.UNAUTHENTICATED and expected in got.reason
    else:
        assert got == expected


def test_rate_limit_per_key_refills_and_stays_bounded() -> None:
    rl = RateLimiter(rate_per_s=2.0, burst=3, max_keys=4)
    assert [rl.allow("node-a", 0.0) for _ in range(4)] == [True, True, True, False]
    assert rl.allow("node-b", 0.0)  # another node has its own bucket
    assert rl.allow("node-a", 0.5)  # one token back after half a second
    assert not rl.allow("node-a", 0.5)
    for i in range(1000):
        rl.allow(f"n{i}", 1.0 + i)
    assert len(rl) <= 4
    with pytest.raises(ValueError, match="positive"):
        RateLimiter(0, 1)
