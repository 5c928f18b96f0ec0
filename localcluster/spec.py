"""The cluster file: YAML in, one frozen, fully resolved ClusterSpec out.

Invariants of a ClusterSpec (checked once here, relied on everywhere else):
- every pod has a concrete IPv4 address inside its node's pod CIDR, unique in the cluster;
- every service has a concrete VIP inside SERVICE_CIDR, unique in the cluster;
- every pod's node and namespace, and every service's namespace, exist;
- names are unique where Kubernetes requires it (nodes, namespaces, pods and services per
  namespace), and short enough for the netns and interface names derived from them.

Addressing is a pure function of file order: node i (1-based) gets 10.10.0.(10+i)/24 on the
cluster bridge and pod CIDR 10.244.i.0/24 with gateway 10.244.i.1; pods without an `ip` get
.10, .11, ... of their node's CIDR in file order, skipping addresses claimed explicitly.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from types import MappingProxyType
from typing import Any

from localcluster import gateways as gw
from localcluster.appstatus import DEFAULT_RESTART_POLICY, RESTART_POLICIES
from localcluster.inputs import InputError, read_text
from localcluster.labels import label_errors
from localcluster.policies import PolicyError, check_documents, with_defaults
from meshcore.defaults import SERVICE_ACCOUNT, TRUST_DOMAIN
from meshcore.reader import Reader, join, load_document
from meshcore.serviceentry import KIND as SERVICE_ENTRY
from meshcore.serviceentry import validate_service_entry
from redirect.enrolment import DATAPLANE_MODE_LABEL, PodInfo, redirection_enabled
from ztunnel.config import MAX_TUNNEL_WORKERS

# The DNS suffix of service hostnames; not the trust domain, even when equal by default.
DNS_DOMAIN = "cluster.local"
NODE_NETWORK = IPv4Network("10.10.0.0/24")
SERVICE_CIDR = IPv4Network("10.96.0.0/16")
FIRST_HOST_OFFSET = 10  # pods start at .10, services at 10.96.0.10, nodes at 10.10.0.11
MAX_NODES = 244  # 10 + i must stay a usable host in NODE_NETWORK
# Each pod is a netns and a process on one machine; these bound what a file can ask for
# (the address ranges alone would allow 60,000 pods and 65,000 services).
MAX_PODS = 500
MAX_NAMESPACES = 200
MAX_SERVICES = 500
PYTHON_PLACEHOLDER = "{python}"

# The cluster name prefixes every netns name (`<cluster>-...`).
_CLUSTER_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?$")
# Node names appear inside netns names; 15 keeps `<cluster>-<node>-p<k>` under 40 chars.
_NODE_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_TRAILING_ORDINAL = re.compile(r"-\d+$")
# Netns names are `<cluster>-c` (the bridge), `<cluster>-<node>`, `<cluster>-<node>-p<k>`
# (pods) and `<cluster>-<node>-w<k>` (waypoints): a node named `c`, or `<other node>-p<k>`
# or `-w<k>`, would take another namespace's name.
_RESERVED_NODE_NAME = re.compile(r"^c$|-[pw]\d+$")
# The appProtocol values the mesh config's reader takes (any case): istio.workload's
# AppProtocol names, Istio's protocol names and Kubernetes' well-known ones. The waypoint
# chooses HTTP, gRPC or TCP by them; anything else would make every tunnel refuse the config.
APP_PROTOCOLS = frozenset(
    {"unknown", "http11", "http2", "grpc", "tcp", "tls", "http", "http_proxy", "grpc-web"}
    | {"mongo", "mysql", "redis", "https"}
    | {"kubernetes.io/h2c", "kubernetes.io/ws", "kubernetes.io/wss"}
)
MAX_GATEWAYS = 50


class SpecError(ValueError):
    """The cluster file is invalid; the message names the offending entry and what to fix."""


@dataclass(frozen=True, slots=True)
class NodeSpec:
    name: str
    index: int  # 1-based, file order
    ip: IPv4Address
    pod_cidr: IPv4Network
    gateway: IPv4Address


@dataclass(frozen=True, slots=True)
class NamespaceSpec:
    name: str
    labels: Mapping[str, str] = field(hash=False)  # read-only mapping

    @property
    def ambient(self) -> bool:
        return self.labels.get(DATAPLANE_MODE_LABEL) == "ambient"


@dataclass(frozen=True, slots=True)
class PortSpec:
    port: int
    target_port: int
    name: str = ""
    app_protocol: str = ""


@dataclass(frozen=True, slots=True)
class PodSpec:
    name: str
    namespace: str
    service_account: str
    labels: Mapping[str, str] = field(hash=False)  # read-only mapping
    node: str
    ip: IPv4Address
    command: tuple[str, ...]  # already resolved: `{python}` replaced by sys.executable
    env: Mapping[str, str] = field(hash=False)
    gateway: str = ""  # the waypoint Gateway this pod runs (its name), else ""
    # Whether the pod supervisor restarts an exited app (Never | OnFailure | Always).
    restart_policy: str = DEFAULT_RESTART_POLICY

    @property
    def is_waypoint(self) -> bool:
        return bool(self.gateway)

    def enrolled(self, spec: ClusterSpec) -> bool:
        """In the mesh, by the node agent's own rule (`redirect.enrolment`): namespace or
        pod labelled ambient, and the pod not opted out with `dataplane-mode=none`."""
        info = PodInfo(
            uid="", name=self.name, namespace=self.namespace, node=self.node, labels=self.labels
        )
        return redirection_enabled(spec.namespace(self.namespace).labels, info)

    @property
    def workload_name(self) -> str:
        """The owning workload's name, as a StatefulSet would name its pods `<name>-<n>`."""
        return _TRAILING_ORDINAL.sub("", self.name)


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    name: str
    namespace: str
    vip: IPv4Address
    selector: Mapping[str, str] = field(hash=False)
    ports: tuple[PortSpec, ...]
    labels: Mapping[str, str] = field(hash=False, default_factory=lambda: _EMPTY)
    gateway: str = ""  # the waypoint Gateway this Service fronts (its name), else ""

    @property
    def hostname(self) -> str:
        return f"{self.name}.{self.namespace}.svc.{DNS_DOMAIN}"

    def selects(self, pod: PodSpec) -> bool:
        """Kubernetes semantics: same namespace, every selector label equal. An empty
        selector selects nothing (such services have manually managed endpoints)."""
        if pod.namespace != self.namespace or not self.selector:
            return False
        return all(pod.labels.get(k) == v for k, v in self.selector.items())


