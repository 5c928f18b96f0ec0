"""The cluster's network, built from network namespaces, veth pairs and bridges.

Topology (all of it inside namespaces this module creates; nothing in the root namespace):

    <c>-c          bridge br0, one port `vn<i>` per node; in Kubernetes mode also "the host"
                   (an address on br0, where the kubelet serves the API server and the
                   cluster DNS) and a route back to every node's pod CIDR via that node
    <c>-<node>     eth0 = node IP/24 on br0; bridge cni0 = pod gateway/24; ip_forward=1;
                   a route to every other node's pod CIDR via that node's IP;
                   kube-proxy-style DNAT for service VIPs (chain AMB-SERVICES)
    <c>-<node>-p<k>  eth0 = pod IP/24 on cni0 (node side `vp<k>`), default route via gateway
    <c>-<node>-w<k>  a waypoint pod, the same (node side `vw<k>`); k is its recorded slot

Invariants:
- every veth is created with its peer placed directly in the target namespace, so no
  interface ever exists in the root namespace, not even for an instant;
- each netns is recorded (Recorder.record_netns) BEFORE it is created, so teardown after a
  crash finds everything;
- planning (names, addresses, rules text) is pure; only `build_network`,
  `apply_service_rules` and `ensure_host_network` do I/O.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Protocol

from pyroute2 import IPRoute, NetlinkError
from pyroute2 import netns as pr_netns

import nsutil
from localcluster.gateways import GatewaySpec
from localcluster.spec import SERVICE_CIDR, ClusterSpec, NodeSpec

CLUSTER_BRIDGE = "br0"
NODE_BRIDGE = "cni0"
POD_IFNAME = "eth0"
NODE_IFNAME = "eth0"
SERVICES_CHAIN = "AMB-SERVICES"
POSTROUTING_CHAIN = "AMB-POSTROUTING"
IPTABLES_TIMEOUT = 20.0


class NetworkError(RuntimeError):
    """Building the cluster network failed; the message says which step and object."""


class Recorder(Protocol):
    """What the builder needs from the cluster state: a durable note per netns."""

    def record_netns(self, name: str) -> None: ...


@dataclass(frozen=True, slots=True)
class NodeLayout:
    name: str
    index: int
    netns: str
    ip: IPv4Address
    pod_cidr: IPv4Network
    gateway: IPv4Address
    bridge_port: str  # the node's veth end in the cluster netns

    @property
    def netns_path(self) -> str:
        return nsutil.netns_path(self.netns)


@dataclass(frozen=True, slots=True)
class PodLayout:
    namespace: str
    name: str
    node: str
    netns: str
    ip: IPv4Address
    gateway: IPv4Address
    host_ifname: str  # the pod's veth end in the node netns, a port of cni0

    @property
    def netns_path(self) -> str:
        return nsutil.netns_path(self.netns)


@dataclass(frozen=True, slots=True)
class NetworkLayout:
    cluster: str
    cluster_netns: str
    nodes: tuple[NodeLayout, ...]
    pods: tuple[PodLayout, ...]

    @property
    def cluster_netns_path(self) -> str:
        return nsutil.netns_path(self.cluster_netns)

    def node(self, name: str) -> NodeLayout:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(f"no node {name!r} in layout of {self.cluster!r}")

    def pod(self, namespace: str, name: str) -> PodLayout:
        for p in self.pods:
            if p.namespace == namespace and p.name == name:
                return p
        raise KeyError(f"no pod {namespace}/{name} in layout of {self.cluster!r}")

    def all_netns(self) -> tuple[str, ...]:
        return (
            self.cluster_netns,
            *(n.netns for n in self.nodes),
            *(p.netns for p in self.pods),
        )


# --- planning (pure) ---------------------------------------------------------------------


def plan_layout(spec: ClusterSpec) -> NetworkLayout:
    nodes = tuple(
        NodeLayout(
            name=n.name,
            index=n.index,
            netns=f"{spec.name}-{n.name}",
            ip=n.ip,
            pod_cidr=n.pod_cidr,
            gateway=n.gateway,
            bridge_port=f"vn{n.index}",
        )
        for n in spec.nodes
    )
    pods: list[PodLayout] = []
    for n in spec.nodes:
        for k, pod in enumerate(spec.pods_on(n.name), start=1):
            pods.append(
                PodLayout(
                    namespace=pod.namespace,
                    name=pod.name,
                    node=n.name,
                    netns=f"{spec.name}-{n.name}-p{k}",
                    ip=pod.ip,
                    gateway=n.gateway,
                    host_ifname=f"vp{k}",
                )
            )
    # Keep file order for pods: callers iterate spec.pods and layout.pods side by side.
    order = {(p.namespace, p.name): i for i, p in enumerate(spec.pods)}
    pods.sort(key=lambda p: order[(p.namespace, p.name)])
    # Waypoints after them, named by their recorded slot: adding or removing one never
    # renames another's namespace.
    pods += [waypoint_layout(spec, g) for g in spec.gateways]
    return NetworkLayout(spec.name, f"{spec.name}-c", nodes, tuple(pods))


def waypoint_layout(spec: ClusterSpec, g: GatewaySpec) -> PodLayout:
    p = g.placed()
    node = spec.node(p.node)
    return PodLayout(
        namespace=g.namespace,
        name=g.pod_name,
        node=node.name,
        netns=f"{spec.name}-{node.name}-w{p.slot}",
        ip=p.ip,
        gateway=node.gateway,
        host_ifname=f"vw{p.slot}",
    )


@dataclass(frozen=True, slots=True)
class HostNetwork:
    """The host's address on br0 in the cluster netns, and the routes its answers take:
    each node's pod CIDR via that node's IP (pods of every node reach the host)."""

    address: IPv4Address
    prefixlen: int
    routes: tuple[tuple[IPv4Network, IPv4Address], ...]


def plan_host_network(layout: NetworkLayout, address: IPv4Address, prefixlen: int) -> HostNetwork:
    net = IPv4Network(f"{address}/{prefixlen}", strict=False)
    taken = {n.ip for n in layout.nodes}
    if address in taken or address in (net.network_address, net.broadcast_address):
        raise ValueError(f"host address {address} is a node's or not a host of {net}")
    if any(n.ip not in net for n in layout.nodes):
        raise ValueError(f"host address {address}/{prefixlen} does not share the nodes' network")
    return HostNetwork(address, prefixlen, tuple((n.pod_cidr, n.ip) for n in layout.nodes))


def service_rules(
    spec: ClusterSpec,
    node: NodeSpec,
    install_jumps: bool,
    not_ready: frozenset[tuple[str, str]] = frozenset(),
) -> str:
    """iptables-restore input (for --noflush) with the node's service DNAT; a pod in
    `not_ready` (its app is not running) is no endpoint, as kube-proxy leaves it out.

    Declaring the chains flushes them, so applying the text again replaces the rules
    rather than duplicating them; the jumps from the built-in chains are added only once,
    when the node is built (`install_jumps`).
    """
    lines = ["*nat", f":{SERVICES_CHAIN} - [0:0]", f":{POSTROUTING_CHAIN} - [0:0]"]
    if install_jumps:
        lines += [
            f"-A PREROUTING -j {SERVICES_CHAIN}",
            f"-A OUTPUT -j {SERVICES_CHAIN}",
            f"-A POSTROUTING -j {POSTROUTING_CHAIN}",
        ]
    for svc in spec.all_services():
        endpoints = [p for p in spec.endpoints(svc) if (p.namespace, p.name) not in not_ready]
        for port in svc.ports:
            match = f"-A {SERVICES_CHAIN} -d {svc.vip}/32 -p tcp -m tcp --dport {port.port}"
            comment = f'-m comment --comment "{svc.namespace}/{svc.name}:{port.port}"'
            for j, ep in enumerate(endpoints):
                remaining = len(endpoints) - j
                # Rule j takes 1/(n-j) of what rules before it left: a uniform choice.
                pick = (
                    f"-m statistic --mode random --probability {1 / remaining:.10f} "
                    if remaining > 1
                    else ""
                )
                lines.append(
                    f"{match} {comment} {pick}-j DNAT --to-destination {ep.ip}:{port.target_port}"
                )
    # Hairpin: client and endpoint on the same cni0 would answer each other directly over
    # the bridge, bypassing the node's conntrack (no un-DNAT). Masquerading DNATed flows
    # that leave by cni0 sends replies back through the node.
    lines.append(
        f"-A {POSTROUTING_CHAIN} -s {node.pod_cidr} -o {NODE_BRIDGE} "
        "-m conntrack --ctstate DNAT -j MASQUERADE"
    )
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


# --- building (I/O) ----------------------------------------------------------------------


@contextmanager
def _step(what: str) -> Iterator[None]:
    try:
        yield
    except NetlinkError as e:
        raise NetworkError(f"{what}: netlink error {e.code} ({e})") from e
    except OSError as e:
        raise NetworkError(f"{what}: {e}") from e


def _index(ipr: IPRoute, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise NetworkError(f"interface {ifname} did not appear after creation")
    return int(found[0])


def _create_netns(name: str, recorder: Recorder) -> None:
    recorder.record_netns(name)  # before: a crash right after creation is still covered
    with _step(f"create netns {name}"):
        pr_netns.create(name)
    with _step(f"lo up in {name}"), IPRoute(netns=name) as ipr:
        ipr.link("set", index=_index(ipr, "lo"), state="up")


def _write_sysctl(netns: str, key: str, value: str) -> None:
    # /proc/sys/net shows the namespace of the thread that opens it.
    fd = nsutil.open_netns(nsutil.netns_path(netns))
    try:
        with nsutil.entered(fd), open(f"/proc/sys/{key.replace('.', '/')}", "w") as f:
            f.write(value)
    finally:
        os.close(fd)


def build_network(spec: ClusterSpec, state: Recorder) -> NetworkLayout:
    """Create every namespace, link, address and route of the cluster, then service rules.

    Refuses to run over leftovers: an existing `<cluster>-*` netns means a previous cluster
    was not torn down.
    """
    layout = plan_layout(spec)
    prefix = f"{spec.name}-"
    leftovers = sorted(n for n in pr_netns.listnetns() if n.startswith(prefix))
    if leftovers:
        raise NetworkError(
            f"cluster {spec.name!r} already has namespaces {', '.join(leftovers)}; "
            "tear it down first"
        )
    _create_netns(layout.cluster_netns, state)
    with (
        _step(f"bridge {CLUSTER_BRIDGE} in {layout.cluster_netns}"),
        IPRoute(netns=layout.cluster_netns) as ipr,
    ):
        ipr.link("add", ifname=CLUSTER_BRIDGE, kind="bridge")
        ipr.link("set", index=_index(ipr, CLUSTER_BRIDGE), state="up")

    for node in layout.nodes:
        _build_node(layout, node, state)
    for node in layout.nodes:
        with _step(f"routes in {node.netns}"), IPRoute(netns=node.netns) as ipr:
            for other in layout.nodes:
                if other.name != node.name:
                    ipr.route("add", dst=str(other.pod_cidr), gateway=str(other.ip))
            # Lets processes in the node netns reach VIPs: the OUTPUT DNAT needs a route
            # lookup to succeed first; after DNAT the packet is re-routed to the endpoint.
            ipr.route("add", dst=str(SERVICE_CIDR), oif=_index(ipr, NODE_BRIDGE))
    for pod in layout.pods:
        _build_pod(layout.node(pod.node), pod, state)
    for node_spec in spec.nodes:
        node = layout.node(node_spec.name)
        apply_iptables(node.netns_path, service_rules(spec, node_spec, install_jumps=True))
    return layout


def _build_node(layout: NetworkLayout, node: NodeLayout, state: Recorder) -> None:
    _create_netns(node.netns, state)
    with (
        _step(f"veth {node.bridge_port} <-> {node.netns}/{NODE_IFNAME}"),
        IPRoute(netns=layout.cluster_netns) as ipr,
    ):
        ipr.link(
            "add",
            ifname=node.bridge_port,
            kind="veth",
            peer={"ifname": NODE_IFNAME, "net_ns_fd": node.netns},
        )
        ipr.link(
            "set",
            index=_index(ipr, node.bridge_port),
            master=_index(ipr, CLUSTER_BRIDGE),
            state="up",
        )
    with _step(f"addresses in {node.netns}"), IPRoute(netns=node.netns) as ipr:
        eth = _index(ipr, NODE_IFNAME)
        ipr.addr("add", index=eth, address=str(node.ip), prefixlen=24)
        ipr.link("set", index=eth, state="up")
        ipr.link("add", ifname=NODE_BRIDGE, kind="bridge")
        br = _index(ipr, NODE_BRIDGE)
        ipr.addr("add", index=br, address=str(node.gateway), prefixlen=node.pod_cidr.prefixlen)
        ipr.link("set", index=br, state="up")
    with _step(f"ip_forward in {node.netns}"):
        _write_sysctl(node.netns, "net.ipv4.ip_forward", "1")


def build_pod(node: NodeLayout, pod: PodLayout, state: Recorder) -> None:
    """One pod's namespace, veth and addresses on a running node (a waypoint added later)."""
    _build_pod(node, pod, state)


