"""Tunnel upgrade and crash-restart under continuous load.

An upgrade starts a new tunnel beside the old one (their listeners overlap through
SO_REUSEPORT), then stops the old one with SIGTERM: it stops accepting (the kernel hands
its queued connections to the new listeners: tcp_migrate_req), sends GOAWAY on its HBONE
connections, lets its open connections finish and exits. A crash is SIGKILL followed by a
new tunnel. The load: a new connection every 5 ms plus long-lived ones, from a pod on n1 to
a pod on n2; the counts are asserted (upgrade) or bounded and reported (crash).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

import nsutil
from localcluster import mesh
from localcluster.processes import ProcessRecord, is_running, read_records

from .common import HERE

pytestmark = pytest.mark.netns


CLUSTER_FILE = HERE / "restart.yaml"
REDIRECT_MODES = ("iptables", "ebpf")


def tunnel_record(c: mesh.Cluster, node: str) -> ProcessRecord:
    """The newest running tunnel of a node."""
    live = [
        r
        for r in read_records(c.state.pidfile_dir)
        if r.name.startswith(f"ztunnel-{node}") and is_running(r.pid, r.start_time)
    ]
    assert live, f"no tunnel running on {node}"
    return max(live, key=lambda r: r.start_time)


def start_load(c: mesh.Cluster, seconds: float) -> subprocess.Popen[str]:
    target = str(c.layout.pod("mesh", "server").ip)
    return subprocess.Popen(
        [sys.executable, str(HERE / "loadgen.py"), target, "9000", "--seconds", str(seconds),
         "--interval-ms", "5", "--long", "3"],
        preexec_fn=nsutil.preexec_enter(c.pod_netns("mesh", "client")),
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def finish_load(p: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0
    result: dict[str, Any] = json.loads(out)
    return result


def enrolled_count(c: mesh.Cluster, node: str) -> int:
    return sum(1 for p in c.spec.pods_on(node) if p.enrolled(c.spec))


def start_new_tunnel(c: mesh.Cluster, node: str, name: str) -> None:
    mesh.start_tunnel(c.spec, c.layout, c.state, node, name=name)
    log = c.state.log_dir / f"{name}.log"
    deadline = time.monotonic() + 20
    while True:
        text = log.read_text() if log.exists() else ""
        if text.count('"pod enrolled"') >= enrolled_count(c, node):
            return
        assert time.monotonic() < deadline, f"{name} never served its pods:\n{text[-2000:]}"
        time.sleep(0.05)


def wait_exit(r: ProcessRecord, timeout: float) -> float:
    start = time.monotonic()
    while is_running(r.pid, r.start_time):
        assert time.monotonic() - start < timeout, f"{r.name} did not exit"
        time.sleep(0.05)
    return time.monotonic() - start


@pytest.mark.parametrize("node", ["n2", "n1"])
def test_upgrade_under_load_fails_no_connection(cluster: mesh.Cluster, node: str) -> None:
    load = start_load(cluster, seconds=6)
    time.sleep(1.5)
    old = tunnel_record(cluster, node)
    start_new_tunnel(cluster, node, f"ztunnel-{node}-{int(time.time() * 1000) % 10**8}")
    os.kill(old.pid, signal.SIGTERM)
    result = finish_load(load, timeout=60)
    drained_in = wait_exit(old, timeout=40)
    print(
        f"\nupgrade {node}: {result['attempts']} new connections, "
        f"{len(result['failures'])} failed; old tunnel gone {drained_in:.1f} s after the run"
    )
    assert result["attempts"] > 200
    assert result["failures"] == []
    # Long-lived connections of the old tunnel finished on it, unbroken.
    assert all(x.get("ok") for x in result["long"]), result["long"]


def test_crash_and_restart_outage_is_bounded(cluster: mesh.Cluster) -> None:
    node = "n2"
    load = start_load(cluster, seconds=6)
    time.sleep(1.5)
    old = tunnel_record(cluster, node)
    os.kill(old.pid, signal.SIGKILL)
    killed_at = time.time()
    wait_exit(old, timeout=10)
    start_new_tunnel(cluster, node, f"ztunnel-{node}-{int(time.time() * 1000) % 10**8}")
    result = finish_load(load, timeout=60)
    failures = result["failures"]
    # The outage ends with the first attempt that worked after the last one that failed
    # (a failed attempt may have waited for its timeout, so its own time says too little).
    last_failed = max((f["at"] for f in failures), default=killed_at)
    back = min((t for t in result["ok_at"] if t > last_failed), default=result["last"])
    outage = back - killed_at if failures else 0.0
    print(
        f"\ncrash {node}: {result['attempts']} new connections, {len(failures)} failed, "
        f"outage {outage:.2f} s after SIGKILL; long-lived: {result['long']}"
    )
    assert outage < 10.0
    # After the restart, new connections work again: the last second of attempts is clean.
    assert not failures or max(f["at"] for f in failures) < result["last"] - 1.0
