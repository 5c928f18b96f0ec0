"""Policy documents as `ambientctl apply` / `delete -f` take them: kubectl's defaults, the
tunnels' checks, all or nothing."""

from __future__ import annotations

from typing import Any

import pytest

from localcluster.policies import (
    MAX_POLICIES,
    PolicyError,
    Resource,
    check_documents,
    delete_keys,
    key_of,
    merge,
    remove,
)


def authz(name: str, ns: str | None = "travel", **spec: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if ns is not None:
        meta["namespace"] = ns
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": meta,
        "spec": spec or {"action": "DENY", "rules": [{}]},
    }


def test_a_policy_without_namespace_goes_to_default_as_kubectl_puts_it() -> None:
    """Without it the tunnel would read the policy as mesh-wide."""
    (res,) = check_documents([authz("deny-all", ns=None)], "f.yaml")
    assert res.key == ("AuthorizationPolicy", "default", "deny-all")
    assert res.doc["metadata"]["namespace"] == "default"


@pytest.mark.parametrize(
    ("doc", "says"),
    [
        ({"kind": "AuthorizationPolicy", "metadata": {"name": "x"}}, "apiVersion not set"),
        ({"name": "x", "action": "DENY"}, "apiVersion, kind, metadata not set"),
        ("just text", "expected a resource (a mapping), got str"),
        ({**authz("x"), "kind": "VirtualService"}, "kind 'VirtualService' is not enforced"),
        (authz("x", action="ALLOWW"), "spec.action"),
    ],
    ids=["no apiVersion", "flat entry", "not a mapping", "unknown kind", "bad value"],
)
def test_refused(doc: Any, says: str) -> None:
    with pytest.raises(PolicyError) as e:
        check_documents([doc], "f.yaml")
    assert str(e.value).startswith("f.yaml: ") and says in str(e.value)


def test_a_batch_is_all_or_nothing_and_names_every_bad_document() -> None:
    docs = [authz("a"), authz("b", action="ALLOWW"), authz("c"), {"kind": "VirtualService"}]
    with pytest.raises(PolicyError) as e:
        check_documents(docs, "f.yaml")
    text = str(e.value)
    assert text.startswith("2 problems:")
    assert "f.yaml[1]: AuthorizationPolicy travel/b" in text and "f.yaml[3]:" in text


def test_the_same_resource_twice_in_one_batch_is_refused() -> None:
    with pytest.raises(PolicyError, match=r"f.yaml\[1\]: AuthorizationPolicy travel/a is also "):
        check_documents([authz("a"), authz("a", action="ALLOW")], "f.yaml")


def _res(doc: dict[str, Any]) -> Resource:
    (res,) = check_documents([doc], "x")
    return res


def test_merge_creates_or_replaces_in_place() -> None:
    current = [dict(_res(authz("a")).doc), dict(_res(authz("b")).doc)]
    new_a = _res(authz("a", action="ALLOW", rules=[{}]))
    out = merge(current, [new_a, _res(authz("c"))])
    assert [key_of(d)[2] for d in out] == ["a", "b", "c"]
    assert out[0]["spec"]["action"] == "ALLOW"


def test_merge_refuses_more_than_the_limit() -> None:
    current = [dict(_res(authz(f"p{i}")).doc) for i in range(MAX_POLICIES)]
    with pytest.raises(PolicyError, match=f"at most {MAX_POLICIES} policies"):
        merge(current, [_res(authz("one-more"))])


def test_remove_is_all_or_nothing() -> None:
    current = [dict(_res(authz("a")).doc), dict(_res(authz("b")).doc)]
    a, b = key_of(current[0]), key_of(current[1])
    assert remove(current, [a]) == [current[1]]
    gone = ("AuthorizationPolicy", "travel", "zz")
    with pytest.raises(PolicyError, match="no AuthorizationPolicy travel/zz"):
        remove(current, [b, gone])


def test_delete_keys_read_only_kind_namespace_and_name() -> None:
    broken = authz("a", ns=None, action="ALLOWW")  # its spec does not matter to delete
    assert delete_keys([broken], "f") == [("AuthorizationPolicy", "default", "a")]
    assert delete_keys([{**authz("a"), "kind": "VirtualService"}], "f") == [
        ("VirtualService", "travel", "a")
    ]
    with pytest.raises(PolicyError, match="kind 'Ingress' is not one this mesh holds"):
        delete_keys([{**authz("a"), "kind": "Ingress"}], "f")
    with pytest.raises(PolicyError, match=r"metadata\.name not set"):
        delete_keys([{**authz("a"), "metadata": {"namespace": "x"}}], "f")