def remove_pod_netns(pod: PodLayout) -> bool:
    """Remove a pod's namespace (its veth goes with it); False if it was not there."""
    if not os.path.exists(pod.netns_path):
        return False
    with _step(f"remove netns {pod.netns}"):
        pr_netns.remove(pod.netns)
    return True


def _build_pod(node: NodeLayout, pod: PodLayout, state: Recorder) -> None:
    _create_netns(pod.netns, state)
    with (
        _step(f"veth {node.netns}/{pod.host_ifname} <-> {pod.netns}/{POD_IFNAME}"),
        IPRoute(netns=node.netns) as ipr,
    ):
        ipr.link(
            "add",
            ifname=pod.host_ifname,
            kind="veth",
            peer={"ifname": POD_IFNAME, "net_ns_fd": pod.netns},
        )
        ipr.link(
            "set",
            index=_index(ipr, pod.host_ifname),
            master=_index(ipr, NODE_BRIDGE),
            state="up",
        )
    with (
        _step(f"address of pod {pod.namespace}/{pod.name} in {pod.netns}"),
        IPRoute(netns=pod.netns) as ipr,
    ):
        eth = _index(ipr, POD_IFNAME)
        ipr.addr("add", index=eth, address=str(pod.ip), prefixlen=node.pod_cidr.prefixlen)
        ipr.link("set", index=eth, state="up")
        ipr.route("add", dst="0.0.0.0/0", gateway=str(pod.gateway))


