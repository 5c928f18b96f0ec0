"""The node agent end to end: enrolment by labels at runtime (no app restarts), the pod
opt-out, failing closed while no tunnel is connected, kubelet-probe bypass, and agent and
tunnel restarts in every order. A two-node cluster of its own (tests/e2e/agent.yaml).

"Through the tunnel" is observed in the tunnels' access logs: every proxied connection
gets one line whose src.addr is the client socket's own address, so a line for a given
client port proves that very connection was carried by a tunnel.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import pytest

import nsutil
from ambientctl import cli
from localcluster import mesh
from localcluster.xds import workload_uid
from meshcore.defaults import ADMIN_PORT
from redirect import probes
from redirect.enrolment import DATAPLANE_MODE_LABEL
from redirect.probes import ProbeConfig
from tests.support.aio import wait_until_sync

from .common import connect, pod_ip, talk

pytestmark = pytest.mark.netns

HERE = Path(__file__).parent
CLUSTER_FILE = HERE / "agent.yaml"
PROBE_SOURCE = "169.254.7.127"


# The agent's behaviour must not depend on the capture mode.
REDIRECT_MODES = ("iptables", "ebpf")


def mesh_mode(c: mesh.Cluster) -> str:
    return c.paths.redirect_mode.read_text().strip()


def uid(c: mesh.Cluster, ns: str, name: str) -> str:
    return workload_uid(c.spec, c.spec.pod(ns, name))


def tunnel_logs(c: mesh.Cluster) -> str:
    # Every tunnel process of the cluster, whatever its name (restarts append).
    return "".join(p.read_text() for p in sorted(c.state.log_dir.glob("ztunnel-*.log")))


def carried(c: mesh.Cluster, local: tuple[str, int], wait: float = 10.0) -> bool:
    """Whether a tunnel logged the connection from `local` within `wait` seconds."""
    needle = f'"src.addr": "{local[0]}:{local[1]}"'
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if needle in tunnel_logs(c):
            return True
        time.sleep(0.05)
    return False


def open_in_tunnel(c: mesh.Cluster, node: str, local: tuple[str, int]) -> bool:
    """Whether a node's tunnel lists the connection from `local` as open (admin view)."""
    status, body = mesh.node_http(c.layout, node, ADMIN_PORT, "/connections")
    assert status == 200
    return f'"src": "{local[0]}:{local[1]}"' in body.decode()


def until(cond: Callable[[], bool], what: str) -> None:
    # A cluster of processes: a longer bound than in-process waits.
    wait_until_sync(cond, what, limit=30.0, interval=0.05)


def open_echo(c: mesh.Cluster, ns: str, pod: str, ip: str) -> tuple[socket.socket, str]:
    """A connection to `ip`:9000 from a pod; returns it and the address the server saw."""
    s = connect(c, ns, pod, ip, 9000)
    seen = b""
    while not seen.endswith(b"\n"):
        chunk = s.recv(1)
        if not chunk:
            raise ConnectionError("closed before the greeting")
        seen += chunk
    return s, seen.decode().strip()


def close_cleanly(s: socket.socket) -> None:
    s.shutdown(socket.SHUT_WR)
    while s.recv(65536):
        pass
    s.close()


def echo_once(c: mesh.Cluster, ns: str, pod: str, ip: str) -> tuple[tuple[str, int], str]:
    """A fresh connection: greeting, one echo, clean close. Returns (local addr, seen)."""
    s, seen = open_echo(c, ns, pod, ip)
    local = s.getsockname()
    assert talk(s, b"ping") == b"ping"
    close_cleanly(s)
    return (local[0], local[1]), seen


def captured(c: mesh.Cluster, ns: str, pod: str) -> bool:
    """Whether the pod has capture installed, in either mode: both add the policy-routing
    rule that returns the tunnel's connections into the pod (fwmark 0x111 -> table 100)."""
    out = subprocess.run(
        ["ip", "-4", "rule"],
        capture_output=True,
        text=True,
        timeout=30,
        preexec_fn=nsutil.preexec_enter(c.pod_netns(ns, pod)),
        check=True,
    ).stdout
    return "fwmark 0x111/0xfff lookup 100" in out


def state_of(c: mesh.Cluster, node: str, pod_uid: str) -> str | None:
    entry = mesh.agent_pods(c, node).get(pod_uid)
    return None if entry is None else str(entry["state"])