@dataclass(frozen=True, slots=True)
class DnsSpec:
    """The DNS proxy: `capture` turns on the agents' DNS capture (AMBIENT_DNS_CAPTURE) and
    the tunnels' proxy (ISTIO_META_DNS_CAPTURE); `nameservers` are the resolvers it
    forwards to (the tunnels' resolv.conf). Pod addresses of this cluster: nothing in a
    local cluster reaches any other."""

    capture: bool = False
    nameservers: tuple[IPv4Address, ...] = ()


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    name: str
    trust_domain: str
    nodes: tuple[NodeSpec, ...]
    namespaces: tuple[NamespaceSpec, ...]
    pods: tuple[PodSpec, ...]
    services: tuple[ServiceSpec, ...]
    base_dir: Path  # cwd of every pod command: the cluster file's directory
    policies: tuple[str, ...] = ()  # JSON text of each policy resource
    gateways: tuple[gw.GatewaySpec, ...] = ()  # waypoints, placed
    dns: DnsSpec = DnsSpec()
    service_entries: tuple[str, ...] = ()  # JSON text of each ServiceEntry
    # `certificates.ttlSeconds`: the workload certificate lifetime the tunnels ask the CA
    # for (their CERT_TTL_SECONDS); None leaves the tunnels' default (a day).
    cert_ttl_seconds: int | None = None
    # `tunnel.workers`: each tunnel's processes (its TUNNEL_WORKERS); None leaves the
    # tunnels' default (chosen from the cores).
    tunnel_workers: int | None = None

    def gateway(self, namespace: str, name: str) -> gw.GatewaySpec | None:
        for g in self.gateways:
            if g.namespace == namespace and g.name == name:
                return g
        return None

    def waypoint_pods(self) -> tuple[PodSpec, ...]:
        return tuple(waypoint_pod(self, g) for g in self.gateways)

    def waypoint_services(self) -> tuple[ServiceSpec, ...]:
        return tuple(waypoint_service(g) for g in self.gateways)

    def all_pods(self) -> tuple[PodSpec, ...]:
        """The cluster file's pods, then each waypoint's."""
        return self.pods + self.waypoint_pods()

    def all_services(self) -> tuple[ServiceSpec, ...]:
        return self.services + self.waypoint_services()

    def node(self, name: str) -> NodeSpec:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(f"no node {name!r} in cluster {self.name!r}")

    def namespace(self, name: str) -> NamespaceSpec:
        for ns in self.namespaces:
            if ns.name == name:
                return ns
        raise KeyError(f"no namespace {name!r} in cluster {self.name!r}")

    def pod(self, namespace: str, name: str) -> PodSpec:
        for p in self.pods:
            if p.namespace == namespace and p.name == name:
                return p
        raise KeyError(f"no pod {namespace}/{name} in cluster {self.name!r}")

    def service(self, namespace: str, name: str) -> ServiceSpec:
        for s in self.services:
            if s.namespace == namespace and s.name == name:
                return s
        raise KeyError(f"no service {namespace}/{name} in cluster {self.name!r}")

    def pods_on(self, node: str) -> tuple[PodSpec, ...]:
        return tuple(p for p in self.pods if p.node == node)

    def endpoints(self, service: ServiceSpec) -> tuple[PodSpec, ...]:
        """Pods in the service's namespace matching its selector, in file order."""
        return tuple(p for p in self.all_pods() if service.selects(p))

    def services_for(self, pod: PodSpec) -> tuple[ServiceSpec, ...]:
        return tuple(s for s in self.all_services() if s.selects(pod))


