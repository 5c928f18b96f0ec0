"""`ambientctl dashboard`: a live picture of the mesh in a web page, as Kiali is for Istio.

The page (static files in this package, no external assets) draws the graph that
`graph.build` makes from the proxies' metrics (`collect.poll`, every 2 s, by `server`), and
shows `ambientctl explain` for an edge when it is clicked. Served on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import webbrowser
from types import FrameType
from typing import Any

DEFAULT_PORT = 20001  # istioctl dashboard kiali's local port

EXAMPLES = """examples:
  ambientctl dashboard demo/travel-cluster.yaml
  ambientctl dashboard --port 0 --no-browser   # any free port; print the URL only
"""


def register(sub: Any) -> None:
    """Add the `dashboard` subcommand to the top-level subparsers."""
    from ambientctl import context

    p = sub.add_parser(
        "dashboard",
        help="serve a live graph of the mesh (traffic, mTLS, denials) on 127.0.0.1",
        description="Serve a web page on 127.0.0.1 that draws the mesh as a graph: workloads,\n"
        "services and waypoints, with each edge's connections/s, requests/s, error rate,\n"
        "mTLS and policy denials, updated every 2 s from the tunnels' and waypoints'\n"
        "metrics. Click an edge for its `ambientctl explain`.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    context.add_cluster_arg(p)
    p.add_argument(
        "--port",
        type=_port,
        default=DEFAULT_PORT,
        help=f"local port to serve on (default {DEFAULT_PORT}; 0: any free port)",
    )
    p.add_argument("--no-browser", action="store_true", help="print the URL, do not open a browser")
    p.set_defaults(fn=run)


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a port, 0..65535")
    return port


def _stop(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    from ambientctl import context
    from ambientctl.dashboard import collect, server

    cluster = context.attach(args)

    def ready(url: str) -> None:
        print(f"ambientctl dashboard: serving the mesh of cluster {cluster.spec.name} at {url} "
              "(Ctrl-C to stop)", flush=True)  # fmt: skip
        if not args.no_browser and (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
            webbrowser.open(url)

    signal.signal(signal.SIGTERM, _stop)
    try:
        server.serve(
            args.port,
            lambda: collect.poll(cluster),
            lambda source, destination: collect.explain(cluster, source, destination),
            ready,
        )
    except KeyboardInterrupt:
        print("ambientctl dashboard: stopped", file=sys.stderr)
    return 0
