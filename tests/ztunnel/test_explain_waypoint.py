"""`explain` with waypoints: which waypoint, why (service or workload binding), the
authority sent, a refusal or a fail-open, and why a waypoint is *not* used."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from meshcore.defaults import ROOT_NAMESPACE
from meshcore.policy.index import PolicyIndex
from meshcore.state import GatewayAddress, HealthStatus, MeshState, Service, Workload
from tests.support.mesh import (
    CLIENT_POD,
    WEB_SERVICE,
    ips,
    mesh_state,
    ports,
    serves,
    service,
    vips,
    web_pod,
    workload,
)
from ztunnel.explain import explain

WP_SVC = service(
    name="waypoint", namespace="shop", vips=vips("10.96.0.99"), ports=ports({15008: 15008})
)
WP_ADDR = GatewayAddress(hostname="shop/waypoint.shop.svc.cluster.local")
WP_0 = workload(
    name="waypoint-0",
    namespace="shop",
    service_account="waypoint",
    ips=ips("10.244.1.99"),
    services=serves((WP_SVC, {})),
)
WEB = replace(WEB_SERVICE, waypoint=WP_ADDR)
WEB_0 = web_pod("web-0", "10.244.2.20")
BOUND_0 = replace(WEB_0, waypoint=WP_ADDR)
WP_NAME = "shop/waypoint.shop.svc.cluster.local"
WEB_KEY = "shop/web.shop.svc.cluster.local"


def run(
    workloads: tuple[Workload, ...], services: tuple[Service, ...], dst: str, src: str = "client-0"
) -> dict[str, Any]:
    state: MeshState = mesh_state((CLIENT_POD, *workloads), services)
    return explain(state, PolicyIndex.build(state, ROOT_NAMESPACE), f"shop/{src}", dst)


def hop(binding: str, bound: str, status: str, **kw: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": WP_NAME,
        "hostname": WP_NAME,
        "address": None,
        "hbonePort": 15008,
        "failOpen": False,
        "binding": binding,
        "bound": bound,
        "status": status,
        "problem": None,
        "authority": None,
    }
    return {**out, **kw}


@pytest.mark.parametrize(
    ("workloads", "services", "dst", "route", "waypoint", "reason_has"),
    [
        pytest.param(
            (WP_0, WEB_0),
            (WEB, WP_SVC),
            "web:80",
            "HBONE",
            hop("service", f"service {WEB_KEY}", "used", authority="10.96.0.20:80"),
            f"through waypoint {WP_NAME} (service {WEB_KEY} is bound to it)",
            id="service binding: used, the VIP as authority",
        ),
        pytest.param(
            (WP_0, BOUND_0),
            (WEB_SERVICE, WP_SVC),
            "10.244.2.20:8080",
            "HBONE",
            hop("workload", "workload shop/web-0", "used", authority="10.244.2.20:8080"),
            "(workload shop/web-0 is bound to it)",
            id="workload binding: used, the pod address as authority",
        ),
        pytest.param(
            (replace(WP_0, status=HealthStatus.UNHEALTHY), WEB_0),
            (WEB, WP_SVC),
            "web:80",
            "REFUSE",
            hop("service", f"service {WEB_KEY}", "refused", problem="not ready"),
            f"waypoint {WP_NAME} of service {WEB_KEY} is not ready; refused (fail closed)",
            id="not ready: refused",
        ),
        pytest.param(
            (WEB_0,),
            (replace(WEB, waypoint=replace(WP_ADDR, fail_open=True)),),
            "web:80",
            "HBONE",
            hop("service", f"service {WEB_KEY}", "failed-open", problem="missing", failOpen=True),
            "is missing; failOpen is set, so straight to the destination",
            id="missing with failOpen: direct, and says so",
        ),
        pytest.param(
            (WP_0, BOUND_0),
            (WEB_SERVICE, WP_SVC),
            "web:80",
            "HBONE",
            None,
            f"service {WEB_KEY} is not bound to a waypoint",
            id="pod bound, service not: the VIP goes direct, and why",
        ),
        pytest.param(
            (WP_0, WEB_0),
            (WEB, WP_SVC),
            "10.244.2.20:8080",
            "HBONE",
            None,
            "workload shop/web-0 is not bound to a waypoint",
            id="service bound, pod not: the pod IP goes direct, and why",
        ),
    ],
)
def test_the_waypoint_hop_is_explained(
    workloads: tuple[Workload, ...],
    services: tuple[Service, ...],
    dst: str,
    route: str,
    waypoint: dict[str, Any] | None,
    reason_has: str,
) -> None:
    got = run(workloads, services, dst)
    assert got["route"] == route
    assert got["waypoint"] == waypoint
    assert reason_has in got["waypoint_reason"]


def test_a_waypoint_endpoint_is_dialled_over_hbone_with_the_original_authority() -> None:
    got = run((WP_0, WEB_0), (WEB, WP_SVC), "web:80")
    assert got["selection"] == "the only endpoint"
    assert got["endpoints"] == [
        {
            "workload": "shop/waypoint-0",
            "ip": "10.244.1.99",
            "port": 15008,
            "hbone": "10.244.1.99:15008",
            "identity": "spiffe://cluster.local/ns/shop/sa/waypoint",
            "node": "node1",
            "healthy": True,
            "route": "HBONE",
            "delivery": "hbone",
            "waypoint": True,
            "authority": "10.96.0.20:80",
        }
    ]


def test_behind_a_workload_binding_the_pod_sees_the_waypoint() -> None:
    got = run((WP_0, BOUND_0), (WEB_SERVICE, WP_SVC), "10.244.2.20:8080")
    (endpoint,) = got["endpoints"]
    assert endpoint["behind"]["workload"] == "shop/web-0"
    assert endpoint["behind"]["authorization"]["allowed"] is True


def test_the_waypoint_own_leg_goes_direct_and_is_let_in_a_client_is_refused() -> None:
    got = run((WP_0, BOUND_0), (WEB_SERVICE, WP_SVC), "10.244.2.20:8080", src="waypoint-0")
    assert got["waypoint"] is None
    assert "is shop/web-0's waypoint" in got["waypoint_reason"]
    assert got["endpoints"][0]["authorization"]["allowed"] is True
    sneaky = replace(CLIENT_POD, uid="sneaky", name="sneaky", ips=ips("10.244.1.11"))
    state = mesh_state((CLIENT_POD, sneaky, BOUND_0), (WEB_SERVICE, WP_SVC))
    # The waypoint is missing (fail closed): the client is refused before anything is sent.
    got = explain(
        state, PolicyIndex.build(state, ROOT_NAMESPACE), "shop/sneaky", "10.244.2.20:8080"
    )
    assert got["route"] == "REFUSE"
    assert got["waypoint"]["problem"] == "missing"
