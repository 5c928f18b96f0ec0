"""Istio `ServiceEntry` (networking.istio.io): a strict reader and the address allocation.

A ServiceEntry adds hosts to the mesh that Kubernetes Services do not name: external APIs
(`location: MESH_EXTERNAL`) or workloads outside Kubernetes (`MESH_INTERNAL`). The mesh
config carries it verbatim among its `resources`; `meshcore.discovery` reads it here and
turns each host into a `Service` (hostname = the host, VIPs = its addresses), its static
endpoints into service endpoints, so the tunnel routes an entry's address like a service
and its DNS proxy answers for its hosts.

What is read (and nothing else: an unknown field is an error, so a setting we would ignore
is never silently accepted): `hosts` (exact DNS names, no wildcards), `addresses`
(optional single IPs, only with one host), `ports` (`number`, `name`, `protocol`,
`targetPort`), `resolution` (NONE, STATIC, DNS; Istio's default NONE), `location`
(MESH_EXTERNAL default, MESH_INTERNAL), `endpoints` (`address`, `ports` by port name,
`labels`), `subjectAltNames`.

Addresses, as Istio's IP auto-allocation does it (`ShouldV2AutoAllocateIP`): an entry
without `addresses`, whose resolution is not NONE (an allocated address could not be
honoured then) and whose hosts have no wildcard, gets one IPv4 address per host from the
class E range 240.240.0.0/16, which no real network routes. Istio's controller records its
choice in the entry's status; the local mesh has no status to persist, so the choice is a
pure function of the hosts in force: FNV-1a of the host picks a slot, a taken slot moves to
the next free one, hosts taken in sorted order. The same hosts give every tunnel the same
addresses, and adding an entry never moves a host that did not collide with it.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from meshcore.reader import Reader, describe

KIND = "ServiceEntry"
API_GROUP = "networking.istio.io"
API_VERSIONS = ("v1", "v1beta1", "v1alpha3")

# Istio's auto-allocation range for IPv4 (class E: never routed).
ALLOCATION_RANGE = ipaddress.IPv4Network("240.240.0.0/16")
# The network and broadcast addresses of the range are never handed out.
_SLOTS = ALLOCATION_RANGE.num_addresses - 2
MAX_HOSTS = 100  # per entry: Istio has no limit, real entries name a handful
MAX_ENDPOINTS = 1000

_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)(\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)*$"
)
_PORT_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_PROTOCOLS = ("HTTP", "HTTPS", "HTTP2", "GRPC", "TCP", "TLS", "MONGO", "MYSQL", "REDIS")

_TOP_KEYS = frozenset({"apiVersion", "kind", "metadata", "spec", "status"})
_META_KEYS = frozenset({"name", "namespace", "labels", "annotations"})
_SPEC_KEYS = frozenset(
    {"hosts", "addresses", "ports", "resolution", "location", "endpoints", "subjectAltNames"}
)
_PORT_KEYS = frozenset({"number", "name", "protocol", "targetPort"})
_ENDPOINT_KEYS = frozenset({"address", "ports", "labels"})


class ServiceEntryError(ValueError):
    """A ServiceEntry that cannot be used; the message names the field."""


class Resolution(enum.StrEnum):
    NONE = "NONE"  # traffic goes to the address the app connected to
    STATIC = "STATIC"  # to the endpoints' IPs
    DNS = "DNS"  # to the endpoints' (or the hosts') DNS names, resolved at connect


class Location(enum.StrEnum):
    MESH_EXTERNAL = "MESH_EXTERNAL"
    MESH_INTERNAL = "MESH_INTERNAL"


@dataclass(frozen=True, slots=True, order=True)
class EntryPort:
    number: int
    name: str
    protocol: str = ""  # as written (HTTP, TCP, ...); "" when not given
    target_port: int | None = None


@dataclass(frozen=True, slots=True)
class EntryEndpoint:
    """An endpoint: an IP (STATIC) or a DNS name (DNS), with per-port-name target ports."""

    address: str
    ports: tuple[tuple[str, int], ...] = ()
    labels: tuple[tuple[str, str], ...] = ()

    def target_port(self, port: EntryPort) -> int:
        """Where this endpoint takes `port`: its own port of that name, else the port's
        targetPort, else the port's number (Istio's order)."""
        for name, number in self.ports:
            if name == port.name:
                return number
        return port.target_port if port.target_port is not None else port.number

    @property
    def ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        try:
            return ipaddress.ip_address(self.address)
        except ValueError:
            return None


@dataclass(frozen=True, slots=True)
class ServiceEntry:
    """One ServiceEntry as the mesh uses it; `addresses` as written (see `allocate`)."""

    name: str
    namespace: str
    hosts: tuple[str, ...]
    addresses: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]
    ports: tuple[EntryPort, ...]
    resolution: Resolution
    location: Location
    endpoints: tuple[EntryEndpoint, ...]
    subject_alt_names: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def wants_allocation(self) -> bool:
        """Istio's rule: no addresses given, resolution not NONE, no wildcard host."""
        return (
            not self.addresses
            and self.resolution is not Resolution.NONE
            and not any("*" in h for h in self.hosts)
        )


