"""Label keys, values and `kubectl label` changes, checked as Kubernetes checks them."""

from __future__ import annotations

import pytest

from localcluster.labels import LabelChange, LabelError, label_errors, parse_change, parse_changes

GOOD = [
    pytest.param("app=pricing", LabelChange("app", "pricing"), id="plain"),
    pytest.param("app=", LabelChange("app", ""), id="empty value"),
    pytest.param("app-", LabelChange("app", None), id="removal"),
    pytest.param(
        "istio.io/dataplane-mode=ambient",
        LabelChange("istio.io/dataplane-mode", "ambient"),
        id="prefixed key",
    ),
    pytest.param("istio.io/dataplane-mode=none", LabelChange("istio.io/dataplane-mode", "none")),
    pytest.param("A.b_c-9=X.y_z-1", LabelChange("A.b_c-9", "X.y_z-1"), id="full charset"),
    pytest.param("k" * 63 + "=" + "v" * 63, LabelChange("k" * 63, "v" * 63), id="63 characters"),
    pytest.param(
        "a" * 63 + "." + "b" * 189 + "/k=v",
        LabelChange("a" * 63 + "." + "b" * 189 + "/k", "v"),
        id="253-character prefix",
    ),
]


@pytest.mark.parametrize(("text", "want"), GOOD)
def test_accepted(text: str, want: LabelChange) -> None:
    assert parse_change(text) == want


BAD = [
    pytest.param("a=b=c", "value 'b=c'", id="equals sign in the value"),
    pytest.param("a b=c", "label key 'a b'", id="space in the key"),
    pytest.param("k" * 300 + "=v", "longer than 63", id="300-character key"),
    pytest.param("a=" + "v" * 64, "longer than 63", id="64-character value"),
    pytest.param("istio.io/dataplane-mode=AMBIENT", "must be one of ambient, none", id="AMBIENT"),
    pytest.param("istio.io/dataplane-mode=sidecar", "must be one of ambient, none", id="sidecar"),
    pytest.param("Istio.io/x=y", "must be a DNS subdomain", id="uppercase prefix"),
    pytest.param("/x=y", "prefix before '/' must not be empty", id="empty prefix"),
    pytest.param("a/=y", "name must not be empty", id="empty name"),
    pytest.param("=y", "name must not be empty", id="empty key"),
    pytest.param("-a=y", "name must be", id="leading dash"),
    pytest.param("a=y-", "value 'y-'", id="trailing dash in the value"),
    pytest.param("a" * 254 + "/k=v", "DNS subdomain", id="254-character prefix"),
    pytest.param("noequals", "expected KEY=VALUE", id="neither form"),
    pytest.param("-", "expected KEY=VALUE", id="a lone dash"),
    pytest.param("a b-", "label key 'a b'", id="bad key removed"),
]


@pytest.mark.parametrize(("text", "says"), BAD)
def test_refused_with_the_reason(text: str, says: str) -> None:
    with pytest.raises(LabelError) as e:
        parse_change(text)
    assert says in str(e.value)


def test_a_list_with_one_bad_entry_is_refused_whole() -> None:
    with pytest.raises(LabelError) as e:
        parse_changes(["good=1", "a b=2", "also=3", "a=b=c"])
    assert "'a b'" in str(e.value) and "'b=c'" in str(e.value)
    assert parse_changes(["x=1", "y-"]) == [LabelChange("x", "1"), LabelChange("y", None)]


def test_a_key_given_twice_is_refused() -> None:
    with pytest.raises(LabelError, match="given more than once"):
        parse_changes(["a=1", "a-"])


def test_label_sets_report_every_problem() -> None:
    assert label_errors({"app": "x", "istio.io/dataplane-mode": "ambient"}) == []
    problems = label_errors({"a b": "x", "ok": "b=c"})
    assert len(problems) == 2
