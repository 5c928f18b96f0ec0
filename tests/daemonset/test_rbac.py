"""The components' API rights (each chart's files/rbac.yaml): what the charts render, and
least privilege both ways: every call the code makes is allowed, and nothing is granted that
no call needs. The calls are taken from the code's own tables where it has them (the
controller's informers, the kinds whose status it writes)."""

from __future__ import annotations

from typing import Any

import pytest

from controlplane.admission import WEBHOOK_CONFIGURATION
from controlplane.controller import ISTIO_STATUS_KINDS, WATCHED
from kube import kinds
from kube.kinds import Kind
from localcluster.kube import meshrbac
from localcluster.kube.meshrbac import ComponentRbac, Rule
from tests.daemonset.conftest import NAMESPACE, render

HOME = NAMESPACE
ELSEWHERE = "apps"  # any namespace of the users'
Call = tuple[str, str, str, str | None, str | None]  # verb, group, resource, namespace, name


def calls(
    verbs: str, kind: Kind, namespace: str | None, name: str | None = None, sub: str = ""
) -> list[Call]:
    resource = f"{kind.plural}/{sub}" if sub else kind.plural
    return [(v, kind.group, resource, namespace, name) for v in verbs.split()]


def controlplane_calls() -> list[Call]:
    out: list[Call] = []
    # controller.py's informers, across namespaces; the waypoints' Deployments too.
    for kind in (*WATCHED.values(), kinds.DEPLOYMENT):
        out += calls("list watch", kind, None)
    # The waypoints' objects, server-side applied (a PATCH; creating needs create too).
    for kind in (kinds.SERVICE_ACCOUNT, kinds.SERVICE, kinds.DEPLOYMENT):
        out += calls("create patch", kind, ELSEWHERE)
    out += calls("create", kinds.EVENT, ELSEWHERE)
    # Statuses: the Istio kinds', the Gateway's and the routes'.
    for name in ISTIO_STATUS_KINDS:
        out += calls("patch", WATCHED[name], ELSEWHERE, sub="status")
    for kind in (kinds.GATEWAY, kinds.HTTP_ROUTE, kinds.GRPC_ROUTE):
        out += calls("patch", kind, ELSEWHERE, sub="status")
    # The CA: TokenReview, a caller's pod, a node's pods.
    out += calls("create", kinds.TOKEN_REVIEW, None)
    out += calls("get", kinds.POD, ELSEWHERE)
    # In-cluster mode: the root ConfigMap in every namespace, the CA Secret at home.
    out += calls("list watch", kinds.CONFIG_MAP, None)
    out += calls("create", kinds.CONFIG_MAP, ELSEWHERE)
    out += calls("update", kinds.CONFIG_MAP, ELSEWHERE, "istio-ca-root-cert")
    out += calls("create", kinds.SECRET, HOME)
    out += calls("get", kinds.SECRET, HOME, "istio-ca-secret")
    # In-cluster mode: the base chart's GatewayClass, reported Accepted.
    out += calls("get", kinds.GATEWAY_CLASS, None, "istio-waypoint")
    out += calls("patch", kinds.GATEWAY_CLASS, None, "istio-waypoint", sub="status")
    # The node-agent webhook's caBundle (admission.py publish_ca_bundle).
    out += calls("get patch", kinds.VALIDATING_WEBHOOK_CONFIGURATION, None, WEBHOOK_CONFIGURATION)
    return out


def node_agent_calls() -> list[Call]:
    out: list[Call] = []
    # redirect/kubesource.py: the node's pods and the namespaces; the pods' mark.
    out += calls("list watch", kinds.POD, None)
    out += calls("list watch", kinds.NAMESPACE, None)
    out += calls("patch", kinds.POD, ELSEWHERE, sub="status")
    # Its own Pod and DaemonSet, on SIGTERM.
    out += calls("get", kinds.POD, HOME)
    out += calls("get list watch", kinds.DAEMON_SET, HOME, "ambient-node-agent")
    return out


EXPECTED = {"controlplane": controlplane_calls, "node-agent": node_agent_calls}

# Calls that must be refused: what a careless role would allow.
REFUSED: dict[str, list[Call]] = {
    "controlplane": [
        *calls("get list", kinds.SECRET, ELSEWHERE),
        *calls("get update", kinds.SECRET, HOME, "some-other-secret"),
        *calls("update delete", kinds.SECRET, HOME, "istio-ca-secret"),
        *calls("get", kinds.CONFIG_MAP, ELSEWHERE, "istio-ca-root-cert"),
        *calls("list", kinds.SECRET, HOME),
        *calls("update", kinds.CONFIG_MAP, ELSEWHERE, "someone-elses-config"),
        *calls("create patch", kinds.CRD, None),
        *calls("create patch", kinds.GATEWAY_CLASS, None),
        *calls("get", kinds.GATEWAY_CLASS, None, "someone-elses-class"),
        *calls("delete", kinds.POD, ELSEWHERE),
        *calls("patch", kinds.GATEWAY, ELSEWHERE),
        *calls("create", kinds.VALIDATING_WEBHOOK_CONFIGURATION, None),
        *calls("patch", kinds.VALIDATING_WEBHOOK_CONFIGURATION, None, "someone-elses-webhook"),
    ],
    "node-agent": [
        *calls("get", kinds.POD, ELSEWHERE),
        *calls("get", kinds.DAEMON_SET, HOME, "ztunnel"),
        *calls("get", kinds.DAEMON_SET, ELSEWHERE, "ambient-node-agent"),
        *calls("update delete patch", kinds.POD, ELSEWHERE),
        *calls("update", kinds.POD, ELSEWHERE, sub="status"),
        *calls("get list", kinds.SECRET, HOME),
        *calls("list", kinds.NODE, None),
    ],
}