# -- reading ------------------------------------------------------------------------------


def parse_service_entry(doc: Any, path: str = "") -> ServiceEntry:
    """A ServiceEntry document as users write it; `ServiceEntryError` naming the field."""
    r = Reader(ServiceEntryError)
    at = f"{path}." if path else ""
    top = r.mapping(doc, path or "ServiceEntry", required=True)
    r.check_keys(top, _TOP_KEYS, path)
    api = top.get("apiVersion")
    group, _, version = str(api).rpartition("/")
    if not isinstance(api, str) or group != API_GROUP or version not in API_VERSIONS:
        r.fail(
            f"{at}apiVersion",
            f"{api!r}: a ServiceEntry is {API_GROUP}/{' or '.join(API_VERSIONS)}",
        )
    if top.get("kind") != KIND:
        r.fail(f"{at}kind", f"expected {KIND!r}, got {top.get('kind')!r}")
    meta = r.mapping(top.get("metadata"), f"{at}metadata", required=True)
    r.check_keys(meta, _META_KEYS, f"{at}metadata")
    name = r.name(meta, "name", f"{at}metadata")
    namespace = r.name(meta, "namespace", f"{at}metadata", "default")
    spec_path = f"{at}spec"
    spec = r.mapping(top.get("spec"), spec_path, required=True)
    r.check_keys(spec, _SPEC_KEYS, spec_path)

    hosts = _hosts(r, spec.get("hosts"), f"{spec_path}.hosts")
    addresses = _addresses(r, spec.get("addresses"), f"{spec_path}.addresses")
    if addresses and len(hosts) > 1:
        r.fail(
            f"{spec_path}.addresses",
            "addresses with more than one host cannot tell the hosts apart: "
            "give each host its own ServiceEntry",
        )
    ports = _ports(r, spec.get("ports"), f"{spec_path}.ports")
    resolution = Resolution(
        r.choice(spec.get("resolution", "NONE"), f"{spec_path}.resolution", list(Resolution))
    )
    location = Location(
        r.choice(spec.get("location", "MESH_EXTERNAL"), f"{spec_path}.location", list(Location))
    )
    endpoints = _endpoints(r, spec.get("endpoints"), f"{spec_path}.endpoints", ports, resolution)
    sans = tuple(r.strings(spec.get("subjectAltNames"), f"{spec_path}.subjectAltNames"))
    return ServiceEntry(
        name, namespace, hosts, addresses, ports, resolution, location, endpoints, sans
    )


def validate_service_entry(doc: Any) -> list[str]:
    """Every problem with one document (empty: acceptable), for `ambientctl apply -f`."""
    try:
        parse_service_entry(doc)
    except ServiceEntryError as e:
        return [str(e)]
    return []


def _hosts(r: Reader, value: Any, path: str) -> tuple[str, ...]:
    hosts = r.strings(value, path)
    if not hosts:
        r.fail(path, "at least one host is required")
    if len(hosts) > MAX_HOSTS:
        r.fail(path, f"at most {MAX_HOSTS} hosts, got {len(hosts)}")
    seen: set[str] = set()
    for i, host in enumerate(hosts):
        if "*" in host:
            r.fail(f"{path}[{i}]", f"{host!r}: wildcard hosts are not supported")
        if not _HOSTNAME.match(host):
            r.fail(f"{path}[{i}]", f"{host!r} is not a DNS name (lower case, e.g. api.example.com)")
        if host in seen:
            r.fail(f"{path}[{i}]", f"{host!r} is listed twice")
        seen.add(host)
    return tuple(hosts)


def _addresses(
    r: Reader, value: Any, path: str
) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]:
    out: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for i, raw in enumerate(r.items(value, path)):
        if isinstance(raw, str) and "/" in raw:
            r.fail(f"{path}[{i}]", f"{raw!r}: CIDR ranges are not supported, give single IPs")
        ip = r.ip(raw, f"{path}[{i}]")
        if ip in out:
            r.fail(f"{path}[{i}]", f"{ip} is listed twice")
        out.append(ip)
    return tuple(out)


