"""A cluster file's per-tunnel settings: `certificates.ttlSeconds` and `tunnel.workers`,
parsed, bounded, and carried to the tunnels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from localcluster.spec import SpecError, parse_cluster

BASE = """
name: c
nodes: [{name: n1}]
namespaces: [{name: shop, labels: {istio.io/dataplane-mode: ambient}}]
pods: [{name: a, namespace: shop, node: n1, command: ["true"]}]
"""


def spec_with(**extra: Any) -> Any:
    doc = yaml.safe_load(BASE)
    doc.update(extra)
    return parse_cluster(yaml.safe_dump(doc), Path("/srv"))


def test_lifetime_defaults_to_the_tunnels_own() -> None:
    assert spec_with().cert_ttl_seconds is None
    assert spec_with(certificates={}).cert_ttl_seconds is None


def test_lifetime_is_read() -> None:
    assert spec_with(certificates={"ttlSeconds": 60}).cert_ttl_seconds == 60


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"ttlSeconds": 4}, r"certificates.ttlSeconds: 4 is not in 5..604800"),
        ({"ttlSeconds": 604801}, "is not in 5..604800"),
        ({"ttlSeconds": "60"}, "expected a whole number of seconds"),
        ({"ttlSeconds": True}, "expected a whole number of seconds"),
        ({"ttl": 60}, "ttl"),
        ("60", "certificates"),
    ],
)
def test_bad_lifetimes_are_refused(value: Any, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        spec_with(certificates=value)


# `tunnel.workers`: each tunnel's processes (TUNNEL_WORKERS), beside its certificates'
# lifetime as the other per-tunnel setting of a cluster file.


def test_tunnel_workers_default_to_the_tunnels_own_choice() -> None:
    assert spec_with().tunnel_workers is None
    assert spec_with(tunnel={}).tunnel_workers is None
    assert spec_with(tunnel={"workers": 2}).tunnel_workers == 2


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"workers": 0}, r"tunnel.workers: 0 is not in 1..64"),
        ({"workers": "2"}, "expected a whole number of processes"),
        ({"threads": 2}, "threads"),
    ],
)
def test_bad_tunnel_workers_are_refused(value: Any, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        spec_with(tunnel=value)
