"""How many processes a tunnel runs: pure, from the setting and the cores it may use."""

from __future__ import annotations

import os

from ztunnel.config import MAX_TUNNEL_WORKERS as MAX_WORKERS

# The default stops here: upstream ztunnel's own default is 2 worker threads, and a tunnel
# that takes half of a large node is already far more than its pods' traffic needs.
MAX_DEFAULT_WORKERS = 8


def default_workers(cores: int) -> int:
    """The worker count when `TUNNEL_WORKERS` is not set.

    One on a node of 1 or 2 cores: the pods need those cores too (a tunnel at saturation is
    doing their work for them), and a second process costs its own resident memory (about
    30 MB) and its own HBONE connections to every peer for a gain that two shared cores
    cannot give. From 3 cores on, half of them, leaving the rest to the pods, up to
    MAX_DEFAULT_WORKERS."""
    if cores <= 2:
        return 1
    return min(cores // 2, MAX_DEFAULT_WORKERS)


def worker_count(setting: int, cores: int) -> int:
    """`setting` (TUNNEL_WORKERS; 0: not set) if given, else the default for `cores`."""
    if setting < 0 or setting > MAX_WORKERS:
        raise ValueError(f"worker count {setting} is not in 0..{MAX_WORKERS}")
    return setting if setting > 0 else default_workers(cores)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
