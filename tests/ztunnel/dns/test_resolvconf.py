"""The upstream resolvers from a resolv.conf."""

from __future__ import annotations

import ipaddress

import pytest

from ztunnel.dns.resolvconf import ResolvConfError, nameservers


def test_nameservers_in_order_at_most_three() -> None:
    text = """# kubelet
search ns1.svc.cluster.local svc.cluster.local cluster.local
nameserver 10.96.0.10
nameserver fe80::1%eth0  ; a zone is dropped
nameserver 10.96.0.10
options ndots:5
nameserver 10.0.0.2
nameserver 10.0.0.3
"""
    assert nameservers(text) == tuple(
        ipaddress.ip_address(x) for x in ("10.96.0.10", "fe80::1", "10.0.0.2")
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [("", "no nameserver"), ("nameserver\n", "expected 'nameserver <ip>'"),
     ("nameserver dns.local\n", "not an IP address")],
)  # fmt: skip
def test_refused(text: str, message: str) -> None:
    with pytest.raises(ResolvConfError, match=message):
        nameservers(text)
