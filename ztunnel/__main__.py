"""`python -m ztunnel`: run the tunnel of one node (configuration from the environment)."""

from __future__ import annotations

import meshcore.runtime.lean  # noqa: F401  (first: before anything imports structlog)

# isort: split
import asyncio
import os
import signal
import sys
from datetime import timedelta
from typing import TYPE_CHECKING

import structlog

from meshcore.admin.readiness import ReadinessServer
from meshcore.admin.server import AdminServer, MetricsServer, process_metrics
from meshcore.identity.certs import CertificateClient, CertificateManager, LocalCAClient
from meshcore.identity.certworker_client import CertWorkerClient
from meshcore.identity.istio_ca import IstioCAClient
from meshcore.runtime import malloc
from meshcore.runtime.entry import run_process
from meshcore.state import IPAddress
from meshcore.xds.source import open_source
from ztunnel.config import DNS_RESOLV_CONF, TUNNEL_WORKERS, Config, parse_config
from ztunnel.dns.resolvconf import ResolvConfError, nameservers
from ztunnel.inpod import FileEnrolmentSource
from ztunnel.node import NodeProxy
from ztunnel.workers.plan import usable_cores, worker_count
from ztunnel.zds_client import ZdsClient

if TYPE_CHECKING:
    from ztunnel.workers.owner import WorkerPool

log = structlog.get_logger("ztunnel")


async def run(cfg: Config) -> None:
    dns_upstreams = _dns_upstreams(cfg)
    # One worker client for keys, CSRs, chain checks and (with a gRPC CA) the CA call itself.
    worker = CertWorkerClient()
    client: CertificateClient
    if cfg.ca_grpc is not None:
        client = IstioCAClient(cfg.ca_grpc, worker)
    else:
        assert cfg.ca_address is not None  # parse_config guarantees one of the two
        client = LocalCAClient(cfg.ca_address, cfg.ca_token_path.read_text().strip())
    certs = CertificateManager(client, ttl=timedelta(seconds=cfg.cert_ttl_seconds), crypto=worker)
    node = NodeProxy(
        cfg.node_name,
        certs,
        cfg.trust_domain,
        root_namespace=cfg.root_namespace,
        release_drain=cfg.release_drain_seconds,
        same_node_in_process=cfg.same_node_in_process,
        hbone_limits=cfg.hbone_limits,
        dns_upstreams=dns_upstreams,
        dns_limits=cfg.dns_limits,
    )
    watcher = await open_source(
        cfg.local_xds_path,
        cfg.xds,
        node_id=cfg.node_name,
        trust_domain=cfg.trust_domain,
        on_update=node.on_state,
        token_path=cfg.ca_token_path,
    )
    workers = await _start_workers(cfg, certs)
    node.workers = workers
    node.processes = 1 if workers is None else workers.processes
    node.on_state(watcher.current)
    node.config_status = lambda: watcher.status
    enrolment: FileEnrolmentSource | ZdsClient
    if cfg.zds_socket is not None:
        enrolment = ZdsClient(cfg.zds_socket, node, agent_uids=cfg.zds_peer_uids)
    else:
        assert cfg.enrolment_path is not None  # parse_config guarantees one of the two
        enrolment = FileEnrolmentSource(cfg.enrolment_path, node.on_enrolment)
    node.start()
    await enrolment.start()
    readiness = ReadinessServer(node, cfg.readiness_port)
    await readiness.start()
    # Admin answers only on loopback of the tunnel's own netns; metrics are for scrapers.
    refresh = node.refresh if workers is not None else None
    admin = AdminServer(
        node,
        cfg.admin_port,
        host="127.0.0.1",
        refresh=refresh,
        on_log_level=workers.set_log_level if workers is not None else None,
    )
    await admin.start()
    process = process_metrics()
    extra = process
    if dns_upstreams is not None:
        dns_metrics = node.dns_metrics.render

        def extra() -> bytes:
            return process() + dns_metrics()

    metrics = MetricsServer(_NodeMetrics(node), extra, cfg.metrics_port, refresh=refresh)
    await metrics.start()
    log.info("ztunnel started", node=cfg.node_name, pid=os.getpid())
    trimmer = asyncio.ensure_future(malloc.trim_loop(node.activity))

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    quit_requested = asyncio.ensure_future(node.quit_requested.wait())
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait([quit_requested, stopped], return_when=asyncio.FIRST_COMPLETED)
    quit_requested.cancel()
    stopped.cancel()
    trimmer.cancel()
    # Drain: no new pods, no new connections (a newer tunnel's listeners take them), open
    # connections run to their end or the deadline; then whatever is left is closed.
    log.info("ztunnel draining", node=cfg.node_name, deadline_seconds=cfg.drain_seconds)
    await enrolment.close()
    await readiness.close()
    await admin.close()
    await node.drain(cfg.drain_seconds)
    log.info("ztunnel stopping", node=cfg.node_name)
    await metrics.close()
    await node.close()
    if workers is not None:
        await workers.close()
    await watcher.close()
    await certs.close()


async def _start_workers(cfg: Config, certs: CertificateManager) -> WorkerPool | None:
    """The worker processes, when the tunnel runs more than one process (None: it is one)."""
    count = worker_count(cfg.workers, usable_cores())
    if count == 1:
        return None  # nothing of the workers is loaded: no cost when off
    from ztunnel.workers.owner import WorkerError, WorkerPool

    pool = WorkerPool(count, certs)
    try:
        await pool.start()
    except WorkerError as e:
        await pool.close()
        # Exit status 1 with the reason, as for any start that cannot complete.
        raise SystemExit(f"ztunnel: {TUNNEL_WORKERS}={count}: {e}") from None
    log.info("tunnel workers started", processes=count)
    return pool


class _NodeMetrics:
    """The metrics server's view of the node: every process's counters, summed."""

    def __init__(self, node: NodeProxy) -> None:
        self.render = node.render_metrics


def _dns_upstreams(cfg: Config) -> tuple[IPAddress, ...] | None:
    """The DNS proxy's upstream resolvers, or None when the proxy is off. A resolv.conf
    that cannot be read or names no resolver stops the start: the proxy would answer every
    forwarded query SERVFAIL."""
    if not cfg.dns_capture:
        return None
    try:
        return nameservers(cfg.dns_resolv_conf.read_text())
    except (OSError, UnicodeDecodeError, ResolvConfError) as e:
        # Exit status 1 with this one line on stderr, before anything was started.
        raise SystemExit(f"ztunnel: {DNS_RESOLV_CONF}={cfg.dns_resolv_conf}: {e}") from None


def main() -> int:
    return run_process("ztunnel", parse_config, lambda cfg: cfg.log_level, run)


if __name__ == "__main__":
    sys.exit(main())
