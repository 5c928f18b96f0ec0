"""The discovery path at scale, on loopback: a mesh of N workloads (default 20 000) and
N/10 services served over TLS; the time to build the server's snapshot, for a client to hold
its first full state, and for one changed workload to reach it; and the bytes of the first
push. `python benchmarks/xds_scale.py [N]`."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc

from controlplane.ca import CertificateAuthority
from controlplane.xds.auth import SubscriberAuth
from controlplane.xds.server import XdsServer, snapshot_of
from controlplane.xds.tls import bind, server_credentials, server_identity
from meshcore.state import (
    GatewayAddress,
    HealthStatus,
    MeshState,
    NetworkAddress,
    Service,
    ServicePort,
    TunnelProtocol,
    Workload,
)
from meshcore.xds import messages as m
from meshcore.xds.client import XdsClient, XdsTarget
from meshcore.xds.convert import RESOURCE_TYPES
from meshcore.xds.grpc import client_context


def mesh(n: int) -> MeshState:
    services = [
        Service(
            f"s{i}",
            "ns",
            f"s{i}.ns.svc.cluster.local",
            (NetworkAddress("", ipaddress.IPv4Address(0x0A600000 + i)),),
            (ServicePort(80, 8080, "http"),),
            (),
            GatewayAddress(hostname="ns/wp.ns.svc.cluster.local") if i % 7 == 0 else None,
        )
        for i in range(max(1, n // 10))
    ]
    workloads = [
        Workload(
            uid=f"c//Pod/ns/w{i}",
            name=f"w{i}",
            namespace="ns",
            service_account=f"sa{i % 50}",
            trust_domain="cluster.local",
            ips=(ipaddress.IPv4Address(0x0AF40000 + i),),
            network="",
            protocol=TunnelProtocol.HBONE,
            node=f"node{i % 20}",
            canonical_name=f"app{i % 100}",
            canonical_revision="v1",
            workload_name=f"app{i % 100}",
            workload_type="deployment",
            cluster_id="Kubernetes",
            status=HealthStatus.HEALTHY,
            waypoint=None,
            services=((services[i % len(services)].key, ((80, 8080),)),),
            labels=(("app", f"app{i % 100}"),),
        )
        for i in range(n)
    ]
    return MeshState.build(workloads, services, [])


async def main(n: int) -> None:
    state = mesh(n)
    t0 = time.perf_counter()
    snap = snapshot_of(state)
    t_snap = time.perf_counter() - t0
    size = sum(len(body) for named in snap.values() for _, body in named.values())
    ca = CertificateAuthority.create("cluster.local")
    # What a push costs, not an authentication: every subscriber is served.
    xds = XdsServer(state, auth=SubscriberAuth.unauthenticated("cluster.local"))
    server = grpc.aio.server()
    xds.add_to_server(server)
    port = bind(server, "127.0.0.1:0", server_credentials(ca))
    await server.start()
    got = asyncio.Event()
    target = XdsTarget(
        "127.0.0.1", port, client_context(ca.roots_pem()), server_identity("cluster.local")
    )
    client = XdsClient(target, m.Node(id="bench"), lambda _s: got.set(), RESOURCE_TYPES)
    t0 = time.perf_counter()
    await client.start(wait=float(sys.argv[2]) if len(sys.argv) > 2 else 300)
    t_first = time.perf_counter() - t0
    got.clear()
    changed = list(state.workloads)
    changed[0] = dataclasses.replace(changed[0], status=HealthStatus.UNHEALTHY)
    t0 = time.perf_counter()
    xds.update(MeshState.build(changed, state.services, []))
    await got.wait()
    t_update = time.perf_counter() - t0
    await client.close()
    await server.stop(None)
    print(f"workloads={n} services={len(state.services)} resource_bytes={size}")
    print(f"snapshot_build_s={t_snap:.2f} first_state_s={t_first:.2f} one_change_s={t_update:.2f}")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 20000))