# ---- runtime enrolment by labels ------------------------------------------------------------


def test_labelling_a_running_namespace_enrols_its_pods_without_restarting_them(
    cluster: mesh.Cluster,
) -> None:
    """Enrolling captures new connections only: one opened before keeps working, as it
    was, until it closes (Istio ambient resets it, istio/istio#48876: here only a SYN is
    ever redirected, so conntrack picking the flow up mid-stream changes nothing)."""
    c = cluster
    server = pod_ip(c, "late", "late-server")
    app_pid = (mesh.process_record(c, "app-late-late-client") or _missing()).pid
    before, seen = open_echo(c, "late", "late-client", server)
    assert seen.split(":")[0] == pod_ip(c, "late", "late-client")
    assert talk(before, b"plain") == b"plain"
    assert not captured(c, "late", "late-client")
    try:
        mesh.label_namespace(c, "late", DATAPLANE_MODE_LABEL, "ambient")
        mesh.wait_ready(c)
        assert state_of(c, "n1", uid(c, "late", "late-client")) == "enrolled"
        assert state_of(c, "n2", uid(c, "late", "late-server")) == "enrolled"
        assert captured(c, "late", "late-client")

        # The connection opened before the label carries on, as it was (not via a tunnel).
        for i in range(3):
            msg = f"still here {i}".encode()
            assert talk(before, msg) == msg
        before_local = before.getsockname()
        assert not open_in_tunnel(c, "n1", (before_local[0], before_local[1]))

        # New connections go through the tunnels; the server still sees the real client.
        local, seen = echo_once(c, "late", "late-client", server)
        assert seen.split(":")[0] == pod_ip(c, "late", "late-client")
        assert carried(c, local)
        assert '"dst.identity": "spiffe://cluster.local/ns/late/sa/late-server"' in tunnel_logs(c)
        # The same app process: nothing was restarted.
        assert (mesh.process_record(c, "app-late-late-client") or _missing()).pid == app_pid
    finally:
        before.close()
        mesh.label_namespace(c, "late", DATAPLANE_MODE_LABEL, None)
        mesh.wait_ready(c)


def _missing() -> NoReturn:
    raise AssertionError("the app process is not running")


def test_unlabelling_releases_pods_and_new_connections_are_plain(cluster: mesh.Cluster) -> None:
    """The reverse of enrolment: the redirects go first (new connections are plain), a
    connection the tunnels carry keeps working until it closes (Istio ambient resets it),
    then the tunnels let the pod go and the rest of the capture is removed."""
    c = cluster
    server = pod_ip(c, "late", "late-server")
    mesh.label_namespace(c, "late", DATAPLANE_MODE_LABEL, "ambient")
    try:
        mesh.wait_ready(c)
        during, _ = open_echo(c, "late", "late-client", server)
        during_local = during.getsockname()
        assert talk(during, b"in the mesh") == b"in the mesh"
        assert open_in_tunnel(c, "n1", (during_local[0], during_local[1]))
    finally:
        mesh.label_namespace(c, "late", DATAPLANE_MODE_LABEL, None)

    # New connections are plain at once, while the old one is still open.
    def plain_now() -> bool:
        # Both nodes' agents release their pod; until both have, a new connection may
        # meet the half-released path: the property checked is where they end up.
        try:
            local, seen = echo_once(c, "late", "late-client", server)
        except OSError:
            return False
        return seen == f"{local[0]}:{local[1]}" and not carried(c, local, wait=0.5)

    until(plain_now, "new connections to go direct")
    # The connection the tunnels carry keeps working, in both modes (iptables: its
    # conntrack binding and return path stay; eBPF: the release build of the programs
    # still steers its packets).
    for i in range(3):
        msg = f"after release {i}".encode()
        assert talk(during, msg) == msg
    assert open_in_tunnel(c, "n1", (during_local[0], during_local[1]))
    close_cleanly(during)

    mesh.wait_ready(c)
    assert state_of(c, "n1", uid(c, "late", "late-client")) is None
    assert state_of(c, "n2", uid(c, "late", "late-server")) is None
    assert not captured(c, "late", "late-client")
    assert not captured(c, "late", "late-server")
    for node in ("n1", "n2"):
        held = (mesh.tunnel_status(c.layout, node) or {}).get("pods") or {}
        assert not any("/late/" in u for u in held)
    probe_set = probes.entries(c.layout.node("n2").netns_path, ProbeConfig())
    assert pod_ip(c, "late", "late-server") not in {str(ip) for ip in probe_set}