# --- waypoints: the pod and Service istiod's deployment controller would create (pure) -----

WAYPOINT_POD_LABELS = {"istio.io/dataplane-mode": "none"}


def waypoint_pod(spec: ClusterSpec, g: gw.GatewaySpec) -> PodSpec:
    p = g.placed()
    labels = {
        gw.GATEWAY_NAME_LABEL: g.name,
        "service.istio.io/canonical-name": g.name,
        **WAYPOINT_POD_LABELS,
    }
    return PodSpec(
        name=g.pod_name,
        namespace=g.namespace,
        service_account=g.service_account,
        labels=MappingProxyType(labels),
        node=p.node,
        ip=p.ip,
        command=(sys.executable, "-m", "waypoint"),
        env=_EMPTY,
        gateway=g.name,
    )


def waypoint_service(g: gw.GatewaySpec) -> ServiceSpec:
    return ServiceSpec(
        name=g.name,
        namespace=g.namespace,
        vip=g.placed().vip,
        selector=MappingProxyType({gw.GATEWAY_NAME_LABEL: g.name}),
        # Unnamed: the tunnels only dial it, and a plain port map reads everywhere.
        ports=(PortSpec(gw.HBONE_PORT, gw.HBONE_PORT),),
        gateway=g.name,
    )


def place_gateway(spec: ClusterSpec, g: gw.GatewaySpec, node: str | None) -> gw.GatewaySpec:
    """`g` placed on `node` (default: the first node) at addresses no pod, service or
    other waypoint of `spec` uses. Raises SpecError."""
    name = node or spec.nodes[0].name
    try:
        target = spec.node(name)
    except KeyError:
        known = ", ".join(n.name for n in spec.nodes)
        raise SpecError(f"no node {name!r} in cluster {spec.name} (nodes: {known})") from None
    try:
        return gw.place(
            g,
            target.name,
            target.pod_cidr,
            {p.ip for p in spec.all_pods()} | {target.gateway},
            SERVICE_CIDR,
            {s.vip for s in spec.all_services()},
            {o.placed().slot for o in spec.gateways if o.placed().node == target.name},
            FIRST_HOST_OFFSET,
        )
    except gw.GatewayError as e:
        raise SpecError(str(e)) from None


