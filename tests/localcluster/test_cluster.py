"""End to end: a 2-node, 3-pod cluster built from namespaces, its traffic, and its teardown."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns

import nsutil
from localcluster.apps import start_apps
from localcluster.network import NetworkError, NetworkLayout, apply_service_rules, build_network
from localcluster.processes import is_running, read_records, spawn_in_netns
from localcluster.spec import ClusterSpec, parse_cluster
from localcluster.state import ClusterState, teardown

from .cluster_factory import APP_PORT, cluster_yaml

pytestmark = pytest.mark.netns

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
OUR_RANGES = [IPv4Network(n) for n in ("10.10.0.0/16", "10.244.0.0/16", "10.96.0.0/16")]


def _root_snapshot() -> tuple[set[tuple[int, str]], set[tuple[str, int, str]]]:
    """Root-namespace links, and routes touching the cluster's address ranges."""
    with IPRoute() as ipr:
        links = {(link["index"], link.get("ifname")) for link in ipr.get_links()}
        routes = set()
        for r in ipr.get_routes(family=socket.AF_INET, table=0):
            dst = r.get("dst") or "0.0.0.0"
            net = IPv4Network(f"{dst}/{r['dst_len']}", strict=False)
            gw = r.get("gateway")
            if any(net.overlaps(o) for o in OUR_RANGES) or (
                gw and any(IPv4Address(gw) in o for o in OUR_RANGES)
            ):
                routes.add((str(net), r["table"], str(gw)))
    return links, routes


def _ask(netns_path: str, ip: str, port: int, timeout: float = 5.0) -> str:
    """Connect from inside a netns and read the echo line; retries until the app listens."""
    fd = nsutil.open_netns(netns_path)
    try:
        deadline = time.monotonic() + timeout
        while True:
            s = nsutil.socket_in(fd)
            s.settimeout(2.0)
            try:
                s.connect((ip, port))
                return s.makefile().readline().strip()
            except OSError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.1)
            finally:
                s.close()
    finally:
        os.close(fd)


def _spec(name: str) -> ClusterSpec:
    return parse_cluster(cluster_yaml(name), HERE)


def _up(name: str, state_root: Path) -> tuple[ClusterSpec, NetworkLayout, ClusterState]:
    spec = _spec(name)
    state = ClusterState.open(name, state_root)
    layout = build_network(spec, state)
    start_apps(spec, layout, state)
    return spec, layout, state


def _nat_rules(netns_path: str) -> list[str]:
    out = subprocess.run(
        ["iptables-save", "-t", "nat"],
        capture_output=True,
        text=True,
        check=True,
        timeout=20,
        preexec_fn=nsutil.preexec_enter(netns_path),
    ).stdout
    return [line for line in out.splitlines() if line.startswith("-A")]


def test_pod_traffic_services_and_teardown(cluster_name, state_root):
    before = _root_snapshot()
    spec, layout, state = _up(cluster_name, state_root)
    client = layout.pod("travel", "client-0").netns_path

    # Same node, pod IP: the echo app reports its name and sees the client's own address.
    assert _ask(client, "10.244.1.11", APP_PORT) == "echo-0 10.244.1.10"
    # Other node, pod IP: routed node1 -> br0 -> node2, source preserved.
    assert _ask(client, "10.244.2.10", APP_PORT) == "echo-1 10.244.1.10"

    # Service VIP: DNAT spreads over both endpoints (bounded attempts).
    vip = str(spec.service("travel", "echo").vip)
    seen = set()
    for _ in range(40):
        seen.add(_ask(client, vip, 80).split()[0])
        if seen == {"echo-0", "echo-1"}:
            break
    assert seen == {"echo-0", "echo-1"}
    # From a process in a node netns too (OUTPUT chain).
    assert _ask(layout.node("node2").netns_path, vip, 80).split()[0] in {"echo-0", "echo-1"}

    # Apps got Kubernetes-style env and run in their own pod netns.
    for rec in read_records(state.pidfile_dir):
        pod = layout.pod("travel", rec.name.removeprefix("app-travel-"))
        assert os.stat(f"/proc/{rec.pid}/ns/net").st_ino == os.stat(pod.netns_path).st_ino
        environ = Path(f"/proc/{rec.pid}/environ").read_bytes().split(b"\0")
        assert f"ECHO_SERVICE_HOST={vip}".encode() in environ
        assert f"POD_IP={pod.ip}".encode() in environ

    # Re-applying service rules replaces them instead of duplicating.
    node1 = layout.node("node1").netns_path
    rules = _nat_rules(node1)
    apply_service_rules(spec, layout)
    apply_service_rules(spec, layout)
    assert _nat_rules(node1) == rules

    assert _root_snapshot() == before, "the root namespace changed"

    # A second build over the live cluster is refused, not half-done.
    with pytest.raises(NetworkError, match="tear it down first"):
        build_network(spec, ClusterState.open(cluster_name, state_root))

    records = read_records(state.pidfile_dir)
    assert len(records) == 3
    (state.dir / "ca").mkdir()
    (state.dir / "ca" / "root.pem").write_text("kept")
    report = teardown(cluster_name, state_root)
    assert report.processes_stopped == 3
    assert set(report.netns_removed) == set(layout.all_netns())
    assert not [n for n in pr_netns.listnetns() if n.startswith(f"{cluster_name}-")]
    assert not [r for r in records if is_running(r.pid, r.start_time)]
    assert sorted(p.name for p in state.dir.iterdir()) == ["ca"]
    assert (state.dir / "ca" / "root.pem").read_text() == "kept"
    # Idempotent: nothing left is success.
    assert teardown(cluster_name, state_root).netns_removed == ()


def test_teardown_after_builder_was_killed(cluster_name, state_root):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    builder = subprocess.Popen(
        [sys.executable, str(HERE / "build_and_wait.py"), cluster_name, str(state_root)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    try:
        assert builder.stdout is not None
        assert builder.stdout.readline().strip() == "ready"
    finally:
        builder.send_signal(signal.SIGKILL)
        builder.wait(timeout=10)
    records = read_records(state_root / cluster_name / "pids")
    assert len(records) == 3
    assert all(is_running(r.pid, r.start_time) for r in records)  # orphans survive the builder

    teardown(cluster_name, state_root)
    assert not [n for n in pr_netns.listnetns() if n.startswith(f"{cluster_name}-")]
    assert not [r for r in records if is_running(r.pid, r.start_time)]


def test_teardown_finds_a_process_without_pidfile_by_its_netns(cluster_name, state_root):
    """A crash between spawn and pidfile: netns membership finds the process. (The record
    cannot be lost that way: it names each netns before the netns exists.)"""
    spec = _spec(cluster_name)
    state = ClusterState.open(cluster_name, state_root)
    layout = build_network(spec, state)
    pod = layout.pod("travel", "echo-1")
    proc = spawn_in_netns(
        pod.netns_path,
        [sys.executable, "-c", "import time; time.sleep(60)"],
        {},
        HERE,
        state.log_dir / "orphan.log",
        state.pidfile_dir,
        "orphan",
    )
    proc.pidfile.unlink()

    report = teardown(cluster_name, state_root)
    assert report.processes_stopped == 1
    assert proc.popen.wait(timeout=5) is not None
    assert set(report.netns_removed) == set(layout.all_netns())


def test_teardown_of_unknown_cluster_succeeds(state_root):
    report = teardown("zz-none", state_root)
    assert report.processes_stopped == 0
    assert report.netns_removed == ()
