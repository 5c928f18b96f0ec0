"""`python -m controlplane.xds`: serve a mesh-config document over delta xDS.

The document (the LOCAL_XDS format) is watched as the tunnels would watch it, and every good
version is pushed to every connected proxy; a bad edit is logged and the last good state
stays. TLS with a certificate from the mesh CA in `--state-dir` (its root, ca/root-cert.pem,
is what proxies name in XDS_ROOT_CERT). Until the Kubernetes source lands, this is the
control plane's discovery half for the local cluster and for tests.
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

from controlplane.ca import CAError, CertificateAuthority
from controlplane.grpc_limits import grpc_limits, new_server
from controlplane.xds.server import XdsServer
from controlplane.xds.tls import XdsTlsError, bind, server_credentials
from meshcore.defaults import TRUST_DOMAIN
from meshcore.discovery import LocalConfigWatcher
from meshcore.runtime import accepterrors
from meshcore.state import MeshConfigError

log = structlog.get_logger("xds")


async def _serve(args: argparse.Namespace) -> None:
    accepterrors.install(asyncio.get_running_loop())
    limits = grpc_limits(os.environ)
    xds = XdsServer(push_timeout=limits.push_timeout)
    watcher = LocalConfigWatcher(Path(args.config), xds.update)
    await watcher.start()
    server = new_server(limits)
    xds.add_to_server(server)
    credentials = None
    if not args.plaintext:
        ca = CertificateAuthority.load_or_create(Path(args.state_dir), args.trust_domain)
        credentials = server_credentials(ca)
    port = bind(server, args.listen, credentials)
    await server.start()
    log.info("xds serving", listen=args.listen, port=port, tls=credentials is not None)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await server.stop(grace=1.0)
        await watcher.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m controlplane.xds", description="Delta xDS (ADS) for the mesh."
    )
    parser.add_argument("--config", required=True, help="the mesh-config document to serve")
    parser.add_argument("--state-dir", help="directory of the mesh CA (ca/root-*.pem)")
    parser.add_argument("--listen", default="127.0.0.1:15012", help="host:port (15012)")
    parser.add_argument("--trust-domain", default=TRUST_DOMAIN)
    parser.add_argument(
        "--plaintext", action="store_true", help="no TLS (accepted on a loopback address only)"
    )
    args = parser.parse_args(argv)
    if not args.plaintext and not args.state_dir:
        parser.error("--state-dir is required unless --plaintext")
    try:
        asyncio.run(_serve(args))
    except (CAError, MeshConfigError, XdsTlsError) as e:
        print(f"xds: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
