"""Which local cluster a command is for: the one seam every local-cluster command goes
through, so that how a cluster is named (a file today) is decided in one place."""

from __future__ import annotations

import argparse

from localcluster import mesh


class NoCluster(Exception):
    """No cluster given and none to default to (exit 2: the command line is incomplete)."""


def add_cluster_arg(p: argparse.ArgumentParser) -> None:
    """The local cluster a command acts on."""
    p.add_argument("cluster_file", nargs="?", help="a local cluster's file")


def attach(args: argparse.Namespace) -> mesh.Cluster:
    """The running local cluster `args` name (raises NotRunning, NoCluster)."""
    if not getattr(args, "cluster_file", None):
        raise NoCluster("no cluster given: name its cluster file")
    return mesh.attach(args.cluster_file, args.state_root)
