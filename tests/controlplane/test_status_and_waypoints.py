"""Statuses (pure) and the waypoint objects the control plane owns (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from controlplane import status as st
from controlplane import waypoints as wp
from tests.controlplane.kubeobjects import waypoint_gateway
from waypoint.config import parse_config
from waypoint.routes.status import Condition

T0, T1 = "2026-01-01T00:00:00Z", "2026-01-01T00:01:00Z"


def test_merged_keeps_the_transition_time_while_the_status_holds() -> None:
    first = st.merged(None, [st.condition("Accepted", True, "Accepted", "", 1)], T0)
    again = st.merged(first, [st.condition("Accepted", True, "Accepted", "", 1)], T1)
    flipped = st.merged(again, [st.condition("Accepted", False, "Invalid", "x", 1)], T1)
    assert first[0]["lastTransitionTime"] == T0
    assert again[0]["lastTransitionTime"] == T0
    assert flipped[0]["lastTransitionTime"] == T1
    assert st.same({"conditions": first}, {"conditions": again})
    assert not st.same({"conditions": again}, {"conditions": flipped})


def _gw(**labels: str) -> wp.WaypointGateway:
    return wp.read_gateway(waypoint_gateway("shop", **labels))


@pytest.mark.parametrize(
    ("gateway", "vip", "ready", "accepted", "programmed"),
    [
        (_gw(), "/10.96.0.9", 1, ("True", "Accepted"), ("True", "Programmed")),
        (_gw(), "/10.96.0.9", 0, ("True", "Accepted"), ("False", "Pending")),
        (_gw(), None, 1, ("True", "Accepted"), ("False", "AddressNotAssigned")),
        (
            _gw(**{"istio.io/waypoint-for": "nope"}),
            None,
            0,
            ("False", "Invalid"),
            ("False", "Invalid"),
        ),
    ],
)
def test_gateway_status(
    gateway: wp.WaypointGateway,
    vip: str | None,
    ready: int,
    accepted: tuple[str, str],
    programmed: tuple[str, str],
) -> None:
    out = st.gateway_status(gateway, vip, "waypoint.shop.svc.cluster.local", ready, None, T0)
    got = {c["type"]: (c["status"], c["reason"]) for c in out["conditions"]}
    assert got == {"Accepted": accepted, "Programmed": programmed}
    if vip is None:
        assert "addresses" not in out
    else:
        assert out["addresses"][0] == {"type": "IPAddress", "value": "10.96.0.9"}


def test_a_gateway_without_an_hbone_listener_is_not_a_usable_waypoint() -> None:
    doc = waypoint_gateway("shop")
    doc["spec"]["listeners"] = [{"name": "http", "port": 80, "protocol": "HTTP"}]
    assert "HBONE" in (wp.read_gateway(doc).problem or "")


def _route(parents: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "kind": "HTTPRoute",
        "metadata": {"name": "r", "namespace": "shop", "generation": 3},
        "spec": {"parentRefs": parents},
    }


def test_route_status_has_one_entry_per_parent_with_its_own_conditions() -> None:
    route = _route(
        [
            {"kind": "Service", "group": "", "name": "a", "port": 80},
            {"kind": "Service", "group": "", "name": "b"},
        ]
    )
    conditions = [
        Condition("Accepted", True, "Accepted", parent="Service shop/a:80"),
        Condition(
            "Accepted", False, "NoMatchingParent", "no Service shop/b", parent="Service shop/b"
        ),
    ]
    out = st.route_status(route, conditions, None, T0)
    a, b = out["parents"]
    assert a["parentRef"]["name"] == "a" and a["controllerName"] == st.MESH_CONTROLLER
    assert [(c["type"], c["status"], c["observedGeneration"]) for c in a["conditions"]] == [
        ("Accepted", "True", 3)
    ]
    assert b["conditions"][0]["reason"] == "NoMatchingParent"


def test_a_route_that_does_not_parse_reports_on_every_parent() -> None:
    route = _route([{"kind": "Service", "name": "a"}, {"name": "waypoint"}])
    bad = [Condition("Accepted", False, "UnsupportedValue", "spec.rules: bad")]
    out = st.route_status(route, bad, None, T0)
    assert [p["conditions"][0]["reason"] for p in out["parents"]] == ["UnsupportedValue"] * 2
    assert out["parents"][1]["controllerName"] == st.WAYPOINT_CONTROLLER


def test_the_deployment_gives_the_waypoint_every_setting_it_requires() -> None:
    gw = wp.read_gateway(
        {
            **waypoint_gateway("shop"),
            "metadata": {"name": "waypoint", "namespace": "shop", "uid": "u1"},
        }
    )
    dep = wp.deployment(gw, wp.WaypointTemplate())
    pod_spec = dep["spec"]["template"]["spec"]
    (container,) = pod_spec["containers"]
    field_values = {
        "metadata.namespace": "shop",
        "spec.nodeName": "node1",
        "status.podIP": "10.1.0.9",
        "spec.serviceAccountName": "waypoint",
    }
    env = {
        e["name"]: e["value"]
        if "value" in e
        else field_values[e["valueFrom"]["fieldRef"]["fieldPath"]]
        for e in container["env"]
    }
    cfg = parse_config(env)  # the waypoint's own parser accepts it
    assert (cfg.name, cfg.namespace, cfg.account, str(cfg.pod_ip)) == (
        "waypoint",
        "shop",
        "waypoint",
        "10.1.0.9",
    )
    assert pod_spec["serviceAccountName"] == wp.service_account(gw)["metadata"]["name"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert labels[wp.GATEWAY_NAME_LABEL] == "waypoint"
    assert labels[wp.DATAPLANE_MODE_LABEL] == "none"
    svc = wp.service(gw)
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    for obj in (dep, svc, wp.service_account(gw)):
        assert obj["metadata"]["ownerReferences"][0]["uid"] == "u1"