def test_pod_opt_out_label(cluster: mesh.Cluster) -> None:
    c = cluster
    optout = uid(c, "mesh", "optout")
    assert state_of(c, "n1", optout) is None
    assert not captured(c, "mesh", "optout")
    probe_set = probes.entries(c.layout.node("n1").netns_path, ProbeConfig())
    assert pod_ip(c, "mesh", "optout") not in {str(ip) for ip in probe_set}
    assert pod_ip(c, "mesh", "server") in {str(ip) for ip in probe_set}

    # Remove the opt-out through the CLI: the namespace's ambient label then applies.
    state_root = str(c.state.dir.parent)
    base = ["--state-root", state_root, "label", str(CLUSTER_FILE), "pod", "mesh/optout"]
    assert cli.main([*base, f"{DATAPLANE_MODE_LABEL}-"]) == 0
    try:
        mesh.wait_ready(c)
        assert state_of(c, "n1", optout) == "enrolled"
        assert captured(c, "mesh", "optout")
        local, _ = echo_once(c, "mesh", "client", pod_ip(c, "mesh", "optout"))
        assert carried(c, local)
    finally:
        assert cli.main([*base, f"{DATAPLANE_MODE_LABEL}=none"]) == 0
        mesh.wait_ready(c)
    assert state_of(c, "n1", optout) is None
    assert not captured(c, "mesh", "optout")
    assert cli.main([*base, "not-a-label"]) == 2


# ---- failing closed -------------------------------------------------------------------------