def gateway_problem(spec: ClusterSpec, g: gw.GatewaySpec) -> str | None:
    """Why `g` cannot join `spec` (unknown namespace, a pod or service by its names), or None."""
    names = ", ".join(ns.name for ns in spec.namespaces)
    if not any(ns.name == g.namespace for ns in spec.namespaces):
        return f"Gateway {g.namespace}/{g.name}: no namespace {g.namespace!r} (namespaces: {names})"
    if any(p.namespace == g.namespace and p.name == g.pod_name for p in spec.pods):
        return f"Gateway {g.namespace}/{g.name}: its pod name {g.pod_name} is a pod's already"
    if any(s.namespace == g.namespace and s.name == g.name for s in spec.services):
        return f"Gateway {g.namespace}/{g.name}: its Service name {g.name} is a service's already"
    return None


def valid_cluster_name(name: str) -> bool:
    return bool(_CLUSTER_NAME.match(name))


# --- addressing (pure) -------------------------------------------------------------------


def node_ip(index: int) -> IPv4Address:
    return NODE_NETWORK.network_address + FIRST_HOST_OFFSET + index


def node_pod_cidr(index: int) -> IPv4Network:
    return IPv4Network(f"10.244.{index}.0/24")


def node_gateway(index: int) -> IPv4Address:
    return node_pod_cidr(index).network_address + 1


def _allocate(network: IPv4Network, taken: set[IPv4Address], start: int) -> IPv4Address:
    addr = network.network_address + start
    while addr in taken:
        addr += 1
    if addr not in network or addr == network.broadcast_address:
        raise SpecError(f"address range {network} is exhausted; use fewer entries")
    taken.add(addr)
    return addr


# --- parsing -----------------------------------------------------------------------------


def load_cluster(path: Path | str) -> ClusterSpec:
    """Read and validate a cluster file; commands run relative to its directory."""
    p = Path(path)
    try:
        text = read_text(p, "cluster file")
    except InputError as e:
        raise SpecError(str(e)) from None
    return parse_cluster(text, p.resolve().parent)


def parse_cluster(text: str, base_dir: Path) -> ClusterSpec:
    doc = load_document(text, lambda message: SpecError(f"cluster file is {message}"))
    root = _mapping(
        doc,
        "cluster file",
        {
            "name",
            "trustDomain",
            "nodes",
            "namespaces",
            "pods",
            "services",
            "policies",
            "gateways",
            "serviceEntries",
            "dns",
            "certificates",
            "tunnel",
        },
    )
    name = _str(root, "name", "cluster file")
    if not _CLUSTER_NAME.match(name):
        raise SpecError(
            f"cluster name {name!r} must be 1-10 characters of [a-z0-9-], "
            "starting and ending with a letter or digit"
        )
    trust_domain = _str(root, "trustDomain", "cluster file", TRUST_DOMAIN)
    nodes = _parse_nodes(_list(root, "nodes", "cluster file", required=True))
    namespaces = _parse_namespaces(_list(root, "namespaces", "cluster file"))
    pods = _parse_pods(_list(root, "pods", "cluster file"), nodes, namespaces, base_dir)
    services = _parse_services(_list(root, "services", "cluster file"), namespaces)
    spec = ClusterSpec(
        name=name,
        trust_domain=trust_domain,
        nodes=nodes,
        namespaces=namespaces,
        pods=pods,
        services=services,
        base_dir=base_dir,
        policies=_parse_policies(root.get("policies")),
        dns=_parse_dns(root.get("dns")),
        service_entries=_parse_service_entries(_list(root, "serviceEntries", "cluster file")),
        cert_ttl_seconds=_parse_certificates(root.get("certificates")),
        tunnel_workers=_parse_tunnel(root.get("tunnel")),
    )
    _check_entry_hosts(spec)
    return _with_gateways(spec, _list(root, "gateways", "cluster file"))


def _check_entry_hosts(spec: ClusterSpec) -> None:
    """A ServiceEntry host is a service of the mesh: unique, not a Service's hostname, and
    its written addresses not a Service's VIP (the tunnels would refuse the mesh config)."""
    hosts = {s.hostname: f"Service {s.namespace}/{s.name}" for s in spec.services}
    vips = {s.vip: f"Service {s.namespace}/{s.name}" for s in spec.services}
    for i, text in enumerate(spec.service_entries):
        doc = json.loads(text)
        meta, body = doc["metadata"], doc["spec"]
        me = f"{SERVICE_ENTRY} {meta['namespace']}/{meta['name']}"
        for host in body["hosts"]:
            if host in hosts:
                raise SpecError(f"serviceEntries[{i}]: host {host!r} is also {hosts[host]}'s")
            hosts[host] = me
        for raw in body.get("addresses") or ():
            ip = IPv4Address(raw) if ":" not in raw else None
            if ip is not None and ip in vips:
                raise SpecError(f"serviceEntries[{i}]: address {ip} is also {vips[ip]}'s")
            if ip is not None:
                vips[ip] = me