def allowed(rbac: ComponentRbac, call: Call) -> bool:
    verb, group, resource, namespace, name = call
    return rbac.allows(verb, group, resource, namespace=namespace, home=HOME, name=name)


def granted_and_needed(rbac: ComponentRbac, expected: list[Call]) -> tuple[set[Any], set[Any]]:
    """(verb, group, resource, name) granted by the rules, and needed by the calls."""
    granted = {g for r in (*rbac.cluster, *rbac.namespaced) for g in r.grants()}
    needed = {(v, g, r, n) for v, g, r, _, n in expected}
    return granted, needed


@pytest.mark.parametrize("chart", meshrbac.CHARTS_WITH_RBAC)
def test_every_call_the_code_makes_is_allowed(chart):
    rbac = meshrbac.load(chart)
    assert [c for c in EXPECTED[chart]() if not allowed(rbac, c)] == []


@pytest.mark.parametrize("chart", meshrbac.CHARTS_WITH_RBAC)
def test_nothing_is_granted_that_no_call_needs(chart):
    granted, needed = granted_and_needed(meshrbac.load(chart), EXPECTED[chart]())
    assert granted - needed == set()


@pytest.mark.parametrize("chart", meshrbac.CHARTS_WITH_RBAC)
def test_careless_calls_are_refused(chart):
    rbac = meshrbac.load(chart)
    assert [c for c in REFUSED[chart] if allowed(rbac, c)] == []


@pytest.mark.parametrize("chart", meshrbac.CHARTS_WITH_RBAC)
def test_no_wildcards(chart):
    rbac = meshrbac.load(chart)
    for rule in (*rbac.cluster, *rbac.namespaced):
        assert "*" not in (*rule.verbs, *rule.api_groups, *rule.resources), rule


def test_the_checks_can_fail():
    """A role with one right too many, and one with one too few, are both caught."""
    rbac = meshrbac.load("node-agent")
    extra = Rule(("",), ("nodes",), ("get",))
    wider = ComponentRbac((*rbac.cluster, extra), rbac.namespaced)
    granted, needed = granted_and_needed(wider, node_agent_calls())
    assert granted - needed == {("get", "", "nodes", None)}
    narrower = ComponentRbac(rbac.cluster, ())
    assert [c for c in node_agent_calls() if not allowed(narrower, c)] == [
        ("get", "", "pods", HOME, None),
        ("get", "apps", "daemonsets", HOME, "ambient-node-agent"),
        ("list", "apps", "daemonsets", HOME, "ambient-node-agent"),
        ("watch", "apps", "daemonsets", HOME, "ambient-node-agent"),
    ]
    # resourceNames never allow a request without a name (a list, or a create).
    named = Rule(("",), ("secrets",), ("get", "list", "create"), ("istio-ca-secret",))
    assert named.allows("get", "", "secrets", "istio-ca-secret")
    assert not named.allows("list", "", "secrets")
    assert not named.allows("create", "", "secrets")


def test_rules_are_checked_as_they_are_read():
    with pytest.raises(ValueError, match="unknown keys"):
        meshrbac.parse("clusterRules:\n- apiGroups: ['']\n  resource: [pods]\n  verbs: [get]\n")
    with pytest.raises(ValueError, match="nothing else"):
        meshrbac.parse("rules: []\n")


@pytest.mark.usefixtures("helm_present")
@pytest.mark.parametrize("chart", meshrbac.CHARTS_WITH_RBAC)
def test_the_chart_renders_the_rules(chart):
    objs = render(chart)
    rbac = meshrbac.load(chart)
    (cluster_role,) = [o for o in objs if o["kind"] == "ClusterRole"]
    (role,) = [o for o in objs if o["kind"] == "Role"]
    assert meshrbac.rules_of(cluster_role["rules"]) == rbac.cluster
    assert meshrbac.rules_of(role["rules"]) == rbac.namespaced
    assert role["metadata"]["namespace"] == NAMESPACE


@pytest.mark.usefixtures("helm_present")
def test_the_tunnel_has_no_rights():
    objs = render("tunnel")
    assert not [o for o in objs if o["apiVersion"].startswith("rbac.authorization.k8s.io/")]
