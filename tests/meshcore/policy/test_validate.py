"""`check_resource`: an entry is accepted only if the tunnel would enforce it as written."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from meshcore.discovery import parse_local_config
from meshcore.policy.index import PolicyIndex
from meshcore.policy.validate import check_resource

ALLOW: dict[str, Any] = {
    "apiVersion": "security.istio.io/v1",
    "kind": "AuthorizationPolicy",
    "metadata": {"name": "pricing", "namespace": "travel"},
    "spec": {
        "selector": {"matchLabels": {"app": "pricing"}},
        "action": "ALLOW",
        "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/travel/sa/flights"]}}]}],
    },
}
STRICT: dict[str, Any] = {
    "apiVersion": "security.istio.io/v1",
    "kind": "PeerAuthentication",
    "metadata": {"name": "strict", "namespace": "travel"},
    "spec": {"mtls": {"mode": "STRICT"}},
}


def edit(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of `doc` with the dotted `path` set (list indexes as numbers)."""
    out = copy.deepcopy(doc)
    *parents, last = path.split(".")
    node: Any = out
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    node[int(last) if last.isdigit() else last] = value
    return out


GOOD = [
    pytest.param(ALLOW, id="allow by principal"),
    pytest.param(STRICT, id="peer authentication"),
    pytest.param(edit(ALLOW, "spec.rules.0.from.0.source.principals", ["*"]), id="presence"),
    pytest.param(
        edit(ALLOW, "spec.rules.0.from.0.source.principals", ["cluster.local/ns/travel/*"]),
        id="prefix",
    ),
    pytest.param(edit(ALLOW, "spec.rules.0.from.0.source.namespaces", ["*-prod"]), id="suffix"),
    pytest.param(
        edit(ALLOW, "spec.rules", [{"when": [{"key": "source.namespace", "values": ["tr*"]}]}]),
        id="when prefix",
    ),
    pytest.param(
        {"name": "flat", "namespace": "travel", "action": "DENY", "rules": [{}]}, id="flat form"
    ),
]


@pytest.mark.parametrize("doc", GOOD)
def test_accepted(doc: dict[str, Any]) -> None:
    check = check_resource(doc)
    assert check.ok, check.errors


BAD = [
    pytest.param(
        {**ALLOW, "apiVersion": "networking.istio.io/v1", "kind": "VirtualService"},
        "kind 'VirtualService' is not enforced by this mesh; it enforces AuthorizationPolicy "
        "and PeerAuthentication",
        id="unknown kind",
    ),
    pytest.param(
        edit(ALLOW, "spec.action", "ALLOWW"),
        "spec.action: expected one of ALLOW, DENY, AUDIT, CUSTOM, got 'ALLOWW'",
        id="bad action",
    ),
    pytest.param(
        edit(ALLOW, "spec.rulez", []), "spec.rulez: unknown field", id="typo in a spec field"
    ),
    pytest.param(
        edit(ALLOW, "spec.rules.0.from.0.source.principal", ["x"]),
        "spec.rules[0].from[0].source.principal: unknown field",
        id="typo in a source field",
    ),
    pytest.param(
        edit(ALLOW, "spec.rules.0.from.0.source.principals", ["cluster.local/ns/*/sa/flights"]),
        "spec.rules[0].from[0].source.principals[0]: 'cluster.local/ns/*/sa/flights': '*' may "
        "only be the whole value",
        id="star in the middle of a principal",
    ),
    pytest.param(
        edit(ALLOW, "spec.rules.0.from.0.source.notNamespaces", ["*a*"]),
        "source.notNamespaces[0]: '*a*'",
        id="two stars",
    ),
    pytest.param(
        edit(ALLOW, "spec.rules", [{"when": [{"key": "source.principal", "notValues": ["a*b"]}]}]),
        "spec.rules[0].when[0].notValues[0]: 'a*b'",
        id="star in the middle of a when value",
    ),
    pytest.param(
        edit(STRICT, "spec.mtls.mode", "strict"),
        "spec.mtls.mode: expected one of UNSET, STRICT, PERMISSIVE, DISABLE, got 'strict'",
        id="mode is case-sensitive",
    ),
    pytest.param(
        edit(STRICT, "spec.portLevelMtls", {"8080": {"mode": "STRICT"}}),
        "cannot set port modes",
        id="port modes without a selector",
    ),
    pytest.param(
        edit(ALLOW, "metadata", {"namespace": "travel"}),
        "metadata.name: is required",
        id="no name",
    ),
    pytest.param("text", "expected a mapping", id="not a mapping"),
]


@pytest.mark.parametrize(("doc", "says"), BAD)
def test_refused_naming_the_field(doc: Any, says: str) -> None:
    check = check_resource(doc)
    assert not check.ok
    assert says in " ".join(check.errors)


def test_identity_and_warnings_are_reported() -> None:
    l7 = edit(ALLOW, "spec.rules", [{"to": [{"operation": {"methods": ["GET"]}}]}])
    check = check_resource(l7)
    assert check.ok and check.key == "AuthorizationPolicy travel/pricing"
    assert any("L7 field `methods`" in w for w in check.warnings)
    assert check_resource(STRICT).key == "PeerAuthentication travel/strict"


SALVAGED = {"bad action", "typo in a spec field", "typo in a source field"}
SALVAGED |= {"mode is case-sensitive", "port modes without a selector"}


@pytest.mark.parametrize("doc", [p.values[0] for p in BAD if p.id in SALVAGED])
def test_what_is_refused_here_the_tunnel_would_replace_with_a_deny_all(doc: Any) -> None:
    """The tunnel keeps a fail-closed stand-in for these, never what the author wrote."""
    index = PolicyIndex.build(parse_local_config(json.dumps({"policies": [doc]})))
    assert len(index.errors) == 1
