"""Which names the tunnel answers, as a table (upstream ztunnel's cases, our mesh)."""

from __future__ import annotations

import ipaddress

import pytest

from meshcore.state import MeshState, NetworkAddress
from tests.support.mesh import service, workload
from ztunnel.dns import message as m
from ztunnel.dns.resolve import Answer, Forward, aliases, decide

CLIENT = workload(name="client", namespace="ns1")
STATE = MeshState.build(
    [CLIENT],
    [
        service(
            name="productpage",
            namespace="ns1",
            vips=(NetworkAddress("", ipaddress.ip_address("10.96.0.9")),),
        ),
        service(
            name="example",
            namespace="ns2",
            vips=(NetworkAddress("", ipaddress.ip_address("10.96.0.10")),),
        ),
        service(name="headless", namespace="ns1", vips=()),
        service(
            name="far",
            namespace="ns1",
            vips=(NetworkAddress("other", ipaddress.ip_address("10.96.0.11")),),
        ),
        service(
            name="api",
            namespace="ns1",
            hostname="api.example.org",
            vips=(NetworkAddress("", ipaddress.ip_address("240.240.1.2")),),
        ),
        service(
            name="dual",
            namespace="ns1",
            vips=(
                NetworkAddress("", ipaddress.ip_address("10.96.0.12")),
                NetworkAddress("", ipaddress.ip_address("fd00::12")),
            ),
        ),
    ],
    [],
)


def ask(name: str, qtype: int = m.RType.A, qclass: int = m.CLASS_IN) -> Answer | Forward:
    return decide(STATE, CLIENT, m.Question(m.name_labels(name), qtype, qclass))


def text(answer: Answer | Forward) -> list[str]:
    assert isinstance(answer, Answer), answer
    out = []
    for r in answer.records:
        if r.rtype == m.RType.CNAME:
            assert r.rdata_name is not None
            out.append(f"{m.name_text(r.labels)} CNAME {m.name_text(r.rdata_name)}")
        else:
            out.append(
                f"{m.name_text(r.labels)} {m.RType(r.rtype).name} {ipaddress.ip_address(r.rdata)}"
            )
    return out


@pytest.mark.parametrize(
    ("name", "qtype", "expected"),
    [
        (
            "productpage.ns1.svc.cluster.local",
            m.RType.A,
            ["productpage.ns1.svc.cluster.local A 10.96.0.9"],
        ),
        ("productpage.ns1.svc", m.RType.A, ["productpage.ns1.svc A 10.96.0.9"]),
        ("productpage.ns1", m.RType.A, ["productpage.ns1 A 10.96.0.9"]),
        ("productpage", m.RType.A, ["productpage A 10.96.0.9"]),
        ("PRODUCTPAGE", m.RType.A, ["productpage A 10.96.0.9"]),  # names are case-blind
        # The client's stub appended a search domain: CNAME to the name meant, then A.
        (
            "productpage.ns1.ns1.svc.cluster.local",
            m.RType.A,
            [
                "productpage.ns1.ns1.svc.cluster.local CNAME productpage.ns1",
                "productpage.ns1 A 10.96.0.9",
            ],
        ),
        ("example.ns2", m.RType.A, ["example.ns2 A 10.96.0.10"]),
        (
            "example.ns2.svc.cluster.local",
            m.RType.A,
            ["example.ns2.svc.cluster.local A 10.96.0.10"],
        ),
        # ServiceEntry host, also through the search path.
        ("api.example.org", m.RType.A, ["api.example.org A 240.240.1.2"]),
        (
            "api.example.org.ns1.svc.cluster.local",
            m.RType.A,
            [
                "api.example.org.ns1.svc.cluster.local CNAME api.example.org",
                "api.example.org A 240.240.1.2",
            ],
        ),
        (
            "api.example.org.cluster.local",
            m.RType.A,
            [
                "api.example.org.cluster.local CNAME api.example.org",
                "api.example.org A 240.240.1.2",
            ],
        ),
        # AAAA of an IPv4-only host: no records, but ours (NOERROR), with no dangling CNAME.
        ("productpage", m.RType.AAAA, []),
        ("productpage.ns1.ns1.svc.cluster.local", m.RType.AAAA, []),
        ("dual", m.RType.AAAA, ["dual AAAA fd00::12"]),
        ("dual", m.RType.A, ["dual A 10.96.0.12"]),
    ],
)
def test_answered(name: str, qtype: int, expected: list[str]) -> None:
    answer = ask(name, qtype)
    assert text(answer) == expected
    assert isinstance(answer, Answer)


@pytest.mark.parametrize(
    ("name", "qtype", "qclass", "why"),
    [
        ("example", m.RType.A, m.CLASS_IN, "not a service host"),  # another namespace's short name
        ("www.example.com", m.RType.A, m.CLASS_IN, "not a service host"),
        ("headless.ns1", m.RType.A, m.CLASS_IN, "not a service host"),  # no VIP: upstream's
        ("far.ns1", m.RType.A, m.CLASS_IN, "not a service host"),  # VIP on another network
        ("productpage.ns1", m.RType.MX, m.CLASS_IN, "record type 15"),
        ("productpage.ns1", m.RType.A, 3, "class 3"),
        ("productpage.ns1.svc.cluster", m.RType.A, m.CLASS_IN, "not a service host"),
    ],
)
def test_forwarded(name: str, qtype: int, qclass: int, why: str) -> None:
    answer = ask(name, qtype, qclass)
    assert isinstance(answer, Forward) and why in answer.reason


def test_aliases_in_order() -> None:
    got = [
        (m.name_text(a.labels), a.stripped is not None)
        for a in aliases(m.name_labels("x.ns2"), "ns1")
    ]
    assert got == [("x.ns2", False), ("x.ns2.svc.cluster.local", False)]
    got = [
        (m.name_text(a.labels), a.stripped is not None)
        for a in aliases(m.name_labels("x.ns1.svc.cluster.local"), "ns1")
    ]
    assert got == [
        ("x.ns1.svc.cluster.local", False),
        ("x", True),  # ns1.svc.cluster.local stripped; its expansion is the name itself
        ("x.ns1", True),  # svc.cluster.local stripped
        ("x.ns1.svc", True),  # cluster.local stripped
    ]
