"""The tunnel's DNS codec checked against dnspython, the reference reading of the wire
format (a test dependency only: the tunnel never loads it)."""

from __future__ import annotations

import ipaddress
import subprocess
import sys

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rdatatype
from hypothesis import given, settings
from hypothesis import strategies as st

from ztunnel.dns import message as m

label = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=20)
names = st.lists(label, min_size=1, max_size=5).map(".".join)
qtypes = st.sampled_from(["A", "AAAA", "MX", "TXT", "SRV", "CNAME"])


@settings(max_examples=200, deadline=None)
@given(names, qtypes, st.sampled_from([None, 512, 1232, 4096]), st.integers(0, 0xFFFF))
def test_queries_written_by_dnspython_parse_alike(
    name: str, qtype: str, edns: int | None, ident: int
) -> None:
    q = dns.message.make_query(
        name, qtype, use_edns=edns is not None, payload=edns or 512, id=ident
    )
    ours = m.parse_query(q.to_wire())
    assert ours.id == ident
    assert ours.question.name == name
    assert ours.question.qtype == dns.rdatatype.from_text(qtype)
    assert ours.edns_size == edns
    assert ours.recursion_desired


@settings(max_examples=200, deadline=None)
@given(names, names, st.lists(st.integers(1, 2**32 - 2), max_size=40), st.booleans())
def test_answers_we_build_read_back_in_dnspython(
    asked: str, meant: str, ips: list[int], edns: bool
) -> None:
    query = m.parse_query(
        dns.message.make_query(asked, "A", use_edns=edns, payload=1232, id=77).to_wire()
    )
    records = (
        m.cname(query.question.labels, m.name_labels(meant), 30),
        *(m.a(m.name_labels(meant), ipaddress.IPv4Address(ip), 30) for ip in ips),
    )
    wire = m.build_response(query, m.Rcode.NOERROR, records, limit=query.udp_limit())
    assert len(wire) <= query.udp_limit()
    msg = dns.message.from_wire(wire)
    assert msg.id == 77 and msg.rcode() == 0
    assert msg.question[0].name == dns.name.from_text(asked)
    assert (msg.edns >= 0) == edns
    if msg.flags & dns.flags.TC:
        assert msg.answer == []
        return
    assert msg.flags & dns.flags.AA
    got: list[str] = []
    for rrset in msg.answer:
        got += [
            f"{rrset.name.to_text(True)} {dns.rdatatype.to_text(rrset.rdtype)} {r}" for r in rrset
        ]
    want = [f"{asked} CNAME {meant}."]
    want += [f"{meant} A {ipaddress.IPv4Address(ip)}" for ip in dict.fromkeys(ips)]
    assert sorted(got) == sorted(want)


@settings(max_examples=500, deadline=None)
@given(st.binary(min_size=12, max_size=300))
def test_what_we_accept_dnspython_reads_the_same(data: bytes) -> None:
    try:
        ours = m.parse_query(data)
    except m.DnsFormatError:
        return
    msg = dns.message.from_wire(data, question_only=True)
    assert msg.id == ours.id
    (question,) = msg.question
    assert [bytes(x).lower() for x in question.name.labels[:-1]] == [
        x.lower() for x in ours.question.labels
    ]
    assert question.rdtype == ours.question.qtype


def test_the_tunnel_does_not_load_dnspython() -> None:
    code = "import sys, ztunnel.__main__, ztunnel.dns.server; print('dns' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