def ensure_host_network(layout: NetworkLayout, host: HostNetwork) -> None:
    """Give br0 the host's address and the cluster netns the routes back to the pods;
    what is already there stays (a restarted kubelet calls this again)."""
    with (
        _step(f"host address {host.address} in {layout.cluster_netns}"),
        IPRoute(netns=layout.cluster_netns) as ipr,
    ):
        br = _index(ipr, CLUSTER_BRIDGE)
        try:
            ipr.addr("add", index=br, address=str(host.address), prefixlen=host.prefixlen)
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise
        for dst, via in host.routes:
            ipr.route("replace", dst=str(dst), gateway=str(via))


def apply_iptables(netns_path: str, rules: str) -> None:
    """One `iptables-restore --noflush` inside the namespace; errors carry iptables' words."""
    try:
        done = subprocess.run(
            ["iptables-restore", "--noflush"],
            input=rules.encode(),
            capture_output=True,
            timeout=IPTABLES_TIMEOUT,
            preexec_fn=nsutil.preexec_enter(netns_path),
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as e:
        raise NetworkError(f"iptables-restore in {netns_path}: {e}") from e
    if done.returncode != 0:
        raise NetworkError(
            f"iptables-restore in {netns_path} failed ({done.returncode}): "
            f"{done.stderr.decode(errors='replace').strip()}"
        )


def apply_service_rules(
    spec: ClusterSpec,
    layout: NetworkLayout,
    not_ready: frozenset[tuple[str, str]] = frozenset(),
) -> None:
    """Replace every node's service DNAT after the services or endpoints changed."""
    for node_spec in spec.nodes:
        rules = service_rules(spec, node_spec, install_jumps=False, not_ready=not_ready)
        apply_iptables(layout.node(node_spec.name).netns_path, rules)
