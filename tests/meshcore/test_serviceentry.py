"""ServiceEntry: the strict reader, the address allocation and the mesh config's view."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import pytest

from meshcore.discovery import MeshConfigError, parse_local_config
from meshcore.serviceentry import (
    ALLOCATION_RANGE,
    Resolution,
    ServiceEntryError,
    allocate,
    host_addresses,
    parse_service_entry,
    validate_service_entry,
)
from meshcore.state import TunnelProtocol


def entry(name: str = "api", namespace: str = "shop", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "hosts": ["api.example.org"],
        "ports": [{"number": 443, "name": "https", "protocol": "TLS"}],
    }
    body.update(spec)
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": {"name": name, "namespace": namespace},
        "spec": body,
    }


def test_reads_a_full_entry() -> None:
    e = parse_service_entry(
        entry(
            resolution="STATIC",
            location="MESH_INTERNAL",
            addresses=["10.50.0.1"],
            endpoints=[{"address": "10.0.0.7", "ports": {"https": 8443}, "labels": {"app": "x"}}],
        )
    )
    assert e.key == "shop/api" and e.hosts == ("api.example.org",)
    assert e.resolution is Resolution.STATIC and e.addresses == (ipaddress.ip_address("10.50.0.1"),)
    assert e.endpoints[0].target_port(e.ports[0]) == 8443
    assert not e.wants_allocation


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"hosts": []}, "at least one host"),
        ({"hosts": ["*.example.org"]}, "wildcard"),
        ({"hosts": ["Bad_Host"]}, "not a DNS name"),
        ({"hosts": ["a.org", "a.org"]}, "listed twice"),
        ({"ports": []}, "at least one port"),
        ({"ports": [{"number": 0, "name": "x"}]}, "not in 1..65535"),
        ({"ports": [{"number": 80}]}, "name: is required"),
        ({"ports": [{"number": 80, "name": "a"}, {"number": 80, "name": "b"}]}, "given twice"),
        ({"ports": [{"number": 80, "name": "a", "protocol": "QUIC"}]}, "expected one of"),
        ({"resolution": "dns"}, "expected one of NONE, STATIC, DNS"),
        ({"location": "OUTSIDE"}, "expected one of"),
        ({"addresses": ["10.0.0.0/24"]}, "CIDR"),
        ({"hosts": ["a.org", "b.org"], "addresses": ["10.0.0.1"]}, "cannot tell the hosts apart"),
        ({"endpoints": [{"address": "10.0.0.1"}]}, "need resolution STATIC or DNS"),
        ({"resolution": "STATIC", "endpoints": [{"address": "db.example.org"}]}, "not an IP"),
        (
            {"resolution": "STATIC", "endpoints": [{"address": "10.0.0.1", "ports": {"nope": 1}}]},
            "names no port",
        ),
        ({"workloadSelector": {"labels": {"a": "b"}}}, "unknown field"),
        ({"exportTo": ["."]}, "unknown field"),
    ],
)
def test_refuses_with_the_field(change: dict[str, Any], problem: str) -> None:
    doc = entry(**change)
    with pytest.raises(ServiceEntryError, match=problem):
        parse_service_entry(doc)
    assert problem.split(":")[0] in validate_service_entry(doc)[0]


def test_envelope_is_checked() -> None:
    doc = entry()
    doc["apiVersion"] = "networking.istio.io/v2"
    assert "apiVersion" in validate_service_entry(doc)[0]
    assert validate_service_entry(entry()) == []


def test_allocation_is_stable_distinct_and_in_range() -> None:
    hosts = [f"h{i}.example.org" for i in range(500)]
    first = allocate(hosts)
    assert len(set(first.values())) == 500
    assert all(ip in ALLOCATION_RANGE for ip in first.values())
    assert all(
        ip not in (ALLOCATION_RANGE.network_address, ALLOCATION_RANGE.broadcast_address)
        for ip in first.values()
    )
    # Same hosts in another order: same addresses. One more host: nobody else moves
    # unless it took their slot (then only it probes on).
    assert allocate(reversed(hosts)) == first
    more = allocate([*hosts, "new.example.org"])
    moved = [h for h in hosts if more[h] != first[h]]
    assert len(moved) <= 1
    # A taken address is skipped.
    taken = first["h0.example.org"]
    assert allocate(["h0.example.org"], [taken])["h0.example.org"] != taken


def test_allocation_follows_istio_rules() -> None:
    entries = [
        parse_service_entry(entry("a", hosts=["a.org"], resolution="DNS")),
        parse_service_entry(entry("b", hosts=["b.org"], resolution="NONE")),  # never allocated
        parse_service_entry(
            entry("c", hosts=["c.org"], resolution="STATIC", addresses=["10.9.9.9"])
        ),
    ]
    got = host_addresses(entries)
    assert got[("shop/a", "a.org")][0] in ALLOCATION_RANGE
    assert got[("shop/b", "b.org")] == ()
    assert got[("shop/c", "c.org")] == (ipaddress.ip_address("10.9.9.9"),)


CONFIG = {
    "workloads": [
        {
            "uid": "w1",
            "name": "db-0",
            "namespace": "shop",
            "workloadIps": ["10.244.1.5"],
            "protocol": "HBONE",
            "node": "n1",
        },
    ],
    "services": [],
}


def test_mesh_config_turns_entries_into_services_and_endpoints() -> None:
    doc = dict(CONFIG)
    doc["resources"] = [
        entry(
            "db",
            hosts=["db.internal"],
            resolution="STATIC",
            location="MESH_INTERNAL",
            ports=[{"number": 5432, "name": "tcp-pg", "targetPort": 15432}],
            endpoints=[
                {"address": "10.244.1.5"},
                {"address": "192.0.2.10", "ports": {"tcp-pg": 6432}},
            ],
        ),
        entry("ext", hosts=["api.example.org"], resolution="DNS"),
    ]
    state = parse_local_config(json.dumps(doc))
    db = state.service_by_hostname("db.internal")
    ext = state.service_by_hostname("api.example.org")
    assert db is not None and ext is not None
    assert db.key == "shop/db.internal" and db.vips[0].ip in ALLOCATION_RANGE
    assert db.port(5432) is not None and db.target_port(5432) == 15432
    assert ext.vips[0].ip in ALLOCATION_RANGE and ext.vips[0].ip != db.vips[0].ip
    # The mesh pod is an endpoint (reached over HBONE); the outside IP a plain one.
    eps = state.endpoints(db)
    assert [w.uid for w in eps] == ["ServiceEntry/shop/db/192.0.2.10", "w1"]
    outside = eps[0]
    assert outside.protocol is TunnelProtocol.NONE and outside.target_port(db.key, 5432) == 6432
    assert eps[1].protocol is TunnelProtocol.HBONE and eps[1].target_port(db.key, 5432) == 15432
    assert state.service_entry_of(db) is state.service_entries[0]
    assert state.endpoints(ext) == ()
    # The same document gives the same snapshot (every tunnel allocates alike).
    assert parse_local_config(json.dumps(doc)) == state


def test_mesh_config_refuses_a_bad_entry_naming_it() -> None:
    doc = dict(CONFIG)
    doc["resources"] = [entry(hosts=["*.x.org"])]
    with pytest.raises(MeshConfigError, match=r"resources\[0\]\.spec\.hosts\[0\]: .*wildcard"):
        parse_local_config(json.dumps(doc))
