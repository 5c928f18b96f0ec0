"""`python -m controlplane --kubeconfig K --mesh-out FILE`: the mesh computed from Kubernetes.

Installs the CRDs (unless `--no-install-crds`), follows the API server, and writes the mesh
config to FILE atomically at each change (the tunnels' LOCAL_XDS_PATH); creates each waypoint
Gateway's ServiceAccount, Deployment and Service, and writes statuses back. Stops on SIGTERM.
Exit codes: 2 bad arguments or credentials, 1 failed while running, 0 stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path

import structlog

from controlplane.controller import ControllerOptions, MeshController
from controlplane.install import InstallError, install_crds
from controlplane.waypoints import WaypointTemplate
from kube.client import KubeApiError, KubeClient, KubeConfig, config_from_env, load_kubeconfig
from meshcore.defaults import ROOT_NAMESPACE, TRUST_DOMAIN
from meshcore.observability import logging as meshlog

log = structlog.get_logger("controlplane")
_DEFAULTS = WaypointTemplate()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m controlplane", description="The mesh computed from Kubernetes."
    )
    p.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, else in-cluster)")
    p.add_argument("--mesh-out", required=True, type=Path, help="the mesh config file to write")
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
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    if not 0 <= args.debounce <= 10:
        p.error(f"--debounce {args.debounce} must be within 0..10 seconds")
    return args


def kube_config(args: argparse.Namespace) -> KubeConfig:
    return load_kubeconfig(args.kubeconfig) if args.kubeconfig else config_from_env(os.environ)


def options(args: argparse.Namespace) -> ControllerOptions:
    host_dir = args.waypoint_host_dir.rstrip("/") or "/"
    template = WaypointTemplate(
        image=args.waypoint_image,
        host_dir=host_dir,
        xds_path=f"{host_dir}/{args.mesh_out.name}",
        ca_address=f"{host_dir}/ca.sock",
        ca_token_path=f"{host_dir}/token",
        trust_domain=args.trust_domain,
    )
    return ControllerOptions(
        mesh_out=args.mesh_out,
        debounce=args.debounce,
        cluster_id=args.cluster_id,
        trust_domain=args.trust_domain,
        root_namespace=args.root_namespace,
        manage_waypoints=not args.no_waypoints,
        write_status=not args.no_status,
        template=template,
    )


async def run(config: KubeConfig, args: argparse.Namespace) -> None:
    async with KubeClient(config) as client:
        if not args.no_install_crds:
            names = await install_crds(client)
            log.info("crds installed", count=len(names))
        controller = MeshController(client, options(args))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await controller.start()
        log.info("control plane started", mesh_out=str(args.mesh_out))
        try:
            await stop.wait()
        finally:
            await controller.stop()
            log.info("control plane stopped", pushes=controller.pushes)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    meshlog.configure(args.log_level)
    if not args.mesh_out.parent.is_dir():
        print(f"controlplane: --mesh-out {args.mesh_out}: no such directory", file=sys.stderr)
        return 2
    try:
        config = kube_config(args)
    except (KubeApiError, OSError, ValueError) as e:
        print(f"controlplane: cannot load Kubernetes credentials: {e}", file=sys.stderr)
        return 2
    try:
        asyncio.run(run(config, args))
    except (KubeApiError, InstallError, OSError) as e:
        log.error("control plane failed", error=str(e))
        return 1
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
