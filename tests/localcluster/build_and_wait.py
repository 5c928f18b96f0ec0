"""Builds a test cluster, starts its apps, prints "ready", then waits to be killed.

Run as a separate process by the crash test: SIGKILL it and tear down from the outside.
Usage: build_and_wait.py <cluster-name> <state-root>
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from localcluster.apps import start_apps
from localcluster.network import build_network
from localcluster.spec import parse_cluster
from localcluster.state import ClusterState
from tests.localcluster.cluster_factory import cluster_yaml


def main() -> None:
    name, root = sys.argv[1], Path(sys.argv[2])
    spec = parse_cluster(cluster_yaml(name), Path(__file__).resolve().parent)
    state = ClusterState.open(name, root)
    layout = build_network(spec, state)
    start_apps(spec, layout, state)
    print("ready", flush=True)
    time.sleep(120)  # bounded: the test kills us long before this


if __name__ == "__main__":
    main()
