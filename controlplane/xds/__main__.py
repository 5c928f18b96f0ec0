"""`python -m controlplane.xds`: serve a mesh-config document over delta xDS.

The document (the LOCAL_XDS format) is watched as the tunnels would watch it, and every good
version is pushed to every connected proxy; a bad edit is logged and the last good state
stays. TLS with a certificate from the mesh CA in `--state-dir` (its root, ca/root-cert.pem,
is what proxies name in XDS_ROOT_CERT). Until the Kubernetes source lands, this is the
control plane's discovery half for the local cluster and for tests.

Subscribers must authenticate (`controlplane.xds.auth`), and how is said on the command
line, never assumed: `--tokens-file` (the local CA's node tokens, which the local cluster's
tunnels and waypoints already hold as CA_TOKEN_PATH), `--kubeconfig` (service-account
tokens checked by TokenReview), `--require-client-cert` (mesh certificates only), or, for
loopback tests alone, `--allow-unauthenticated`.
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
from controlplane.ca_server import CAServerError, load_tokens
from controlplane.grpc_limits import grpc_limits, new_server
from controlplane.xds.auth import SubscriberAuth, TokenReviewer
from controlplane.xds.server import XdsServer
from controlplane.xds.tls import XdsTlsError, bind, server_credentials
from kube.client import KubeApiError, KubeClient, load_kubeconfig
from meshcore.defaults import TRUST_DOMAIN
from meshcore.discovery import LocalConfigWatcher
from meshcore.runtime import accepterrors
from meshcore.state import MeshConfigError

log = structlog.get_logger("xds")


async def _serve(args: argparse.Namespace) -> None:
    accepterrors.install(asyncio.get_running_loop())
    limits = grpc_limits(os.environ)
    async with contextlib.AsyncExitStack() as stack:
        reviewer: TokenReviewer | None = None
        if args.kubeconfig:
            # Imported here: only this way needs the CA's Kubernetes facts.
            from controlplane.ca_grpc import KubeFacts

            client = await stack.enter_async_context(KubeClient(load_kubeconfig(args.kubeconfig)))
            reviewer = KubeFacts(client)  # its review only; its pod informer is not started
        auth = SubscriberAuth(
            args.trust_domain,
            reviewer=reviewer,
            node_tokens=load_tokens(Path(args.tokens_file)) if args.tokens_file else None,
            allow_unauthenticated=args.allow_unauthenticated,
        )
        xds = XdsServer(push_timeout=limits.push_timeout, auth=auth)
        watcher = LocalConfigWatcher(Path(args.config), xds.update)
        await watcher.start()
        stack.push_async_callback(watcher.close)
        server = new_server(limits)
        xds.add_to_server(server)
        credentials = None
        if not args.plaintext:
            ca = CertificateAuthority.load_or_create(Path(args.state_dir), args.trust_domain)
            credentials = server_credentials(ca, require_client_cert=args.require_client_cert)
        port = bind(server, args.listen, credentials)
        await server.start()
        stack.push_async_callback(server.stop, 1.0)
        log.info(
            "xds serving",
            listen=args.listen,
            port=port,
            tls=credentials is not None,
            subscribers=auth.describe(args.require_client_cert),
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()


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
    parser.add_argument(
        "--tokens-file",
        help="accept subscribers presenting a node token of this file (YAML token -> node, "
        "the local CA's --tokens-file)",
    )
    parser.add_argument(
        "--kubeconfig",
        help="accept subscribers presenting a Kubernetes service-account token for the "
        "audience istio-ca, checked by TokenReview with these credentials",
    )
    parser.add_argument(
        "--require-client-cert",
        action="store_true",
        help="TLS clients must present a certificate of the mesh CA (their identity is the "
        "subscriber); tokens are still checked when also enabled",
    )
    parser.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help="serve subscribers that prove nothing (loopback tests only: anyone who reaches "
        "the listener reads the whole mesh state)",
    )
    args = parser.parse_args(argv)
    if not args.plaintext and not args.state_dir:
        parser.error("--state-dir is required unless --plaintext")
    if args.plaintext and args.require_client_cert:
        parser.error("--require-client-cert needs TLS (not --plaintext)")
    ways = (args.tokens_file, args.kubeconfig, args.require_client_cert)
    if not any(ways) and not args.allow_unauthenticated:
        parser.error(
            "say how subscribers authenticate: --tokens-file, --kubeconfig, "
            "--require-client-cert, or (loopback tests only) --allow-unauthenticated"
        )
    try:
        asyncio.run(_serve(args))
    except (CAError, CAServerError, KubeApiError, MeshConfigError, XdsTlsError) as e:
        print(f"xds: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
