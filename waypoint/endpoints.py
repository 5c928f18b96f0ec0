"""Where a destination's traffic may go (pure): the healthy HBONE endpoints of the service
(with each one's target port), or the one pod dialled directly."""

from __future__ import annotations

from dataclasses import dataclass, field

from meshcore.state import HealthStatus, MeshState, Service, TunnelProtocol, Workload


@dataclass(frozen=True, slots=True)
class Endpoint:
    workload: Workload
    ip: str
    port: int  # the pod's own port (the service's target port)
    # "ip:port", the key of the endpoint's balancer, outlier and pool books; made once (a
    # request reads it several times).
    address: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "address", f"{self.ip}:{self.port}")


def service_endpoints(state: MeshState, service: Service, port: int) -> tuple[Endpoint, ...]:
    """Healthy endpoints of `service` for its `port`, in a stable order. Only HBONE
    workloads: the waypoint's upstream leg is always HBONE (a plaintext endpoint would let
    the waypoint's traffic cross the network unencrypted). Listed once per mesh state."""

    def listed() -> tuple[Endpoint, ...]:
        default_target = service.target_port(port)
        out: list[Endpoint] = []
        for w in state.endpoints(service):
            if w.status is not HealthStatus.HEALTHY or w.protocol is not TunnelProtocol.HBONE:
                continue
            if not w.ips:
                continue
            target = w.target_port(service.key, port) or default_target
            if target is None:
                continue
            out.append(Endpoint(w, str(w.ips[0]), target))
        out.sort(key=lambda e: (e.ip, e.port))
        return tuple(out)

    return state.per_port("waypoint.endpoints", service, port, listed)


def direct_endpoint(workload: Workload, ip: str, port: int) -> Endpoint | None:
    if workload.protocol is not TunnelProtocol.HBONE:
        return None
    return Endpoint(workload, ip, port)
