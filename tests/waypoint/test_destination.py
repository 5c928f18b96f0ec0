"""Which CONNECTs a waypoint serves: a binding may name it by its Service's hostname, by one
of its pod IPs, or by its Service's VIP (what istiod, and our control plane on Kubernetes,
write when the waypoint Service has a ClusterIP)."""

from __future__ import annotations

import json

import pytest

from meshcore.discovery import parse_local_config
from meshcore.state import MeshState
from waypoint.destination import Destination, Me, Refused, parse_authority, resolve

WAYPOINT_KEY = "travel/waypoint.travel.svc.cluster.local"


def state(binding: dict[str, object]) -> MeshState:
    doc = {
        "services": [
            {
                "name": "waypoint",
                "namespace": "travel",
                "hostname": "waypoint.travel.svc.cluster.local",
                "vips": ["/10.96.0.50"],
                "ports": {"15008": {"name": "mesh", "targetPort": 15008}},
            },
            {
                "name": "flights",
                "namespace": "travel",
                "hostname": "flights.travel.svc.cluster.local",
                "vips": ["/10.96.0.60"],
                "ports": {"80": {"name": "http", "targetPort": 8080}},
                "waypoint": binding,
            },
        ]
    }
    return parse_local_config(json.dumps(doc))


ME = Me(WAYPOINT_KEY, frozenset({"10.244.1.13"}))


@pytest.mark.parametrize(
    ("binding", "served"),
    [
        ({"hostname": WAYPOINT_KEY}, True),
        ({"address": "/10.244.1.13"}, True),  # the pod's own IP
        ({"address": "/10.96.0.50"}, True),  # its Service's VIP
        ({"hostname": "travel/other.travel.svc.cluster.local"}, False),
        ({"address": "/10.96.0.99"}, False),  # another address
        ({"address": "/10.96.0.60"}, False),  # a VIP, but of a service that is not ours
    ],
)
def test_a_binding_names_this_waypoint(binding: dict[str, object], served: bool) -> None:
    got = resolve(state(binding), "", ME, "10.96.0.60:80")
    if served:
        assert isinstance(got, Destination) and got.service is not None
        assert got.service.name == "flights"
    else:
        assert isinstance(got, Refused) and got.status == 403


@pytest.mark.parametrize(
    ("authority", "parsed"),
    [
        ("10.0.0.2:8080", ("10.0.0.2", 8080)),
        ("[fd00::2]:80", ("fd00::2", 80)),
        ("10.0.0.2:00080", ("10.0.0.2", 80)),
        # Found by fuzz/targets/connect_headers.py: "²" (latin-1 0xb2) is a digit to
        # str.isdigit() but not to int(), and int() refuses more than 4300 digits.
        ("10.0.0.2:8\u00b2", None),
        ("10.0.0.2:" + "9" * 5000, None),
        ("10.0.0.2:" + "0" * 5000, None),
        ("10.0.0.2:65536", None),
        ("flights:80", None),
    ],
)
def test_parse_authority_refuses_what_is_not_ip_port(authority, parsed):
    assert parse_authority(authority) == parsed
