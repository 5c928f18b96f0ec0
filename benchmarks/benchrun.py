"""What a cluster benchmark script does around its measurement, the same in each: a cluster
of its own, up for the work and torn down after, and a results file with the same header.

`on_cluster` keeps `end_run`'s promise for every script alike: the cluster goes down whatever
happens; a failed run keeps its logs and state directory; an interrupted one (SIGINT or
SIGTERM, see localcluster.interrupt) is cleaned up and the interrupt goes on.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from localcluster.mesh import Cluster, MeshUpError, end_run, up

RESULTS_DIR = Path(__file__).resolve().parent / "results"

T = TypeVar("T")


def on_cluster(
    tool: str,
    cluster_file: Path,
    state_root: Path,
    work: Callable[[Cluster], T],
    error: type[Exception],
) -> T | None:
    """What `work` returns on a cluster brought up from `cluster_file` under `state_root`;
    None, with the reason on stderr, when it fails with `error` (the script's own) or
    MeshUpError."""
    ok = interrupted = False
    cluster: Cluster | None = None
    try:
        print(f"bringing up the cluster (state in {state_root})", flush=True)
        cluster = up(cluster_file, state_root, mesh=True)
        result = work(cluster)
        ok = True
    except (error, MeshUpError) as e:
        print(f"{tool}: {e}", file=sys.stderr)
        return None
    except KeyboardInterrupt:  # SIGINT/SIGTERM (localcluster.interrupt): clean up, say so
        interrupted = True
        raise
    finally:
        end_run(tool, cluster, state_root, ok, interrupted)
    return result


def host() -> dict[str, Any]:
    """The machine a run was measured on: its figures mean little without it."""
    return {
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        # Fewer than `cpus` when the run was pinned (taskset, a cgroup's cpuset).
        "usable_cpus": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
    }


def header(benchmark: str, command: str) -> dict[str, Any]:
    """The first keys of a results file: which benchmark, when, run how, on what."""
    return {
        "benchmark": benchmark,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command,
        "host": host(),
    }


def write_results(doc: dict[str, Any], stem: str, results_dir: Path = RESULTS_DIR) -> Path:
    """`doc` as `<results_dir>/<stem>-<local time>.json`; its path."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return path
