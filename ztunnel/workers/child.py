"""`python -m ztunnel.workers.child --fd N --index I --owner PID`: one worker process.

Started by the owner (`ztunnel.workers.owner`) with the tunnel's environment, so it parses
the same Config; it uses none of the settings that make the owner the owner (ZDS, the CA,
the config source, the admin, metrics and readiness ports). It runs a `NodeProxy` of its
own, fed by the owner: the mesh state, the pods to serve (with their netns fds), the
certificates. It answers for its connection table and counters when asked. It leaves with
the owner: PR_SET_PDEATHSIG (SIGTERM) if the owner dies, and its channel's end otherwise,
after which it stops its pods and exits.
"""

from __future__ import annotations

import meshcore.runtime.lean  # noqa: F401  (first: before anything imports structlog)

# isort: split
import argparse
import asyncio
import ctypes
import os
import signal
import socket
import sys
from typing import Any

import structlog

from meshcore.admin.server import current_log_level, set_log_level
from meshcore.identity.certs import CertificateError
from meshcore.identity.spiffe import IdentityError, SpiffeId
from meshcore.observability import logging as meshlog
from meshcore.runtime import malloc
from meshcore.runtime.entry import run_process
from meshcore.runtime.tasks import TaskSet
from meshcore.state import IPAddress, MeshConfigError
from meshcore.xds import convert
from zds.messages import WorkloadInfo
from ztunnel.config import Config, parse_config
from ztunnel.dns.resolvconf import ResolvConfError, nameservers
from ztunnel.inpod import Enrolment
from ztunnel.node import NodeProxy
from ztunnel.workers import codec
from ztunnel.workers.certs import RemoteCertificates, from_message
from ztunnel.workers.channel import Channel

log = structlog.get_logger("ztunnel.worker")

PR_SET_PDEATHSIG = 1


def die_with(owner: int) -> None:
    """SIGTERM to us when the owner dies (also if it died before this ran)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != owner:
        raise SystemExit("ztunnel worker: the owner process is already gone")


class Worker:
    """The worker's side of the channel, around its node."""

    def __init__(self, node: NodeProxy, certs: RemoteCertificates, channel: Channel) -> None:
        self.node = node
        self.certs = certs
        self.channel = channel
        self.tasks = TaskSet("worker")
        self.ended = asyncio.Event()
        channel.on_message = self.on_message
        channel.on_closed = self._closed

    def _closed(self, why: str) -> None:
        log.info("worker channel closed", reason=why)
        self.certs.fail_all(f"the owner process is gone: {why}")
        self.ended.set()

    def on_message(self, msg: codec.Message, fd: int | None) -> None:
        if isinstance(msg, codec.Enrol):
            assert fd is not None  # the codec refuses an ENROL without one
            self.tasks.spawn(self._enrol(msg, fd), f"enrol-{msg.uid}")
            return
        if fd is not None:
            os.close(fd)
        if isinstance(msg, codec.State):
            self._state(msg)
        elif isinstance(msg, codec.Release):
            self.tasks.spawn(self._release(msg), f"release-{msg.uid}")
        elif isinstance(msg, codec.Drain):
            self.tasks.spawn(self._drain(msg), "drain")
        elif isinstance(msg, codec.ReportRequest):
            self.channel.send(codec.Report(msg.seq, self.report()))
        elif isinstance(msg, codec.Cert):
            try:
                self.certs.deliver(from_message(msg))
            except CertificateError as e:
                self.channel.close(str(e))
        elif isinstance(msg, codec.LogLevel):
            try:
                set_log_level(msg.level)
            except ValueError as e:
                self.channel.close(f"LOG_LEVEL: {e}")
        elif isinstance(msg, codec.CertFailed):
            try:
                self.certs.failed(SpiffeId.parse(msg.identity), msg.error)
            except IdentityError as e:
                self.channel.close(f"CERT_FAILED for {msg.identity!r}: {e}")
        else:
            self.channel.close(f"the owner sent {msg.KIND.name}, which only a worker sends")

    def _state(self, msg: codec.State) -> None:
        try:
            state = convert.build_state(
                convert.decode_resource(t, name, body) for t, name, body in msg.resources
            )
        except (convert.ResourceError, MeshConfigError) as e:
            # The owner encoded a state it accepted: this is a bug, not a bad config.
            self.channel.close(f"the owner's mesh state does not decode: {e}")
            return
        self.node.on_state(state)

    async def _enrol(self, msg: codec.Enrol, fd: int) -> None:
        info = WorkloadInfo(msg.name, msg.namespace, msg.service_account) if msg.name else None
        error = ""
        try:
            await self.node.add_pod(Enrolment.from_fd(msg.uid, fd, info))
            if msg.uid not in self.node.pods:
                error = self.node.pending.get(msg.uid, "not started")
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
        self.channel.send(codec.Done(msg.seq, 0, error))

    async def _release(self, msg: codec.Release) -> None:
        await self.node.remove_pod(msg.uid, drain=msg.drain)
        self.channel.send(codec.Done(msg.seq, 0, ""))

    async def _drain(self, msg: codec.Drain) -> None:
        left = await self.node.drain(msg.seconds)
        self.channel.send(codec.Done(msg.seq, left, ""))

    def report(self) -> dict[str, Any]:
        table = self.node.connection_table
        return {
            "pid": os.getpid(),
            "connections": table.connections(),
            "metrics": table.metrics.export(),
            "opened": table.opened_total,
            "pods": {uid: p.state.value for uid, p in self.node.pods.items()},
            "logLevel": current_log_level(),
        }


