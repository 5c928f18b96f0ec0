"""The cluster DNS's names, from the API's Services and the ready pods, and its answers (pure).

Names, as CoreDNS's kubernetes plugin serves them (TTL 5 s):
- `<svc>.<ns>.svc.<domain>`: A = the ClusterIP; for a headless Service, one A per ready
  endpoint (the selected Running+Ready pods, or a selector-less Service's Endpoints);
- `<a-b-c-d>.<svc>.<ns>.svc.<domain>`: a headless Service's endpoint by its address;
- `_<port>._<proto>.<svc>.<ns>.svc.<domain>`: SRV per named port (the Service's name for
  a ClusterIP, each endpoint's name for a headless one);
- `<a-b-c-d>.<ns>.pod.<domain>`: A = that address (CoreDNS's "pods insecure": not checked
  against the pods).

Answers: a name above with another type (AAAA among them), or a name that only has names
below it (`<ns>.svc.<domain>`), is NOERROR with no record; any other name of the domain is
NXDOMAIN; a name outside the domain, or a class other than IN, is REFUSED (there is no
upstream: nothing leaves the machine).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import AddressValueError, IPv4Address

from localcluster.kube.podplan import ServiceInfo
from localcluster.kube.proxyplan import Endpoint, ListedEndpoints, selects
from ztunnel.dns import message as m

TTL = 5
CLASS_ANY = 255


@dataclass(frozen=True, slots=True)
class Srv:
    port: int
    target: str  # a name of the zone, lower case, no trailing dot


@dataclass(frozen=True, slots=True)
class Zone:
    domain: str
    addresses: Mapping[str, tuple[IPv4Address, ...]]
    services: Mapping[str, tuple[Srv, ...]]
    names: frozenset[str]  # every name that exists, with every suffix of it in the domain


def _dashed(ip: str) -> str:
    return ip.replace(".", "-")


def _ipv4(text: str) -> IPv4Address | None:
    try:
        return IPv4Address(text)
    except (AddressValueError, ValueError):
        return None


def build_zone(
    domain: str,
    services: Sequence[ServiceInfo],
    pods: Sequence[Endpoint],
    listed: Sequence[ListedEndpoints] = (),
) -> Zone:
    """The zone of `domain` for these Services; `pods` are the ready endpoints (see
    `proxyplan.endpoint_of`), `listed` the Endpoints objects of selector-less Services."""
    addresses: dict[str, list[IPv4Address]] = {}
    srv: dict[str, list[Srv]] = {}
    by_name = {(e.namespace, e.name): e for e in listed}
    for svc in services:
        base = f"{svc.name}.{svc.namespace}.svc.{domain}".lower()
        if svc.has_vip:
            ip = _ipv4(svc.cluster_ip)
            addresses.setdefault(base, [])
            if ip is not None:
                addresses[base].append(ip)
            for port in svc.ports:
                if port.name:
                    owner = f"_{port.name}._{port.protocol.lower()}.{base}".lower()
                    srv.setdefault(owner, []).append(Srv(port.port, base))
            continue
        # Headless: the endpoints themselves, each with a name of its own.
        members: list[tuple[IPv4Address, Mapping[str, int]]] = []
        own = by_name.get((svc.namespace, svc.name)) if not svc.selector else None
        if own is not None:
            for ips, ports in own.subsets:
                numbers = {name: number for name, number, _ in ports}
                members += [(a, numbers) for ip in ips if (a := _ipv4(ip)) is not None]
        else:
            for ep in pods:
                if selects(svc, ep) and (a := _ipv4(ep.ip)) is not None:
                    members.append((a, dict(ep.ports)))
        addresses.setdefault(base, [])
        for ip, named in sorted(members, key=lambda x: x[0]):
            if ip not in addresses[base]:
                addresses[base].append(ip)
            host = f"{_dashed(str(ip))}.{base}"
            addresses[host] = [ip]
            for port in svc.ports:
                if not port.name:
                    continue
                target = _target(port.target_port, port.port, named)
                if target is not None:
                    owner = f"_{port.name}._{port.protocol.lower()}.{base}".lower()
                    srv.setdefault(owner, []).append(Srv(target, host))
    names = set(_suffixes(domain, [*addresses, *srv]))
    names.add(domain.lower())
    names.update(f"{label}.{domain}".lower() for label in ("svc", "pod"))
    return Zone(
        domain=domain.lower(),
        addresses={k: tuple(v) for k, v in addresses.items()},
        services={k: tuple(v) for k, v in srv.items()},
        names=frozenset(names),
    )


def _target(target: int | str, port: int, named: Mapping[str, int]) -> int | None:
    if isinstance(target, int):
        return target
    if target.isdigit():
        return int(target)
    return named.get(target, port if not target else None)


def _suffixes(domain: str, names: Iterable[str]) -> Iterable[str]:
    tail = "." + domain.lower()
    for name in names:
        while name.endswith(tail):
            yield name
            name = name.split(".", 1)[1]


def _wire_name(text: str) -> bytes:
    """A name uncompressed (an SRV target must not be compressed: RFC 2782)."""
    return b"".join(bytes([len(label)]) + label for label in m.name_labels(text)) + b"\x00"


def _srv(owner: m.Labels, s: Srv, weight: int) -> m.Record:
    rdata = struct.pack("!HHH", 0, weight, s.port) + _wire_name(s.target)
    return m.Record(owner, m.RType.SRV, TTL, rdata)


def _pod_address(labels: Sequence[str], domain_labels: int) -> IPv4Address | None:
    # <a-b-c-d>.<ns>.pod.<domain>
    if len(labels) != 3 + domain_labels or labels[2] != "pod":
        return None
    parts = labels[0].split("-")
    if len(parts) != 4 or not all(p.isdigit() and len(p) <= 3 for p in parts):
        return None
    return _ipv4(".".join(str(int(p)) for p in parts))


def answer(zone: Zone, question: m.Question) -> tuple[int, tuple[m.Record, ...]]:
    """The rcode and answer records for one question."""
    if question.qclass not in (m.CLASS_IN, CLASS_ANY):
        return m.Rcode.REFUSED, ()
    name = question.name  # lower case; odd bytes escaped, so they match no name of ours
    if name != zone.domain and not name.endswith("." + zone.domain):
        return m.Rcode.REFUSED, ()
    owner = question.labels
    qtype = question.qtype
    wants_a = qtype in (m.RType.A, m.RType.ANY)
    addresses = zone.addresses.get(name)
    if addresses is None:
        pod = _pod_address(name.split("."), zone.domain.count(".") + 1)
        if pod is not None:
            addresses = (pod,)
    if addresses is not None:
        records = tuple(m.a(owner, ip, TTL) for ip in addresses) if wants_a else ()
        return m.Rcode.NOERROR, records
    services = zone.services.get(name)
    if services is not None:
        if qtype not in (m.RType.SRV, m.RType.ANY):
            return m.Rcode.NOERROR, ()
        weight = max(1, 100 // len(services))
        return m.Rcode.NOERROR, tuple(_srv(owner, s, weight) for s in services)
    if name in zone.names:
        return m.Rcode.NOERROR, ()
    return m.Rcode.NXDOMAIN, ()


def respond(zone: Zone, data: bytes, udp: bool) -> bytes | None:
    """The answer to one message as it came off the wire, or None to drop it.

    Malformed: FORMERR when there is a header to answer (`message.build_error`), else
    dropped; an answer sent to us is dropped; an opcode other than QUERY is NOTIMP. Over
    UDP an answer longer than the client takes is cut to its question with TC set."""
    try:
        query = m.parse_query(data)
    except m.DnsFormatError:
        return m.build_error(data, m.Rcode.FORMERR)
    limit = query.udp_limit() if udp else m.MAX_MESSAGE
    if query.opcode != 0:
        return m.build_response(query, m.Rcode.NOTIMP, authoritative=False, limit=limit)
    rcode, records = answer(zone, query.question)
    authoritative = rcode != m.Rcode.REFUSED
    return m.build_response(query, rcode, records, authoritative=authoritative, limit=limit)
