"""Which names the tunnel answers itself, and with what. Pure: state and question in.

As upstream ztunnel's DNS server does: a name is tried under every alias a client in
namespace X could have meant by it, first the name itself, then its Kubernetes expansions
(`name` -> `name.X.svc.<domain>`, `name.ns` -> `name.ns.svc.<domain>`, `name.ns.svc` ->
`name.ns.svc.<domain>`), then the name with one of the pod's search domains stripped
(`X.svc.<domain>`, `svc.<domain>`, `<domain>`, the search path kubelet writes into a pod's
resolv.conf: a stub resolver appends them before asking) and that name's expansions. The
first alias that is a service hostname with a VIP on the client's network (a Kubernetes
Service, or a ServiceEntry host, allocated or written) wins:
- A: the VIPs, under the name asked for; when the match came from stripping a search
  domain, a CNAME from the name asked to the stripped name first, and the A records under
  it (so the client learns the name really meant);
- AAAA for a service without IPv6 VIPs: no records, NOERROR (the host exists; an
  NXDOMAIN would make the client give up on its A answer too);
- anything else (other types, other classes, unknown names, services without a VIP) is
  forwarded to the upstream resolver.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from meshcore.state import MeshState, Service, Workload
from ztunnel.dns.message import CLASS_IN, Labels, Question, Record, RType, a, aaaa, cname

DEFAULT_DOMAIN = "cluster.local"
TTL = 30  # seconds, upstream's: a VIP outlives the answer


@dataclass(frozen=True, slots=True)
class Answer:
    """We are the authority: these records (possibly none), NOERROR."""

    records: tuple[Record, ...]
    service: Service


@dataclass(frozen=True, slots=True)
class Forward:
    """Not ours to answer: relay the query to the upstream resolver."""

    reason: str


Decision = Answer | Forward


@dataclass(frozen=True, slots=True)
class _Alias:
    labels: Labels
    # The name the client meant once a search domain is stripped (then a CNAME is added).
    stripped: Labels | None


def _labels(text: str) -> Labels:
    return tuple(part.encode() for part in text.split(".") if part)


def search_domains(namespace: str, domain: str = DEFAULT_DOMAIN) -> tuple[Labels, ...]:
    """The search path of a pod in `namespace` (kubelet's ClusterFirst resolv.conf)."""
    return (
        _labels(f"{namespace}.svc.{domain}"),
        _labels(f"svc.{domain}"),
        _labels(domain),
    )


def kube_expansions(name: Labels, namespace: str, domain: str = DEFAULT_DOMAIN) -> list[Labels]:
    """The Kubernetes service FQDNs a short name may stand for (pod hosts of headless
    services are not served)."""
    d = _labels(domain)
    if len(name) == 1:
        return [name + _labels(namespace) + (b"svc",) + d]
    if len(name) == 2:
        return [(*name, b"svc", *d)]
    if len(name) == 3 and name[2] == b"svc":
        return [name + d]
    return []


def aliases(name: Labels, namespace: str, domain: str = DEFAULT_DOMAIN) -> list[_Alias]:
    """Every name to try for `name` asked by a pod in `namespace`, in order, no repeats."""
    out: list[_Alias] = []
    seen: set[Labels] = set()

    def add(labels: Labels, stripped: Labels | None) -> None:
        if labels and labels not in seen:
            seen.add(labels)
            out.append(_Alias(labels, stripped))

    add(name, None)
    for full in kube_expansions(name, namespace, domain):
        add(full, None)
    for suffix in search_domains(namespace, domain):
        if len(name) > len(suffix) and name[-len(suffix) :] == suffix:
            short = name[: -len(suffix)]
            add(short, short)
            for full in kube_expansions(short, namespace, domain):
                add(full, short)
    return out


def _text(labels: Labels) -> str | None:
    try:
        return ".".join(label.decode("ascii") for label in labels)
    except UnicodeDecodeError:
        return None  # not a hostname any service can have


def decide(
    state: MeshState, client: Workload, question: Question, domain: str = DEFAULT_DOMAIN
) -> Decision:
    if question.qclass != CLASS_IN:
        return Forward(f"class {question.qclass} is not IN")
    if question.qtype not in (RType.A, RType.AAAA):
        return Forward(f"record type {question.qtype} is not A or AAAA")
    asked = tuple(label.lower() for label in question.labels)
    for alias in aliases(asked, client.namespace, domain):
        host = _text(alias.labels)
        if host is None:
            continue
        service = state.service_by_hostname(host)
        if service is None:
            continue
        vips = [v.ip for v in service.vips if v.network == client.network]
        if not vips:
            continue  # headless, or no address on this network: upstream may know it
        return Answer(_records(question, alias, vips), service)
    return Forward("not a service host")


def _records(
    question: Question,
    alias: _Alias,
    vips: list[ipaddress.IPv4Address | ipaddress.IPv6Address],
) -> tuple[Record, ...]:
    out: list[Record] = []
    owner = question.labels  # as the client wrote it (case preserved)
    if alias.stripped is not None:
        out.append(cname(owner, alias.stripped, TTL))
        owner = alias.stripped
    for ip in vips:
        if question.qtype == RType.A and isinstance(ip, ipaddress.IPv4Address):
            out.append(a(owner, ip, TTL))
        elif question.qtype == RType.AAAA and isinstance(ip, ipaddress.IPv6Address):
            out.append(aaaa(owner, ip, TTL))
    if len(out) == 1 and alias.stripped is not None:
        return ()  # a CNAME to a name with no record of this type: nothing to say
    return tuple(out)
