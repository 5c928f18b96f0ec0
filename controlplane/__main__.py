"""`python -m controlplane --kubeconfig K --mesh-out FILE`: the mesh computed from Kubernetes.

Installs the CRDs (unless `--no-install-crds`), follows the API server, and writes the mesh
config to FILE atomically at each change (the tunnels' LOCAL_XDS_PATH); creates each waypoint
Gateway's ServiceAccount, Deployment and Service, and writes statuses back. Stops on SIGTERM.

`--in-cluster` runs it as istiod runs in a cluster (the control plane chart): the service
account's credentials, the CA root in the Secret istio-ca-secret of its namespace
($POD_NAMESPACE), the root certificate published to every namespace, waypoints that use
istiod's 15012 for xDS and certificates, and no mesh config file unless one is asked for.
Exit codes: 2 bad arguments or credentials, 1 failed while running, 0 stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from controlplane.admission import (
    WEBHOOK_CONFIGURATION,
    AgentAdmissionServer,
    informer_pod_lookup,
    keep_ca_bundle,
)
from controlplane.agentadmission import NODE_AGENT_ACCOUNT
from controlplane.ca import CAError, CertificateAuthority
from controlplane.ca_grpc_tls import service_dns_names
from controlplane.ca_server import CAServerError
from controlplane.controller import ControllerOptions, MeshController
from controlplane.incluster import RootCertPublisher, load_or_create_ca
from controlplane.install import InstallError, accept_waypoint_class, install_crds
from controlplane.waypoints import WaypointTemplate
from kube.client import (
    KubeApiError,
    KubeClient,
    KubeConfig,
    Obj,
    config_from_env,
    load_kubeconfig,
)
from kube.informer import Event, Handler
from meshcore.defaults import ROOT_NAMESPACE, TRUST_DOMAIN
from meshcore.http1.server import NodeHttpServer, Request, Response, Routes
from meshcore.observability import logging as meshlog
from meshcore.runtime import accepterrors

log = structlog.get_logger("controlplane")
_DEFAULTS = WaypointTemplate()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m controlplane", description="The mesh computed from Kubernetes."
    )
    p.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, else in-cluster)")
    p.add_argument("--mesh-out", type=Path, help="the mesh config file to write")
    p.add_argument(
        "--in-cluster",
        action="store_true",
        help="run inside the cluster as istiod does: CA root in the Secret istio-ca-secret of "
        "$POD_NAMESPACE, root certificate ConfigMaps, waypoints on istiod's 15012",
    )
    p.add_argument(
        "--readiness-port",
        type=int,
        default=0,
        help="serve GET /ready on this port (0.0.0.0): 200 once the first mesh config is pushed",
    )
    p.add_argument("--debounce", type=float, default=0.05, help="seconds to gather changes")
    p.add_argument("--no-install-crds", action="store_true", help="the CRDs are installed")
    p.add_argument("--no-waypoints", action="store_true", help="do not deploy waypoints")
    p.add_argument("--no-status", action="store_true", help="do not write statuses back")
    p.add_argument("--cluster-id", default="Kubernetes")
    p.add_argument("--trust-domain", default=TRUST_DOMAIN)
    p.add_argument("--root-namespace", default=ROOT_NAMESPACE)
    p.add_argument("--waypoint-image", default=_DEFAULTS.image)
    p.add_argument(
        "--waypoint-host-dir",
        default=_DEFAULTS.host_dir,
        help="node directory with the mesh config, CA socket and token",
    )
    p.add_argument(
        "--grpc-listen",
        action="append",
        default=[],
        metavar="ADDR",
        help="serve delta xDS and the CA (CreateCertificate) with TLS on ADDR (host:port or "
        "unix:/path; repeatable), as istiod's 15012",
    )
    p.add_argument(
        "--xds-node-tokens-file",
        type=Path,
        help="xDS subscribers may also authenticate with a node token of this file (YAML "
        "token -> node, the local CA's --tokens-file), besides service-account tokens",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        help="where the mesh CA's root is kept (needed with --grpc-listen)",
    )
    p.add_argument(
        "--waypoint-token-path",
        help="the CA token path in a waypoint pod (default: <host dir>/token; $(NODE_NAME) "
        "expands to the pod's node)",
    )
    p.add_argument(
        "--waypoint-xds-address",
        help="waypoints take their config over xDS from here (host:port or unix:/path) "
        "instead of the mesh config file",
    )
    p.add_argument("--waypoint-xds-root-cert", help="the root that xDS server is checked with")
    p.add_argument(
        "--admission-port",
        type=int,
        default=0,
        help="serve the node-agent admission webhook (HTTPS, POST /validate/node-agent) on "
        "this port (0.0.0.0; istiod's is 15017) and write the mesh root into the caBundle of "
        "the ValidatingWebhookConfiguration --admission-configuration; 0: off",
    )
    p.add_argument(
        "--admission-configuration",
        default=WEBHOOK_CONFIGURATION,
        help="the ValidatingWebhookConfiguration whose caBundle the control plane writes",
    )
    p.add_argument(
        "--node-agent-account",
        action="append",
        default=[],
        metavar="NS/NAME",
        help="a node agents' service account the admission webhook judges (repeatable; "
        "default: <namespace>/ambient-node-agent)",
    )
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    if not 0 <= args.debounce <= 10:
        p.error(f"--debounce {args.debounce} must be within 0..10 seconds")
    if bool(args.waypoint_xds_address) != bool(args.waypoint_xds_root_cert):
        p.error("--waypoint-xds-address and --waypoint-xds-root-cert go together")
    if args.in_cluster:
        args.namespace = os.environ.get("POD_NAMESPACE", "").strip()
        if not args.namespace:
            p.error("--in-cluster needs POD_NAMESPACE (the downward API's metadata.namespace)")
        if args.state_dir is not None:
            p.error("--in-cluster keeps the CA in the Secret istio-ca-secret, not --state-dir")
    else:
        args.namespace = ""
        if args.mesh_out is None:
            p.error("--mesh-out is required (outside the cluster the tunnels read that file)")
        if args.xds_node_tokens_file is not None and not args.grpc_listen:
            p.error("--xds-node-tokens-file is for the xDS server of --grpc-listen")
        if args.grpc_listen and args.state_dir is None:
            p.error("--grpc-listen needs --state-dir (the mesh CA that signs istiod's certificate)")
    if not 0 <= args.readiness_port <= 65535:
        p.error(f"--readiness-port {args.readiness_port} is not a port")
    if not 0 <= args.admission_port <= 65535:
        p.error(f"--admission-port {args.admission_port} is not a port")
    if args.admission_port and not (args.in_cluster or args.grpc_listen):
        p.error("--admission-port needs the mesh CA: --in-cluster or --grpc-listen")
    for account in args.node_agent_account:
        ns, _, name = account.partition("/")
        if not ns or not name or "/" in name:
            p.error(f"--node-agent-account {account!r} is not NS/NAME")
    if not args.node_agent_account:
        args.node_agent_account = [f"{args.namespace or ROOT_NAMESPACE}/{NODE_AGENT_ACCOUNT}"]
    return args


def kube_config(args: argparse.Namespace) -> KubeConfig:
    return load_kubeconfig(args.kubeconfig) if args.kubeconfig else config_from_env(os.environ)


def options(args: argparse.Namespace) -> ControllerOptions:
    return ControllerOptions(
        mesh_out=args.mesh_out,
        debounce=args.debounce,
        cluster_id=args.cluster_id,
        trust_domain=args.trust_domain,
        root_namespace=args.root_namespace,
        manage_waypoints=not args.no_waypoints,
        write_status=not args.no_status,
        template=waypoint_template(args),
    )


def waypoint_template(args: argparse.Namespace) -> WaypointTemplate:
    if args.in_cluster:
        return WaypointTemplate.in_cluster(args.waypoint_image, args.namespace, args.trust_domain)
    host_dir = args.waypoint_host_dir.rstrip("/") or "/"
    mesh_file = args.mesh_out.name if args.mesh_out is not None else "mesh.json"
    return WaypointTemplate(
        image=args.waypoint_image,
        host_dir=host_dir,
        xds_path=f"{host_dir}/{mesh_file}",
        ca_address=f"{host_dir}/ca.sock",
        ca_token_path=args.waypoint_token_path or f"{host_dir}/token",
        xds_address=args.waypoint_xds_address or "",
        xds_root_cert=args.waypoint_xds_root_cert or "",
        trust_domain=args.trust_domain,
    )


async def run(config: KubeConfig, args: argparse.Namespace) -> None:
    accepterrors.install(asyncio.get_running_loop())
    async with KubeClient(config) as client:
        if not args.no_install_crds:
            names = await install_crds(client)
            log.info("crds installed", count=len(names))
        elif args.in_cluster:
            # The base chart installed the class; its controller says it takes it.
            try:
                if not await accept_waypoint_class(client):
                    log.warning("GatewayClass istio-waypoint not found; waypoints need it")
            except KubeApiError as e:
                log.warning("GatewayClass istio-waypoint not accepted", error=str(e))
        controller = MeshController(client, options(args))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        ca = await mesh_ca(client, args) if args.grpc_listen or args.in_cluster else None
        publisher = None
        if args.in_cluster and ca is not None:
            publisher = RootCertPublisher(
                client, controller.informers["namespaces"], ca.roots_pem().decode()
            )
        grpc_server = (
            await serve_grpc(client, controller, ca, args)
            if args.grpc_listen and ca is not None
            else None
        )
        readiness = (
            await serve_readiness(controller, args.readiness_port) if args.readiness_port else None
        )
        admission = (
            await serve_admission(client, controller, ca, args)
            if args.admission_port and ca is not None
            else None
        )
        await controller.start()
        if publisher is not None:
            publisher.start()
        log.info("control plane started", mesh_out=str(args.mesh_out), in_cluster=args.in_cluster)
        try:
            await stop.wait()
        finally:
            if readiness is not None:
                await readiness.close()
            if admission is not None:
                await admission.close()
            if grpc_server is not None:
                await grpc_server.stop()
            if publisher is not None:
                await publisher.stop()
            await controller.stop()
            log.info("control plane stopped", pushes=controller.pushes)


async def mesh_ca(client: KubeClient, args: argparse.Namespace) -> CertificateAuthority:
    """In the cluster: the root in the Secret istio-ca-secret (created on the first start);
    outside: the root under --state-dir."""
    if args.in_cluster:
        return await load_or_create_ca(client, args.namespace, args.trust_domain)
    return CertificateAuthority.load_or_create(args.state_dir, args.trust_domain)


class ControlPlaneReadiness(NodeHttpServer):
    """GET /ready: 200 once the first mesh config is pushed (before it, a proxy that
    connected would wait), else 503; the kubelet's readiness probe, as istiod's :8080.
    The proxies' small HTTP server: every pod of the cluster can reach this port, so it
    gets the same bounds (head size, read timeout, connections) as theirs."""

    def __init__(self, controller: MeshController, port: int, host: str = "0.0.0.0") -> None:
        super().__init__(port, host)
        self._controller = controller

    async def _ready(self, _request: Request) -> Response:
        if self._controller.state is None:
            return Response.text("waiting for the first mesh config\n", 503)
        return Response.text("ready\n")

    def routes(self) -> Routes:
        return {"/ready": {"GET": self._ready}}


async def serve_readiness(controller: MeshController, port: int) -> ControlPlaneReadiness:
    server = ControlPlaneReadiness(controller, port)
    await server.start()
    log.info("readiness listening", port=port)
    return server


class AdmissionServing:
    """The admission webhook's server and the task that writes its caBundle."""

    def __init__(self, server: AgentAdmissionServer, bundle: asyncio.Task[None]) -> None:
        self.server = server
        self.bundle = bundle

    async def close(self) -> None:
        self.bundle.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.bundle
        await self.server.close()