def test_no_tunnel_means_blocked_not_plaintext_then_enrolled_when_one_acks(
    cluster: mesh.Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    c = cluster
    victim = uid(c, "closed", "victim")
    legacy = pod_ip(c, "plain", "legacy")
    assert mesh.stop_tunnel(c, "n2")
    try:
        mesh.label_namespace(c, "closed", DATAPLANE_MODE_LABEL, "ambient")
        until(lambda: state_of(c, "n2", victim) == "pending", "the victim to be pending")
        entry = mesh.agent_pods(c, "n2")[victim]
        assert "no tunnel" in entry["reason"]
        assert captured(c, "closed", "victim")
        # Its traffic is blocked (refused by iptables capture, dropped by eBPF capture),
        # never sent around the tunnel.
        s = nsutil.socket_at(c.pod_netns("closed", "victim"))
        s.settimeout(3)
        with pytest.raises((ConnectionRefusedError, TimeoutError)):
            s.connect((legacy, 9000))
        s.close()
        capsys.readouterr()
        rc = cli.main(
            ["--state-root", str(c.state.dir.parent), "status", str(CLUSTER_FILE), "-o", "json"]
        )
        assert rc == 1 and '"state": "pending"' in capsys.readouterr().out
    finally:
        mesh.start_node_tunnel(c, "n2")
    mesh.wait_ready(c)
    assert state_of(c, "n2", victim) == "enrolled"
    local, seen = echo_once(c, "closed", "victim", legacy)
    assert seen.split(":")[0] == pod_ip(c, "closed", "victim")
    assert carried(c, local)
    mesh.label_namespace(c, "closed", DATAPLANE_MODE_LABEL, None)
    mesh.wait_ready(c)


# ---- kubelet probes -------------------------------------------------------------------------


def test_probes_from_the_node_reach_the_app_directly(cluster: mesh.Cluster) -> None:
    c = cluster
    server = pod_ip(c, "mesh", "server")
    s = nsutil.socket_at(c.layout.node("n1").netns_path)  # a local process of the node
    s.settimeout(15)
    s.connect((server, 9000))
    f = s.makefile("rb")
    seen = f.readline().decode().strip()
    local = s.getsockname()
    s.sendall(b"probe")
    s.shutdown(socket.SHUT_WR)
    assert f.read() == b"probe"
    s.close()
    assert seen.split(":")[0] == PROBE_SOURCE  # SNATed, and accepted unredirected in the pod
    assert not carried(c, (PROBE_SOURCE, int(seen.split(":")[1])), wait=1.0)
    assert not carried(c, (local[0], local[1]), wait=0.1)

    # From another pod the same port goes through the tunnel.
    local2, seen2 = echo_once(c, "mesh", "client", server)
    assert seen2.split(":")[0] == pod_ip(c, "mesh", "client")
    assert carried(c, local2)


# ---- restarts -------------------------------------------------------------------------------


def _restart(c: mesh.Cluster, order: str, node: str) -> None:
    if order == "agent":
        mesh.restart_agent(c, node)
    elif order == "tunnel":
        mesh.restart_tunnel(c, node)
    elif order == "tunnel-killed":
        assert mesh.kill_tunnel(c, node)
        mesh.start_node_tunnel(c, node)
    else:
        assert mesh.stop_tunnel(c, node)
        assert mesh.stop_agent(c, node)
        if order == "both-agent-first":
            mesh.start_node_agent(c, node)
            time.sleep(0.5)  # let it serve before the tunnel comes (an order, not a timing check)
            mesh.start_node_tunnel(c, node)
        else:
            mesh.start_node_tunnel(c, node)
            time.sleep(0.5)
            mesh.start_node_agent(c, node)


def enrolled_lines(c: mesh.Cluster, node: str, pod_uid: str) -> int:
    text = c.tunnel_log(node).read_text()
    return sum(
        1 for line in text.splitlines() if '"pod enrolled"' in line and f'"{pod_uid}"' in line
    )


@pytest.mark.parametrize(
    "order", ["agent", "tunnel", "tunnel-killed", "both-agent-first", "both-tunnel-first"]
)
def test_restarts_in_every_order_serve_every_pod_once(cluster: mesh.Cluster, order: str) -> None:
    c = cluster
    client = uid(c, "mesh", "client")
    before_agent = (mesh.agent_status(c, "n1") or {}).get("pid")
    lines_before = enrolled_lines(c, "n1", client)
    _restart(c, order, "n1")
    mesh.wait_ready(c)
    want = mesh.wanted_uids(c, "n1")
    tunnel = mesh.tunnel_status(c.layout, "n1") or {}
    assert set(tunnel.get("pods") or {}) == want
    agent = mesh.agent_status(c, "n1") or {}
    assert all(p["state"] == "enrolled" for p in agent["pods"].values())
    if order == "agent":
        assert agent["pid"] != before_agent
        # The tunnel kept serving: the new agent's snapshot did not make it start anew.
        assert enrolled_lines(c, "n1", client) == lines_before
    for target in (pod_ip(c, "mesh", "server"), pod_ip(c, "mesh", "server-b")):
        local, seen = echo_once(c, "mesh", "client", target)
        assert seen.split(":")[0] == pod_ip(c, "mesh", "client")
        assert carried(c, local)


def test_upgrade_overlap_new_pods_go_to_the_newest_tunnel(cluster: mesh.Cluster) -> None:
    """Two tunnels on a node (an upgrade): the agent hands new pods to the newer one; once
    the old one leaves, the newer serves every pod."""
    c = cluster
    optout = uid(c, "mesh", "optout")
    mesh.start_node_tunnel(c, "n1", "ztunnel-n1-next")
    try:
        until(lambda: (mesh.agent_status(c, "n1") or {}).get("tunnels") == 2, "two tunnels")
        old_mark = len(c.tunnel_log("n1").read_text())
        mesh.label_pod(c, "mesh", "optout", DATAPLANE_MODE_LABEL, None)  # a new pod
        until(lambda: state_of(c, "n1", optout) == "enrolled", "the new pod enrolled")
        next_log = c.state.log_dir / "ztunnel-n1-next.log"
        until(lambda: optout in next_log.read_text(), "the newer tunnel to take it")
        assert optout not in c.tunnel_log("n1").read_text()[old_mark:]
        assert mesh.stop_tunnel(c, "n1")  # the old one goes
        mesh.wait_ready(c)
        for target in ("server", "optout"):
            local, _ = echo_once(c, "mesh", "client", pod_ip(c, "mesh", target))
            assert carried(c, local)
    finally:
        mesh.label_pod(c, "mesh", "optout", DATAPLANE_MODE_LABEL, "none")
        mesh.stop_tunnel(c, "n1", "ztunnel-n1-next")
        mesh.start_node_tunnel(c, "n1")
        mesh.wait_ready(c)