def _parse_dns(value: Any) -> DnsSpec:
    if value is None:
        return DnsSpec()
    m = _mapping(value, "dns", {"capture", "nameservers"})
    capture = _R.boolean(m, "capture", "dns", False)
    servers: list[IPv4Address] = []
    for i, raw in enumerate(_R.items(m.get("nameservers"), "dns.nameservers")):
        ip = _R.ip(raw, f"dns.nameservers[{i}]")
        if not isinstance(ip, IPv4Address):
            raise SpecError(f"dns.nameservers[{i}]: {ip} is not IPv4 (pods are IPv4 only)")
        servers.append(ip)
    if capture and not servers:
        raise SpecError(
            "dns.nameservers: required when dns.capture is true (the resolvers the tunnels "
            "forward unknown names to, e.g. a pod of the cluster)"
        )
    if len(servers) > 3:
        raise SpecError(f"dns.nameservers: at most 3 (a resolv.conf's limit), got {len(servers)}")
    return DnsSpec(capture, tuple(servers))


# The tunnels' own bounds on CERT_TTL_SECONDS (ztunnel/config.py).
MIN_CERT_TTL, MAX_CERT_TTL = 5, 7 * 24 * 3600


def _parse_tunnel(value: Any) -> int | None:
    if value is None:
        return None
    m = _mapping(value, "tunnel", {"workers"})
    workers = m.get("workers")
    if workers is None:
        return None
    if isinstance(workers, bool) or not isinstance(workers, int):
        raise SpecError(f"tunnel.workers: expected a whole number of processes, got {workers!r}")
    if not 1 <= workers <= MAX_TUNNEL_WORKERS:
        raise SpecError(f"tunnel.workers: {workers} is not in 1..{MAX_TUNNEL_WORKERS}")
    return workers


def _parse_certificates(value: Any) -> int | None:
    if value is None:
        return None
    m = _mapping(value, "certificates", {"ttlSeconds"})
    ttl = m.get("ttlSeconds")
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, int):
        raise SpecError(f"certificates.ttlSeconds: expected a whole number of seconds, got {ttl!r}")
    if not MIN_CERT_TTL <= ttl <= MAX_CERT_TTL:
        raise SpecError(f"certificates.ttlSeconds: {ttl} is not in {MIN_CERT_TTL}..{MAX_CERT_TTL}")
    return ttl


def _parse_service_entries(items: list[Any]) -> tuple[str, ...]:
    """ServiceEntry resources (networking.istio.io), checked as `ambientctl apply -f`
    checks them; namespace defaults to `default`."""
    out: list[str] = []
    seen: set[tuple[str, str]] = set()
    for i, raw in enumerate(items):
        where = f"serviceEntries[{i}]"
        if not isinstance(raw, dict) or raw.get("kind") != SERVICE_ENTRY:
            raise SpecError(f"{where}: expected a {SERVICE_ENTRY} resource")
        doc = with_defaults(raw)
        problems = validate_service_entry(doc)
        if problems:
            raise SpecError(f"{where}: {problems[0]}")
        key = (doc["metadata"]["namespace"], doc["metadata"]["name"])
        if key in seen:
            raise SpecError(f"{where}: duplicate {SERVICE_ENTRY} {key[0]}/{key[1]}")
        seen.add(key)
        out.append(json.dumps(doc, sort_keys=True))
    return tuple(out)