async def serve_admission(
    client: KubeClient,
    controller: MeshController,
    ca: CertificateAuthority,
    args: argparse.Namespace,
) -> AdmissionServing:
    server = AgentAdmissionServer(
        ca,
        args.node_agent_account,
        informer_pod_lookup(client, controller.informers["pods"]),
        port=args.admission_port,
        dns_names=service_dns_names(args.namespace or ROOT_NAMESPACE),
    )
    await server.start()
    bundle = asyncio.create_task(
        keep_ca_bundle(client, ca.roots_pem(), args.admission_configuration),
        name="admission-ca-bundle",
    )
    log.info("admission webhook listening", port=server.port, agents=args.node_agent_account)
    return AdmissionServing(server, bundle)


class GrpcServing:
    """istiod's 15012: delta xDS fed by the controller, and the CA, on one TLS server."""

    def __init__(self, server: Any, facts: Any) -> None:
        self.server = server
        self.facts = facts

    async def stop(self) -> None:
        await self.server.stop(1.0)
        await self.facts.stop()


def pod_deletions(told: Callable[[str], None]) -> Handler:
    """An informer handler that tells `told` the uid of each deleted pod."""

    def handler(event: Event, _key: str, old: Obj | None, _new: Obj | None) -> None:
        if event is Event.DELETED and old is not None:
            uid = (old.get("metadata") or {}).get("uid")
            if isinstance(uid, str) and uid:
                told(uid)

    return handler


