"""Where a connection to a ServiceEntry's address goes (`outbound.decide`), as a table."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import pytest

from meshcore.discovery import parse_local_config
from meshcore.sockets import SocketAddr
from meshcore.state import MeshState
from ztunnel.proxy.outbound import Route, decide


def entry(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"ports": [{"number": 80, "name": "http", "targetPort": 8080}], **spec},
    }


STATE: MeshState = parse_local_config(
    json.dumps(
        {
            "workloads": [
                {"uid": "client", "name": "client", "namespace": "shop",
                 "workloadIps": ["10.244.1.9"], "protocol": "HBONE", "node": "n1"},
                {"uid": "db", "name": "db", "namespace": "shop",
                 "workloadIps": ["10.244.1.5"], "protocol": "HBONE", "node": "n1"},
            ],
            "resources": [
                entry("mesh", hosts=["db.internal"], resolution="STATIC",
                      endpoints=[{"address": "10.244.1.5"}]),
                entry("static", hosts=["static.example.org"], resolution="STATIC",
                      endpoints=[{"address": "192.0.2.7", "ports": {"http": 8443}}]),
                entry("byhost", hosts=["api.example.org"], resolution="DNS"),
                entry("byname", hosts=["alias.example.org"], resolution="DNS",
                      endpoints=[{"address": "real.example.net", "ports": {"http": 9000}}]),
                entry("none", hosts=["none.example.org"], resolution="NONE",
                      addresses=["10.60.0.1"]),
            ],
        }
    )
)  # fmt: skip
CLIENT = STATE.workload_by_uid("client")


def vip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    svc = STATE.service_by_hostname(host)
    assert svc is not None and svc.vips
    return svc.vips[0].ip


@pytest.mark.parametrize(
    ("host", "route", "target", "resolve"),
    [
        ("db.internal", Route.HBONE, "10.244.1.5:8080", None),  # a mesh pod: HBONE
        ("static.example.org", Route.PASSTHROUGH, "192.0.2.7:8443", None),
        ("api.example.org", Route.PASSTHROUGH, None, ("api.example.org", 8080)),
        ("alias.example.org", Route.PASSTHROUGH, None, ("real.example.net", 9000)),
    ],
)
def test_entry_addresses_route(
    host: str, route: Route, target: str | None, resolve: tuple[str, int] | None
) -> None:
    assert CLIENT is not None
    d = decide(STATE, CLIENT, SocketAddr(vip(host), 80))
    assert d.route is route
    assert d.service is not None and d.service.hostname == host
    assert d.resolve == resolve
    if target is not None:
        assert str(d.target) == target
    else:
        assert d.next_hop is None  # resolved when the connection is made


def test_resolution_none_goes_where_the_app_connected() -> None:
    assert CLIENT is not None
    d = decide(STATE, CLIENT, SocketAddr(vip("none.example.org"), 80))
    assert d.route is Route.PASSTHROUGH and str(d.next_hop) == "10.60.0.1:80"
    assert d.service is not None and d.service.hostname == "none.example.org"


def test_an_undeclared_port_of_a_dns_entry_is_refused() -> None:
    assert CLIENT is not None
    d = decide(STATE, CLIENT, SocketAddr(vip("api.example.org"), 81))
    assert d.route is Route.REFUSE and "has no port 81" in d.reason