def _ports(r: Reader, value: Any, path: str) -> tuple[EntryPort, ...]:
    items = r.items(value, path)
    if not items:
        r.fail(path, "at least one port is required")
    out: list[EntryPort] = []
    names: set[str] = set()
    numbers: set[int] = set()
    for i, raw in enumerate(items):
        at = f"{path}[{i}]"
        entry = r.mapping(raw, at, required=True)
        r.check_keys(entry, _PORT_KEYS, at)
        if entry.get("number") is None:
            r.fail(f"{at}.number", "is required")
        number = r.port(entry["number"], f"{at}.number")
        name = r.string(entry, "name", at)
        if not _PORT_NAME.match(name):
            r.fail(f"{at}.name", f"{name!r} is not a port name (a DNS label, e.g. http)")
        protocol = ""
        if entry.get("protocol") is not None:
            protocol = r.choice(entry["protocol"], f"{at}.protocol", _PROTOCOLS)
        target = None
        if entry.get("targetPort") is not None:
            target = r.port(entry["targetPort"], f"{at}.targetPort")
        if name in names:
            r.fail(f"{at}.name", f"{name!r} is the name of another port")
        if number in numbers:
            r.fail(f"{at}.number", f"port {number} is given twice")
        names.add(name)
        numbers.add(number)
        out.append(EntryPort(number, name, protocol, target))
    return tuple(out)


def _endpoints(
    r: Reader,
    value: Any,
    path: str,
    ports: tuple[EntryPort, ...],
    resolution: Resolution,
) -> tuple[EntryEndpoint, ...]:
    items = r.items(value, path)
    if len(items) > MAX_ENDPOINTS:
        r.fail(path, f"at most {MAX_ENDPOINTS} endpoints, got {len(items)}")
    if items and resolution is Resolution.NONE:
        r.fail(path, "endpoints need resolution STATIC or DNS (NONE goes where the app connects)")
    port_names = {p.name for p in ports}
    out: list[EntryEndpoint] = []
    for i, raw in enumerate(items):
        at = f"{path}[{i}]"
        entry = r.mapping(raw, at, required=True)
        r.check_keys(entry, _ENDPOINT_KEYS, at)
        address = r.string(entry, "address", at)
        if resolution is Resolution.STATIC:
            address = str(r.ip(address, f"{at}.address"))
        elif not _HOSTNAME.match(address):
            try:
                address = str(ipaddress.ip_address(address))
            except ValueError:
                r.fail(f"{at}.address", f"{address!r} is neither a DNS name nor an IP")
        eports: list[tuple[str, int]] = []
        for pname, number in r.mapping(entry.get("ports"), f"{at}.ports").items():
            if pname not in port_names:
                r.fail(f"{at}.ports", f"{pname!r} names no port of the entry")
            eports.append((pname, r.port(number, f"{at}.ports.{pname}")))
        labels = tuple(sorted(r.string_map(entry.get("labels"), f"{at}.labels").items()))
        out.append(EntryEndpoint(address, tuple(sorted(eports)), labels))
    return tuple(out)


# -- allocation ---------------------------------------------------------------------------


def _fnv1a32(data: bytes) -> int:
    h = 0x811C9DC5
    for b in data:
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return h


def allocate(
    hosts: Iterable[str], taken: Iterable[ipaddress.IPv4Address] = ()
) -> dict[str, ipaddress.IPv4Address]:
    """An address in 240.240.0.0/16 for each host, avoiding `taken` and each other.

    Pure and deterministic: hosts are placed in sorted order, each at FNV-1a(host) modulo
    the range (the network and broadcast addresses skipped), or the next free slot after
    it. Raises `ServiceEntryError` if the range is full."""
    first = int(ALLOCATION_RANGE.network_address) + 1
    used = {int(ip) - first for ip in taken if ip in ALLOCATION_RANGE}
    out: dict[str, ipaddress.IPv4Address] = {}
    for host in sorted(set(hosts)):
        if len(used) >= _SLOTS:
            raise ServiceEntryError(f"no address left in {ALLOCATION_RANGE} for {host!r}")
        slot = _fnv1a32(host.encode()) % _SLOTS
        while slot in used:
            slot = (slot + 1) % _SLOTS
        used.add(slot)
        out[host] = ipaddress.IPv4Address(first + slot)
    return out


def host_addresses(
    entries: Iterable[ServiceEntry],
) -> dict[tuple[str, str], tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]]:
    """(entry key, host) -> the host's addresses: those written, else an allocated one
    (when the entry wants one), else none. Written addresses are never allocated to another
    host."""
    entries = tuple(entries)
    written = {ip for e in entries for ip in e.addresses if isinstance(ip, ipaddress.IPv4Address)}
    wanted = {h for e in entries if e.wants_allocation for h in e.hosts}
    allocated = allocate(wanted, written)
    out: dict[tuple[str, str], tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]] = {}
    for e in entries:
        for h in e.hosts:
            if e.addresses:
                out[(e.key, h)] = e.addresses
            elif e.wants_allocation:
                out[(e.key, h)] = (allocated[h],)
            else:
                out[(e.key, h)] = ()
    return out


def describe_entry(doc: Mapping[str, Any]) -> str:
    meta = doc.get("metadata")
    if isinstance(meta, Mapping):
        return f"{KIND} {meta.get('namespace', 'default')}/{meta.get('name')}"
    return f"{KIND} ({describe(meta)} metadata)"