async def serve_grpc(
    client: KubeClient,
    controller: MeshController,
    ca: CertificateAuthority,
    args: argparse.Namespace,
) -> GrpcServing:
    # Imported here: without --grpc-listen the control plane loads no grpcio.

    from controlplane.ca_grpc import CaGrpcService, KubeFacts
    from controlplane.ca_server import load_tokens
    from controlplane.grpc_limits import grpc_limits, new_server
    from controlplane.xds.auth import SubscriberAuth
    from controlplane.xds.server import XdsServer
    from controlplane.xds.tls import XDS_DNS_NAME, bind, server_credentials

    limits = grpc_limits(os.environ)
    facts = KubeFacts(client)
    # A subscriber proves itself as the CA's callers do: a service-account token for
    # istio-ca, reviewed by the same KubeFacts (or a node token, where one is configured).
    node_tokens = load_tokens(args.xds_node_tokens_file) if args.xds_node_tokens_file else None
    auth = SubscriberAuth(args.trust_domain, reviewer=facts, node_tokens=node_tokens)
    xds = XdsServer(push_timeout=limits.push_timeout, auth=auth)
    # Every state the controller computes goes to every connected proxy; a proxy that
    # connects before the first one waits for it.
    controller.on_state(xds.update)
    controller.informers["pods"].add_handler(pod_deletions(auth.pod_deleted))
    facts.start()
    server = new_server(limits)
    xds.add_to_server(server)
    CaGrpcService(ca, facts).add_to_server(server)
    dns_names = service_dns_names(args.namespace) if args.in_cluster else (XDS_DNS_NAME,)
    creds = server_credentials(ca, dns_names=dns_names)
    for address in args.grpc_listen:
        port = bind(server, address, creds)
        log.info(
            "grpc listening",
            address=address,
            port=port,
            services="xds,ca",
            xds_subscribers=auth.describe(),
        )
    await server.start()
    return GrpcServing(server, facts)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    meshlog.configure(args.log_level)
    if args.mesh_out is not None and not args.mesh_out.parent.is_dir():
        print(f"controlplane: --mesh-out {args.mesh_out}: no such directory", file=sys.stderr)
        return 2
    try:
        config = kube_config(args)
    except (KubeApiError, OSError, ValueError) as e:
        print(f"controlplane: cannot load Kubernetes credentials: {e}", file=sys.stderr)
        return 2
    try:
        asyncio.run(run(config, args))
    except (KubeApiError, InstallError, OSError, ValueError, CAError, CAServerError) as e:
        # ValueError: a --grpc-listen address it cannot serve; CAError: the CA's store;
        # CAServerError: the node tokens file.
        log.error("control plane failed", error=str(e))
        return 1
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