def _with_gateways(spec: ClusterSpec, items: list[Any]) -> ClusterSpec:
    """The cluster file's waypoint Gateways, placed in file order on the first node."""
    _at_most(items, MAX_GATEWAYS, "gateways")
    for i, item in enumerate(items):
        where = f"gateways[{i}]"
        try:
            g = gw.parse_gateway(item, where)
        except gw.GatewayError as e:
            raise SpecError(str(e)) from None
        if spec.gateway(g.namespace, g.name) is not None:
            raise SpecError(f"{where}: duplicate Gateway {g.namespace}/{g.name}")
        problem = gateway_problem(spec, g)
        if problem is not None:
            raise SpecError(f"{where}: {problem}")
        spec = dataclasses.replace(spec, gateways=(*spec.gateways, place_gateway(spec, g, None)))
    return spec


def _parse_policies(value: Any) -> tuple[str, ...]:
    """Istio AuthorizationPolicy / PeerAuthentication resources, checked as `ambientctl
    apply` checks them (the tunnels' own parsers; namespace defaults to `default`); kept
    as JSON text so the spec stays hashable."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise SpecError("policies: expected a list of AuthorizationPolicy/PeerAuthentication")
    try:
        checked = check_documents(value, "policies")
    except PolicyError as e:
        raise SpecError(str(e)) from None
    return tuple(json.dumps(dict(r.doc), sort_keys=True) for r in checked)


def _parse_nodes(items: list[Any]) -> tuple[NodeSpec, ...]:
    if not items:
        raise SpecError("cluster file needs at least one entry under 'nodes'")
    if len(items) > MAX_NODES:
        raise SpecError(f"at most {MAX_NODES} nodes are supported, got {len(items)}")
    out: list[NodeSpec] = []
    seen: set[str] = set()
    for i, item in enumerate(items, start=1):
        where = f"nodes[{i - 1}]"
        m = _mapping(item, where, {"name"})
        name = _str(m, "name", where)
        if not _NODE_NAME.match(name):
            raise SpecError(f"{where}: node name {name!r} must be 1-15 characters of [a-z0-9-]")
        if _RESERVED_NODE_NAME.search(name):
            raise SpecError(
                f"{where}: node name {name!r} is reserved: its network namespace would take "
                "the name of the cluster's bridge namespace (`c`) or of a pod's (`-p<k>`)"
            )
        if name in seen:
            raise SpecError(f"{where}: duplicate node name {name!r}")
        seen.add(name)
        out.append(NodeSpec(name, i, node_ip(i), node_pod_cidr(i), node_gateway(i)))
    return tuple(out)


def _parse_namespaces(items: list[Any]) -> tuple[NamespaceSpec, ...]:
    _at_most(items, MAX_NAMESPACES, "namespaces")
    out: list[NamespaceSpec] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        where = f"namespaces[{i}]"
        m = _mapping(item, where, {"name", "labels"})
        name = _dns_label(_str(m, "name", where), where, "namespace name")
        if name in seen:
            raise SpecError(f"{where}: duplicate namespace {name!r}")
        seen.add(name)
        out.append(NamespaceSpec(name, _labels(m, "labels", where)))
    return tuple(out)


def _parse_pods(
    items: list[Any],
    nodes: tuple[NodeSpec, ...],
    namespaces: tuple[NamespaceSpec, ...],
    base_dir: Path,
) -> tuple[PodSpec, ...]:
    _at_most(items, MAX_PODS, "pods")
    by_node = {n.name: n for n in nodes}
    ns_names = {ns.name for ns in namespaces}
    keys = {"name", "namespace", "serviceAccount", "labels", "node", "ip", "command", "env"}
    keys.add("restartPolicy")
    # First pass: validate and collect explicit IPs, so allocation can skip them.
    raw: list[tuple[str, dict[str, Any], NodeSpec, IPv4Address | None]] = []
    claimed: dict[IPv4Address, str] = {}
    seen: set[tuple[str, str]] = set()
    for i, item in enumerate(items):
        where = f"pods[{i}]"
        m = _mapping(item, where, keys)
        name = _dns_label(_str(m, "name", where), where, "pod name")
        where = f"pods[{i}] ({name})"
        namespace = _str(m, "namespace", where)
        if namespace not in ns_names:
            raise SpecError(f"{where}: namespace {namespace!r} is not listed under 'namespaces'")
        if (namespace, name) in seen:
            raise SpecError(f"{where}: duplicate pod {namespace}/{name}")
        seen.add((namespace, name))
        node_name = _str(m, "node", where)
        node = by_node.get(node_name)
        if node is None:
            raise SpecError(
                f"{where}: unknown node {node_name!r}; known nodes: {', '.join(sorted(by_node))}"
            )
        ip: IPv4Address | None = None
        if "ip" in m:
            ip = _ipv4(m["ip"], f"{where}.ip")
            hosts_ok = ip in node.pod_cidr and ip not in (
                node.pod_cidr.network_address,
                node.gateway,
                node.pod_cidr.broadcast_address,
            )
            if not hosts_ok:
                raise SpecError(
                    f"{where}: ip {ip} is not a usable pod address of node {node.name} "
                    f"(pod CIDR {node.pod_cidr}, gateway {node.gateway})"
                )
            if ip in claimed:
                raise SpecError(f"{where}: ip {ip} is already used by pod {claimed[ip]}")
            claimed[ip] = f"{namespace}/{name}"
        raw.append((where, m, node, ip))
    taken = set(claimed)
    out: list[PodSpec] = []
    for where, m, node, ip in raw:
        resolved = ip if ip is not None else _allocate(node.pod_cidr, taken, FIRST_HOST_OFFSET)
        out.append(
            PodSpec(
                name=m["name"],
                namespace=m["namespace"],
                service_account=_dns_label(
                    _str(m, "serviceAccount", where, SERVICE_ACCOUNT), where, "serviceAccount"
                ),
                labels=_labels(m, "labels", where),
                node=node.name,
                ip=resolved,
                command=_command(m, where),
                env=_str_map(m, "env", where),
                restart_policy=_restart_policy(m, where),
            )
        )
    return tuple(out)


def _restart_policy(m: dict[str, Any], where: str) -> str:
    value = _str(m, "restartPolicy", where, DEFAULT_RESTART_POLICY)
    if value not in RESTART_POLICIES:
        raise SpecError(
            f"{where}.restartPolicy: {value!r} is not one of {', '.join(RESTART_POLICIES)}"
        )
    return value


def _parse_services(
    items: list[Any], namespaces: tuple[NamespaceSpec, ...]
) -> tuple[ServiceSpec, ...]:
    _at_most(items, MAX_SERVICES, "services")
    ns_names = {ns.name for ns in namespaces}
    raw: list[tuple[str, dict[str, Any], IPv4Address | None]] = []
    claimed: dict[IPv4Address, str] = {}
    seen: set[tuple[str, str]] = set()
    for i, item in enumerate(items):
        where = f"services[{i}]"
        m = _mapping(item, where, {"name", "namespace", "vip", "selector", "ports", "labels"})
        name = _dns_label(_str(m, "name", where), where, "service name")
        where = f"services[{i}] ({name})"
        namespace = _str(m, "namespace", where)
        if namespace not in ns_names:
            raise SpecError(f"{where}: namespace {namespace!r} is not listed under 'namespaces'")
        if (namespace, name) in seen:
            raise SpecError(f"{where}: duplicate service {namespace}/{name}")
        seen.add((namespace, name))
        vip: IPv4Address | None = None
        if "vip" in m:
            vip = _ipv4(m["vip"], f"{where}.vip")
            if vip not in SERVICE_CIDR or vip in (
                SERVICE_CIDR.network_address,
                SERVICE_CIDR.broadcast_address,
            ):
                raise SpecError(f"{where}: vip {vip} must be a host address in {SERVICE_CIDR}")
            if vip in claimed:
                raise SpecError(f"{where}: vip {vip} is already used by service {claimed[vip]}")
            claimed[vip] = f"{namespace}/{name}"
        raw.append((where, m, vip))
    taken = set(claimed)
    out: list[ServiceSpec] = []
    for where, m, vip in raw:
        resolved = vip if vip is not None else _allocate(SERVICE_CIDR, taken, FIRST_HOST_OFFSET)
        out.append(
            ServiceSpec(
                name=m["name"],
                namespace=m["namespace"],
                vip=resolved,
                selector=_labels(m, "selector", where),
                ports=_ports(m, where),
                labels=_labels(m, "labels", where),
            )
        )
    return tuple(out)


def _ports(m: dict[str, Any], where: str) -> tuple[PortSpec, ...]:
    items = _list(m, "ports", where, required=True)
    if not items:
        raise SpecError(f"{where}: 'ports' needs at least one entry")
    out: list[PortSpec] = []
    seen: set[int] = set()
    names: set[str] = set()
    for i, item in enumerate(items):
        pw = f"{where}.ports[{i}]"
        pm = _mapping(item, pw, {"port", "targetPort", "name", "appProtocol"})
        if "port" not in pm:
            raise SpecError(f"{pw}.port: is required")
        port = _port_number(pm["port"], f"{pw}.port")
        target = _port_number(pm.get("targetPort", port), f"{pw}.targetPort")
        if port in seen:
            raise SpecError(f"{pw}: duplicate service port {port}")
        seen.add(port)
        name = _str(pm, "name", pw, "")
        if name:
            _dns_label(name, pw, "port name")
            if name in names:
                raise SpecError(f"{pw}: duplicate port name {name!r}")
            names.add(name)
        app_protocol = _str(pm, "appProtocol", pw, "")
        if app_protocol and app_protocol.lower() not in APP_PROTOCOLS:
            raise SpecError(
                f"{pw}.appProtocol: {app_protocol!r} is not one of "
                f"{', '.join(sorted(APP_PROTOCOLS))} (any case)"
            )
        out.append(PortSpec(port, target, name, app_protocol))
    return tuple(out)


def _command(m: dict[str, Any], where: str) -> tuple[str, ...]:
    if "command" not in m:
        raise SpecError(f"{where}.command: is required (a list of strings)")
    cmd = m["command"]
    if not isinstance(cmd, list) or not cmd or not all(isinstance(a, str) for a in cmd):
        raise SpecError(f"{where}: 'command' must be a non-empty list of strings")
    return tuple(a.replace(PYTHON_PLACEHOLDER, sys.executable) for a in cmd)


# --- small typed readers: every raw value is checked once, here ---------------------------


# The shared strict reader: the cluster file's mistakes are worded as the mesh config's.
_R = Reader(SpecError)
_EMPTY: Mapping[str, str] = MappingProxyType({})
# The top level of the file: its errors say which file part they are about.
_TOP = Reader(SpecError, "cluster file: ")


def _reader(where: str) -> tuple[Reader, str]:
    return (_TOP, "") if where == "cluster file" else (_R, where)


def _mapping(value: Any, where: str, allowed: set[str]) -> dict[str, Any]:
    r, path = _reader(where)
    m = r.mapping(value, path, required=True)
    r.check_keys(m, allowed, path)
    return m


def _str(m: dict[str, Any], key: str, where: str, default: str | None = None) -> str:
    r, path = _reader(where)
    return r.string(m, key, path, default, empty_ok=default is not None)


def _list(m: dict[str, Any], key: str, where: str, required: bool = False) -> list[Any]:
    r, path = _reader(where)
    if required and m.get(key) is None:
        r.fail(join(path, key), "is required")
    return r.items(m.get(key), join(path, key))


def _str_map(m: dict[str, Any], key: str, where: str) -> Mapping[str, str]:
    r, path = _reader(where)
    value = m.get(key)
    return MappingProxyType(r.string_map(value, join(path, key))) if value else _EMPTY


def _labels(m: dict[str, Any], key: str, where: str) -> Mapping[str, str]:
    """A string map whose entries follow Kubernetes' label syntax."""
    labels = _str_map(m, key, where)
    problems = label_errors(labels)
    if problems:
        raise SpecError(f"{where}.{key}: {'; '.join(problems)}")
    return labels


def _at_most(items: list[Any], limit: int, key: str) -> None:
    if len(items) > limit:
        raise SpecError(f"at most {limit} entries under {key!r} are supported, got {len(items)}")


def _dns_label(value: str, where: str, what: str) -> str:
    if not _DNS_LABEL.match(value):
        raise SpecError(f"{where}: {what} {value!r} must be a DNS label ([a-z0-9-], max 63)")
    return value


def _ipv4(value: Any, where: str) -> IPv4Address:
    ip = _R.ip(value, where)
    if not isinstance(ip, IPv4Address):
        _R.fail(where, f"{value!r} is not an IPv4 address (the local cluster is IPv4 only)")
    return ip


def _port_number(value: Any, where: str) -> int:
    return _R.port(value, where)
