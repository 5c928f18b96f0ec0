"""A cluster file's `dns` and `serviceEntries`, and ServiceEntry through `apply -f` (pure)."""

from __future__ import annotations

import json
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
import yaml

from localcluster.mesh import _check_config
from localcluster.policies import PolicyError, check_batch
from localcluster.spec import DnsSpec, SpecError, parse_cluster
from localcluster.xds import local_xds
from meshcore.discovery import parse_local_config
from meshcore.serviceentry import ALLOCATION_RANGE

BASE = """
name: d
nodes: [{name: n1}]
namespaces: [{name: shop, labels: {istio.io/dataplane-mode: ambient}}]
pods: [{name: a, namespace: shop, node: n1, command: ["true"]}]
"""

ENTRY: dict[str, Any] = {
    "apiVersion": "networking.istio.io/v1",
    "kind": "ServiceEntry",
    "metadata": {"name": "api"},
    "spec": {
        "hosts": ["api.example.org"],
        "resolution": "DNS",
        "ports": [{"number": 443, "name": "tls"}],
    },
}


def spec_with(**extra: Any) -> Any:
    doc = yaml.safe_load(BASE)
    doc.update(extra)
    return parse_cluster(yaml.safe_dump(doc), Path("/srv"))


def test_dns_defaults_off() -> None:
    assert spec_with().dns == DnsSpec()


def test_dns_capture_with_nameservers() -> None:
    spec = spec_with(dns={"capture": True, "nameservers": ["10.244.1.53"]})
    assert spec.dns == DnsSpec(True, (IPv4Address("10.244.1.53"),))


@pytest.mark.parametrize(
    ("dns", "message"),
    [
        ({"capture": True}, "dns.nameservers: required when dns.capture is true"),
        ({"capture": "yes"}, "dns.capture: expected true or false"),
        ({"nameservers": ["fd00::1"]}, "is not IPv4"),
        ({"nameservers": ["x"]}, "'x' is not an IP address"),
        ({"nameservers": ["10.0.0.1"] * 4}, "at most 3"),
        ({"upstream": []}, "unknown field"),
    ],
)
def test_dns_refused(dns: Any, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        spec_with(dns=dns)


def test_service_entries_reach_the_mesh_config_with_kubectl_defaults() -> None:
    spec = spec_with(serviceEntries=[ENTRY])
    (doc,) = [json.loads(e) for e in spec.service_entries]
    assert doc["metadata"]["namespace"] == "default"
    state = parse_local_config(json.dumps(local_xds(spec)))
    svc = state.service_by_hostname("api.example.org")
    assert svc is not None and svc.vips[0].ip in ALLOCATION_RANGE


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({**ENTRY, "kind": "Service"}, "expected a ServiceEntry resource"),
        ({**ENTRY, "spec": {**ENTRY["spec"], "hosts": ["*.x.org"]}}, "wildcard"),
        ({**ENTRY, "spec": {**ENTRY["spec"], "exportTo": ["."]}}, "unknown field"),
    ],
)
def test_service_entries_refused(entry: Any, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        spec_with(serviceEntries=[entry])
    with pytest.raises(SpecError, match="duplicate ServiceEntry default/api"):
        spec_with(serviceEntries=[ENTRY, ENTRY])


def test_apply_takes_a_service_entry_as_a_resource() -> None:
    batch = check_batch([ENTRY], "f.yaml")
    assert [r.key for r in batch.resources] == [("ServiceEntry", "default", "api")]
    bad = {**ENTRY, "spec": {**ENTRY["spec"], "ports": []}}
    with pytest.raises(PolicyError, match="at least one port"):
        check_batch([bad], "f.yaml")


def test_an_entry_host_or_address_taken_by_a_service_is_refused() -> None:
    services = [{"name": "web", "namespace": "shop", "vip": "10.96.0.50", "selector": {},
                 "ports": [{"port": 80}]}]  # fmt: skip
    taken_host = {**ENTRY, "spec": {**ENTRY["spec"], "hosts": ["web.shop.svc.cluster.local"]}}
    with pytest.raises(SpecError, match="also Service shop/web's"):
        spec_with(services=services, serviceEntries=[taken_host])
    taken_vip = {**ENTRY, "spec": {**ENTRY["spec"], "addresses": ["10.96.0.50"]}}
    with pytest.raises(SpecError, match=r"address 10\.96\.0\.50 is also Service shop/web's"):
        spec_with(services=services, serviceEntries=[taken_vip])
    twice = {**ENTRY, "metadata": {"name": "other"}}
    with pytest.raises(SpecError, match=r"'api\.example\.org' is also ServiceEntry default/api's"):
        spec_with(serviceEntries=[ENTRY, twice])


def test_apply_refuses_an_entry_the_mesh_config_would_refuse() -> None:
    spec = spec_with(serviceEntries=[ENTRY])
    other = {**ENTRY, "metadata": {"name": "again", "namespace": "default"}}
    with pytest.raises(PolicyError, match=r"the mesh would refuse the result: .*api\.example\.org"):
        _check_config(spec, [], [other])
    _check_config(spec, [], [])  # the cluster file's own entries are fine
