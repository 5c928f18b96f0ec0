"""Audit events -> the calls a user made, set against RBAC rules (pure)."""

from __future__ import annotations

import json

from localcluster.kube.audit import Call, Rule, allowed, calls, parse_events, rules_of, unused

SA = "system:serviceaccount:istio-system:ambient-node-agent"


def _ev(verb: str, resource: str, ns: str = "", group: str = "", code: int = 200, **kw: str) -> str:
    ref = {"resource": resource, "namespace": ns, "apiGroup": group, **kw}
    return json.dumps(
        {
            "stage": "ResponseComplete",
            "verb": verb,
            "user": {"username": kw.pop("user", SA)},
            "objectRef": ref,
            "responseStatus": {"code": code},
        }
    )


def test_calls_of_one_user() -> None:
    lines = [
        _ev("list", "pods"),
        _ev("watch", "pods"),
        _ev("patch", "pods", "travel"),
        _ev("get", "daemonsets", "istio-system", "apps"),
        _ev("update", "pods", "travel", subresource="status"),
        _ev("get", "secrets", "istio-system", code=403),
        json.dumps({"stage": "RequestReceived", "verb": "get", "user": {"username": SA}}),
        json.dumps(
            {
                "stage": "ResponseComplete",
                "verb": "get",
                "user": {"username": SA},
                "requestURI": "/version",
            }
        ),
        json.dumps({**json.loads(_ev("delete", "pods", "x")), "user": {"username": "other"}}),
        "not json",
    ]
    got = calls(parse_events(lines), SA)
    assert got == {
        Call("", "pods", "list", ""),
        Call("", "pods", "watch", ""),
        Call("", "pods", "patch", "travel"),
        Call("apps", "daemonsets", "get", "istio-system"),
        Call("", "pods/status", "update", "travel"),
        Call("", "secrets", "get", "istio-system", denied=True),
    }


def test_rules_bound_to_a_service_account_and_rbac_matching() -> None:
    objects = [
        {
            "kind": "ClusterRole",
            "metadata": {"name": "agent"},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}],
        },
        {
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "agent"},
            "roleRef": {"kind": "ClusterRole", "name": "agent"},
            "subjects": [
                {
                    "kind": "ServiceAccount",
                    "name": "ambient-node-agent",
                    "namespace": "istio-system",
                }
            ],
        },
        {
            "kind": "Role",
            "metadata": {"name": "own", "namespace": "istio-system"},
            "rules": [{"apiGroups": ["apps"], "resources": ["daemonsets"], "verbs": ["get"]}],
        },
        {
            "kind": "RoleBinding",
            "metadata": {"name": "own", "namespace": "istio-system"},
            "roleRef": {"kind": "Role", "name": "own"},
            "subjects": [
                {
                    "kind": "ServiceAccount",
                    "name": "ambient-node-agent",
                    "namespace": "istio-system",
                }
            ],
        },
        {
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "someone-else"},
            "roleRef": {"kind": "ClusterRole", "name": "agent"},
            "subjects": [
                {"kind": "ServiceAccount", "name": "ztunnel", "namespace": "istio-system"}
            ],
        },
    ]
    rules = rules_of(objects, "ambient-node-agent", "istio-system")
    assert len(rules) == 2
    assert allowed(rules, Call("", "pods", "list", ""))
    assert not allowed(rules, Call("", "pods", "patch", "travel"))
    assert allowed(rules, Call("apps", "daemonsets", "get", "istio-system"))
    assert not allowed(rules, Call("apps", "daemonsets", "get", "travel"))  # a Role's scope
    assert rules_of(objects, "ztunnel", "istio-system")[0].verbs == ("get", "list")
    used = {Call("", "pods", "list", ""), Call("apps", "daemonsets", "get", "istio-system")}
    assert unused(rules, used) == [("", "pods", "get")]
    assert unused([Rule(("*",), ("*",), ("*",))], used) == [("*", "*", "*")]


def test_calls_before_a_moment() -> None:
    from datetime import UTC, datetime

    early = json.loads(_ev("list", "pods"))
    early["requestReceivedTimestamp"] = "2026-12-02T12:00:00.000001Z"
    late = json.loads(_ev("patch", "pods", "travel", code=403))
    late["requestReceivedTimestamp"] = "2026-12-02T12:05:00.000000Z"
    undated = json.loads(_ev("get", "pods", "x"))
    events = [early, late, undated]
    cut = datetime(2026, 12, 2, 12, 1, tzinfo=UTC)
    assert calls(events, SA, before=cut) == {Call("", "pods", "list", "")}
    assert len(calls(events, SA)) == 3


def test_calls_not_by_a_probe() -> None:
    agent = json.loads(_ev("patch", "pods", "travel"))
    agent["userAgent"] = "Python/3.11 aiohttp/3.9"
    probe = json.loads(_ev("patch", "pods", "shop", code=403))
    probe["userAgent"] = "mesh-e2e-probe"
    assert calls([agent, probe], SA, not_by="mesh-e2e-probe") == {
        Call("", "pods", "patch", "travel")
    }
    assert len(calls([agent, probe], SA)) == 2