async def run(cfg: Config, fd: int, index: int, processes: int) -> None:
    # Every line says which process wrote it: the owner's and its workers' go to one log.
    meshlog.configure(cfg.log_level, tags={"worker": index})
    loop = asyncio.get_running_loop()
    # SIGINT reaches the whole process group from a terminal: the owner handles it and
    # stops us in order. SIGTERM (the owner's death) ends us at once.
    loop.add_signal_handler(signal.SIGINT, lambda: None)
    channel = Channel(socket.socket(fileno=fd), "owner")
    certs = RemoteCertificates(lambda identity: channel.send(codec.CertRequest(str(identity))))
    node = NodeProxy(
        cfg.node_name,
        certs,
        cfg.trust_domain,
        root_namespace=cfg.root_namespace,
        workload_wait=0.0,  # the owner sends a pod only once its workload is known
        release_drain=cfg.release_drain_seconds,
        same_node_in_process=cfg.same_node_in_process,
        hbone_limits=cfg.hbone_limits,
        dns_upstreams=_dns_upstreams(cfg),
        dns_limits=cfg.dns_limits,
        dns_listen=False,
    )
    node.processes = processes
    worker = Worker(node, certs, channel)
    node.start()
    channel.start()
    channel.send(codec.Hello(index, os.getpid()))
    log.info("ztunnel worker started", worker=index, pid=os.getpid())
    trimmer = asyncio.ensure_future(malloc.trim_loop(node.activity))
    await worker.ended.wait()
    trimmer.cancel()
    await worker.tasks.cancel_all()
    await node.close()
    log.info("ztunnel worker stopped", worker=index)


def _dns_upstreams(cfg: Config) -> tuple[IPAddress, ...] | None:
    """The resolvers for connections to a ServiceEntry resolved by DNS. The owner answers
    the pods' DNS queries (15053); a worker only resolves for its own connections."""
    if not cfg.dns_capture:
        return None
    try:
        return nameservers(cfg.dns_resolv_conf.read_text())
    except (OSError, UnicodeDecodeError, ResolvConfError):
        return None  # the owner refused to start over it already


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ztunnel.workers.child")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--owner", type=int, required=True)
    parser.add_argument("--processes", type=int, required=True)
    args = parser.parse_args(argv)
    die_with(args.owner)
    return run_process(
        f"ztunnel-worker-{args.index}",
        parse_config,
        lambda cfg: cfg.log_level,
        lambda cfg: run(cfg, args.fd, args.index, args.processes),
    )


if __name__ == "__main__":
    sys.exit(main())
