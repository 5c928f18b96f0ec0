"""What a CONNECT to the waypoint asks for, decided before any byte is read (pure).

The tunnel sends the ORIGINAL destination as the CONNECT authority (waypoint.md): a service
`VIP:port` selects that service's routes, a `podIP:port` the direct path to that pod. The
waypoint serves only what is bound to it (the service's or the workload's `waypoint` names
it): anything else is refused, so a waypoint is never an open proxy into the mesh.

The port's declared protocol picks the codec: `appProtocol`, else the port name's prefix
(Istio's rule); a port that declares nothing is sniffed.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass

from meshcore.state import (
    AppProtocol,
    GatewayAddress,
    MeshState,
    Service,
    Workload,
    port_protocol,
)


class L7Protocol(enum.Enum):
    HTTP = "http"  # HTTP/1.1 (and HTTP/2 when the client upgrades by prior knowledge)
    HTTP2 = "http2"
    GRPC = "grpc"
    TCP = "tcp"  # passed through, never parsed
    UNDECLARED = "undeclared"  # sniffed


# The port's declared protocol (Istio's rule, `meshcore.state.port_protocol`) -> what we
# speak. TLS is passed through: the waypoint cannot read it.
_SPEAK = {
    AppProtocol.HTTP11: L7Protocol.HTTP,
    AppProtocol.HTTP2: L7Protocol.HTTP2,
    AppProtocol.GRPC: L7Protocol.GRPC,
    AppProtocol.TCP: L7Protocol.TCP,
    AppProtocol.TLS: L7Protocol.TCP,
    AppProtocol.UNKNOWN: L7Protocol.UNDECLARED,
}


@dataclass(frozen=True, slots=True)
class Me:
    """This waypoint as bindings name it: its Service key ("ns/host") and its own IPs."""

    service_key: str
    ips: frozenset[str]

    def named_by(self, address: GatewayAddress | None, state: MeshState | None = None) -> bool:
        """Whether a binding names this waypoint: by its Service's hostname, one of its pod
        IPs, or (with the mesh state) its Service's VIP, as istiod writes a binding when the
        waypoint Service has a ClusterIP."""
        if address is None:
            return False
        if address.hostname is not None:
            return address.hostname == self.service_key
        assert address.address is not None
        if str(address.address.ip) in self.ips:
            return True
        if state is None:
            return False
        svc = state.service_by_vip(address.address.network, address.address.ip)
        return svc is not None and svc.key == self.service_key


@dataclass(frozen=True, slots=True)
class Destination:
    """A request stream the waypoint serves."""

    ip: str
    port: int
    # Exactly one: the service whose VIP was dialled, or the pod dialled directly.
    service: Service | None
    workload: Workload | None
    protocol: L7Protocol

    @property
    def authority(self) -> str:
        return f"{self.ip}:{self.port}" if ":" not in self.ip else f"[{self.ip}]:{self.port}"


@dataclass(frozen=True, slots=True)
class Refused:
    status: int  # the CONNECT's answer
    reason: str


def parse_authority(authority: str) -> tuple[str, int] | None:
    """`ip:port` or `[v6]:port`; None if it is neither (hostnames are not destinations)."""
    host, sep, port_text = authority.rpartition(":")
    # ASCII digits only: str.isdigit() also takes "²" (latin-1 0xb2, which HPACK hands on),
    # which int() refuses. Leading zeros aside, a port has at most five digits; a longer
    # run (int() refuses more than 4300 digits) is no port either.
    if not sep or not (port_text.isascii() and port_text.isdigit()):
        return None
    if len(port_text.lstrip("0")) > 5:
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    port = int(port_text.lstrip("0") or "0")
    if not 1 <= port <= 65535:
        return None
    return str(ip), port


def _port_protocol(service: Service, port: int) -> L7Protocol:
    return _SPEAK[port_protocol(service, port)]


def resolve(state: MeshState, network: str, me: Me, authority: str) -> Destination | Refused:
    """The destination a CONNECT names, or why it is refused (400: not an address; 404: no
    such service or pod; 403: it exists but does not use this waypoint)."""
    parsed = parse_authority(authority)
    if parsed is None:
        return Refused(400, f"CONNECT authority {authority!r} is not an ip:port")
    ip, port = parsed
    addr = ipaddress.ip_address(ip)
    service = state.service_by_vip(network, addr)
    if service is not None:
        if not me.named_by(service.waypoint, state):
            return Refused(403, f"service {service.key} does not use this waypoint")
        if service.target_port(port) is None:
            return Refused(404, f"service {service.key} has no port {port}")
        return Destination(ip, port, service, None, _port_protocol(service, port))
    workload = state.workload_by_ip(network, addr)
    if workload is not None:
        if not me.named_by(workload.waypoint, state):
            return Refused(
                403, f"workload {workload.namespace}/{workload.name} does not use this waypoint"
            )
        return Destination(ip, port, None, workload, _workload_protocol(state, workload, port))
    return Refused(404, f"{authority} is neither a service nor a workload of the mesh")


def _workload_protocol(state: MeshState, workload: Workload, port: int) -> L7Protocol:
    """A pod dialled directly: the protocol its services declare for that target port."""
    for key, mapping in workload.services:
        service = state.service_by_key(key)
        if service is None:
            continue
        for service_port, target_port in mapping:
            if target_port == port:
                return _port_protocol(service, service_port)
        for entry in service.ports:
            if entry.target_port == port:
                return _port_protocol(service, entry.port)
    return L7Protocol.UNDECLARED
