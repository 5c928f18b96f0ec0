"""One running waypoint: its configuration, certificates, mesh state, HBONE server,
upstream pool and proxy, and what its readiness and admin ports report about it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import structlog

from meshcore import tls
from meshcore.admin.views import service_json, workload_json
from meshcore.hbone.server import Guard
from meshcore.identity.certs import (
    CertificateClient,
    CertificateManager,
    LocalCAClient,
    WorkloadCertificate,
)
from meshcore.identity.spiffe import SpiffeId
from meshcore.observability.metrics import TcpMetrics
from meshcore.state import MeshState
from meshcore.xds.source import ConfigSource, open_source
from waypoint.config import WaypointConfig
from waypoint.destination import Me
from waypoint.l7config import L7Config
from waypoint.proxy import WaypointProxy
from waypoint.router import Router
from waypoint.server import WaypointServer
from waypoint.telemetry.metrics import RequestMetrics
from waypoint.upstream import ClientTls, Upstream

if TYPE_CHECKING:
    from waypoint.telemetry.export import OtlpExporter

log = structlog.get_logger("waypoint")

DNS_DOMAIN = "cluster.local"


def me_of(cfg: WaypointConfig) -> Me:
    """This waypoint as bindings name it: the Service istiod (and the local cluster)
    creates for a Gateway is `<name>.<ns>.svc.cluster.local`."""
    host = f"{cfg.name}.{cfg.namespace}.svc.{DNS_DOMAIN}"
    return Me(f"{cfg.namespace}/{host}", frozenset({str(cfg.pod_ip)}))


class Waypoint:
    """The running waypoint: the admin and readiness servers' source."""

    def __init__(
        self,
        cfg: WaypointConfig,
        certs: CertificateManager | None = None,
        state: MeshState | None = None,
    ) -> None:
        """`certs` and `state` replace the CA socket and the config file (tests on
        loopback pass an in-memory CA and a built `MeshState`)."""
        self.cfg = cfg
        self.identity = SpiffeId(cfg.trust_domain, cfg.namespace, cfg.account)
        self.metrics = TcpMetrics()
        self.guard = Guard(cfg.hbone_limits, self.metrics.hbone_refused)
        self.state = state if state is not None else MeshState.empty()
        # Strangers to the mesh share part of the handshake bound (the tunnel's rule).
        self.guard.gate.group_of = lambda source: self.state.source_group(source)
        # The mesh state's source (the local file or the discovery server), opened by
        # `start`; None when a test passed the state in.
        self.watcher: ConfigSource | None = None
        self._own_source = state is None
        if certs is None:
            certs = CertificateManager(_ca_client(cfg), ttl=timedelta(seconds=cfg.cert_ttl_seconds))
        self.certs = certs
        self.cert: WorkloadCertificate | None = None
        self._client_tls: ClientTls | None = None  # None until the first certificate
        self.upstream = Upstream(
            self.identity, lambda: self._client_tls, str(cfg.pod_ip), self.guard
        )
        self.l7 = L7Config.build(self.state, cfg.namespace, cfg.name)
        self.request_metrics = RequestMetrics()
        self.exporter: OtlpExporter | None = None
        if cfg.otlp_endpoint:
            # Loaded only when traces are exported: protobuf costs about 5 MB resident.
            from waypoint.telemetry.export import ExportSettings, OtlpExporter

            settings = ExportSettings(cfg.otlp_endpoint, f"{cfg.name}.{cfg.namespace}")
            self.exporter = OtlpExporter(settings)
        self.router = Router(
            lambda: self.state,
            lambda: self.l7,
            self.upstream,
            self.request_metrics,
            lambda: self.server.network,
            self.exporter,
        )
        self.proxy = WaypointProxy(
            lambda: self.state,
            self.upstream,
            self.router,
            draining=lambda: self.draining,
            sniff_timeout=cfg.sniff_timeout,
            http1_limits=cfg.http1_limits,
            http2_limits=cfg.http2_limits,
        )
        self.me = me_of(cfg)
        self.server = WaypointServer(
            self.me, "", cfg.trust_domain, lambda: self.state, self.proxy.serve, self.guard
        )
        self.quit_requested = asyncio.Event()
        self.draining = False
        self.started = time.time()

    def _on_state(self, state: MeshState) -> None:
        self.state = state
        self.l7 = L7Config.build(state, self.cfg.namespace, self.cfg.name)
        for message in self.l7.messages:
            log.warning("route config", message=message)

    async def start(self) -> None:
        if self._own_source:
            cfg = self.cfg
            self.watcher = await open_source(
                cfg.local_xds_path,
                cfg.xds,
                # Istio's node id shape: <type>~<ip>~<pod>.<namespace>~<namespace>.svc.<domain>
                node_id=f"router~{cfg.pod_ip}~{cfg.name}.{cfg.namespace}~"
                f"{cfg.namespace}.svc.{DNS_DOMAIN}",
                trust_domain=cfg.trust_domain,
                on_update=self._on_state,
                token_path=cfg.ca_token_path,
            )
        self._on_state(self.watcher.current if self.watcher is not None else self.state)
        if self.exporter is not None:
            self.exporter.start()
        mine = [w for w in self.state.workloads if self.cfg.pod_ip in w.ips]
        # Services and workloads live on a network; the waypoint's own workload says which.
        self.server.network = mine[0].network if mine else ""
        self.cert = await self.certs.get(self.identity)
        self._client_tls = _client_tls(self.cert)
        self.certs.on_update(self._on_cert)
        await self.server.start(
            tls.server_context(self.cert), str(self.cfg.pod_ip), self.cfg.hbone_port
        )

    def _on_cert(self, cert: WorkloadCertificate) -> None:
        if cert.identity != self.identity:
            return
        self.cert = cert
        # New upstream connections use the new certificate; open ones keep theirs (the pool
        # gives them no new stream once their certificates are about to expire).
        self._client_tls = _client_tls(cert)
        # A new listener with the new certificate beside the old one (SO_REUSEPORT).
        self.server.tasks.spawn(
            self.server.start(tls.server_context(cert), str(self.cfg.pod_ip), self.cfg.hbone_port),
            "rotate-15008",
        )

    # ---- ReadinessSource / AdminSource ---------------------------------------------------

    def status(self) -> dict[str, Any]:
        problems = []
        if self.cert is None:
            problems.append("no certificate yet")
        if self.server.listener is None:
            problems.append("not listening on 15008")
        if self.draining:
            problems.append("draining")
        config = self.watcher.status if self.watcher is not None else None
        return {
            "ready": not problems,
            "problems": problems,
            "waypoint": f"{self.cfg.namespace}/{self.cfg.name}",
            "identity": str(self.identity),
            "address": self.server.address,
            "config_digest": config.digest if config is not None else None,
            "streams": self.server.busy,
        }

    def config_dump(self) -> dict[str, Any]:
        state = self.state
        pool = self.upstream.pool
        return {
            "waypoint": self.status(),
            # Upstream HBONE connections open, and those drained because a certificate they
            # were made with was about to expire (rotation), as the tunnel's `hbonePool`.
            "upstreamPool": {"connections": len(pool.connections()), "retired": pool.retired},
            "services": [
                service_json(state, s)
                for s in state.services
                if self.me.named_by(s.waypoint, state)
            ],
            "workloads": [
                workload_json(w) for w in state.workloads if self.me.named_by(w.waypoint, state)
            ],
        }

    def connections(self) -> list[dict[str, Any]]:
        return [
            {
                "authority": inbound.destination.authority,
                "peer": str(inbound.peer),
                "client": str(inbound.client),
                "sent": stream.sent,
                "received": stream.received,
            }
            for stream, inbound in self.server.streams.items()
        ]

    def explain(self, source: str, destination: str) -> dict[str, Any]:
        raise ValueError("explain runs on the tunnel's admin port, not the waypoint's")

    def request_quit(self) -> None:
        self.quit_requested.set()

    async def drain(self) -> None:
        self.draining = True
        self.server.stop_accepting()
        self.server.drain()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.server.idle.wait(), self.cfg.drain_seconds)

    def render(self) -> bytes:
        """15020: the request metrics and the HBONE refusals."""
        return self.request_metrics.render() + self.metrics.render()

    async def close(self) -> None:
        await self.server.close()
        if self.exporter is not None:
            await self.exporter.shutdown()
        self.upstream.close()
        if self.watcher is not None:
            await self.watcher.close()
        await self.certs.close()


def _client_tls(cert: WorkloadCertificate) -> ClientTls:
    return ClientTls(tls.client_context(cert), cert.not_after.timestamp())


def _ca_client(cfg: WaypointConfig) -> CertificateClient:
    """The CA socket (local cluster), or an Istio-compatible CA over gRPC (Kubernetes): the
    call is made by a certificate worker child, as the tunnel's is. A waypoint asks for its
    own identity, so without impersonation."""
    if cfg.ca_grpc is not None:
        from meshcore.identity.certworker_client import CertWorkerClient
        from meshcore.identity.istio_ca import IstioCAClient

        return IstioCAClient(cfg.ca_grpc, CertWorkerClient(), impersonate=False)
    assert cfg.ca_address is not None  # parse_config sets one of the two
    return LocalCAClient(cfg.ca_address, cfg.ca_token_path.read_text().strip())
