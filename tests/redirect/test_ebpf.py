"""The in-pod capture, held to one set of checks in both modes (iptables and eBPF).

Netns tests build a two-namespace topology of their own: a "client" netns and a "pod" netns
joined by a veth, nothing routed from the root namespace. Inside the pod, the tunnel's
listeners are stood in for by the tunnel's own `meshcore.sockets.listener` (marked 0x539,
IP_TRANSPARENT where the tunnel sets it), created from outside through the netns fd as the
tunnel does. State is compared through the command-line tools (tc, ip, sysctl,
iptables-save), independently of the modules under test.

The pure tests at the end need no root.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import secrets
import shlex
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

import nsutil
from meshcore import defaults, sockets
from meshcore.sockets import NetnsSocketFactory, SocketAddr, listener, make_transparent
from redirect import capture, ebpf, ebpf_plan
from redirect.capture import RedirectMode
from redirect.iptables import CaptureError
from redirect.rules import InpodConfig
from tests.support.netns import throwaway_netns

CLIENT_IP = "10.253.0.1"
POD_IP = "10.253.0.2"
PREFIX = 24
APP_PORT = 8080
REMOTE_PORT = 9090
PROBE_IP = str(InpodConfig().probe_snat_ip)
WAIT = 5.0  # seconds a socket call may block where success is expected
ABSENT = 1.0  # seconds to wait for something that must not happen


@dataclass
class Topology:
    """Client and pod namespaces; sockets opened through it are closed at teardown."""

    client: str  # netns paths
    pod: str
    client_fd: int
    pod_fd: int
    opened: list[socket.socket] = field(default_factory=list)
    factories: list[NetnsSocketFactory] = field(default_factory=list)

    def _keep(self, s: socket.socket) -> socket.socket:
        self.opened.append(s)
        return s

    def tunnel_factory(self) -> NetnsSocketFactory:
        """The tunnel's socket factory for the pod (marked sockets, transparent)."""
        f = NetnsSocketFactory(os.dup(self.pod_fd))
        self.factories.append(f)
        return f

    def tunnel_listener(self, port: int) -> socket.socket:
        s = self._keep(listener(self.tunnel_factory(), port, backlog=16))
        s.settimeout(WAIT)
        return s

    def tunnel_socket(self) -> socket.socket:
        s = self._keep(self.tunnel_factory().new())
        s.settimeout(WAIT)
        return s

    def _plain(self, fd: int) -> socket.socket:
        s = self._keep(nsutil.socket_in(fd))
        s.settimeout(WAIT)
        return s

    def pod_socket(self) -> socket.socket:
        """An app socket in the pod (no mark)."""
        return self._plain(self.pod_fd)

    def client_socket(self) -> socket.socket:
        return self._plain(self.client_fd)

    def _listen(self, s: socket.socket, addr: tuple[str, int]) -> socket.socket:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(addr)
        s.listen(16)
        return s

    def app_server(self) -> socket.socket:
        return self._listen(self.pod_socket(), ("0.0.0.0", APP_PORT))

    def remote_server(self) -> socket.socket:
        return self._listen(self.client_socket(), (CLIENT_IP, REMOTE_PORT))

    def close(self) -> None:
        for s in self.opened:
            s.close()
        for f in self.factories:
            f.close()
        os.close(self.client_fd)
        os.close(self.pod_fd)


def _wire(pod: str, client: str) -> None:
    with IPRoute(netns=pod, flags=0) as ipr:
        ipr.link("add", ifname="eth0", kind="veth", peer={"ifname": "c0", "net_ns_fd": client})
        eth0 = ipr.link_lookup(ifname="eth0")[0]
        ipr.addr("add", index=eth0, address=POD_IP, prefixlen=PREFIX)
        ipr.link("set", index=eth0, state="up")
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        # Kubelet probes come from the node's SNAT address; here the client netns holds it.
        ipr.route("add", dst=f"{PROBE_IP}/32", oif=eth0, scope=253)
    with IPRoute(netns=client, flags=0) as ipr:
        c0 = ipr.link_lookup(ifname="c0")[0]
        ipr.addr("add", index=c0, address=CLIENT_IP, prefixlen=PREFIX)
        ipr.addr("add", index=c0, address=PROBE_IP, prefixlen=32)
        ipr.link("set", index=c0, state="up")
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")


@pytest.fixture
def topology() -> Iterator[Topology]:
    with (
        throwaway_netns("ebt-c", lo_up=False) as client,
        throwaway_netns("ebt-p", lo_up=False) as pod,
    ):
        _wire(pod, client)
        topo = Topology(client, pod, nsutil.open_netns(client), nsutil.open_netns(pod))
        try:
            yield topo
        finally:
            topo.close()


@pytest.fixture(params=list(RedirectMode), ids=lambda m: m.value)
def mode(request: pytest.FixtureRequest) -> RedirectMode:
    value: RedirectMode = request.param
    return value


@pytest.fixture
def captured(topology: Topology, mode: RedirectMode) -> Iterator[Topology]:
    """The topology with the pod's capture installed in `mode` (removed at teardown)."""
    capture.install(topology.pod, mode)
    try:
        yield topology
    finally:
        with contextlib.suppress(CaptureError):
            capture.remove(topology.pod, mode)


def _exchange(a: socket.socket, b: socket.socket, size: int) -> None:
    """`size` bytes a -> b and back, large enough for segmentation offload to take part."""
    payload = secrets.token_bytes(size)
    for src, dst in ((a, b), (b, a)):
        sender = threading.Thread(target=src.sendall, args=(payload,))
        sender.start()
        got = bytearray()
        while len(got) < size:
            chunk = dst.recv(1 << 20)
            assert chunk, "peer closed early"
            got += chunk
        sender.join()
        assert bytes(got) == payload


def _nothing_pending(server: socket.socket) -> bool:
    server.settimeout(ABSENT)
    try:
        conn, _ = server.accept()
    except TimeoutError:
        return True
    conn.close()
    return False


# --- behaviour, both modes ------------------------------------------------------------


@pytest.mark.netns
def test_outbound_lands_on_15001_with_original_destination(captured: Topology) -> None:
    out = captured.tunnel_listener(defaults.OUTBOUND_PORT)
    remote = captured.remote_server()
    app = captured.pod_socket()

    app.connect((CLIENT_IP, REMOTE_PORT))
    conn, peer = out.accept()
    with conn:
        assert peer[0] == POD_IP
        assert sockets.original_dst(conn) == SocketAddr.of((CLIENT_IP, REMOTE_PORT))
        _exchange(app, conn, 4 << 20)
    assert _nothing_pending(remote)


@pytest.mark.netns
def test_inbound_lands_on_15006_with_original_destination(captured: Topology) -> None:
    inbound = captured.tunnel_listener(defaults.INBOUND_PLAIN_PORT)
    outbound = captured.tunnel_listener(defaults.OUTBOUND_PORT)
    app = captured.app_server()

    for port in (APP_PORT, defaults.OUTBOUND_PORT):  # a tunnel port too: a self-call to refuse
        client = captured.client_socket()
        client.connect((POD_IP, port))
        conn, peer = inbound.accept()
        with conn:
            assert peer[0] == CLIENT_IP
            assert sockets.original_dst(conn) == SocketAddr.of((POD_IP, port))
            _exchange(client, conn, 1 << 20)
    assert _nothing_pending(app)
    assert _nothing_pending(outbound)


@pytest.mark.netns
def test_hbone_port_reaches_15008(captured: Topology) -> None:
    hbone = captured.tunnel_listener(defaults.HBONE_PORT)
    inbound = captured.tunnel_listener(defaults.INBOUND_PLAIN_PORT)
    client = captured.client_socket()
    client.connect((POD_IP, defaults.HBONE_PORT))
    conn, peer = hbone.accept()
    with conn:
        assert peer[0] == CLIENT_IP
        assert conn.getsockname() == (POD_IP, defaults.HBONE_PORT)
        _exchange(client, conn, 1 << 16)
    assert _nothing_pending(inbound)


@pytest.mark.netns
def test_an_hbone_syn_while_no_tunnel_listens_is_dropped_and_the_retry_reaches_the_next(
    captured: Topology,
) -> None:
    """Between one tunnel's exit and the next one's start, a peer's dial to 15008 is not
    refused: its SYN is dropped and the retransmission (1 s later) meets the new listener."""
    client = captured.client_socket()
    client.setblocking(False)
    assert client.connect_ex((POD_IP, defaults.HBONE_PORT)) == errno.EINPROGRESS
    time.sleep(0.3)
    # A reset would have failed the connect by now (ECONNREFUSED).
    assert client.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
    hbone = captured.tunnel_listener(defaults.HBONE_PORT)
    conn, peer = hbone.accept()  # within WAIT: the SYN sent again
    with conn:
        assert peer[0] == CLIENT_IP
        client.setblocking(True)
        client.settimeout(WAIT)
        _exchange(client, conn, 1 << 10)


@pytest.mark.netns
def test_tunnel_marked_traffic_goes_straight_out(captured: Topology) -> None:
    out = captured.tunnel_listener(defaults.OUTBOUND_PORT)
    remote = captured.remote_server()
    tunnel = captured.tunnel_socket()
    tunnel.connect((CLIENT_IP, REMOTE_PORT))
    conn, peer = remote.accept()
    with conn:
        assert peer == tunnel.getsockname()
        assert peer[0] == POD_IP
        _exchange(tunnel, conn, 1 << 20)
    assert _nothing_pending(out)


@pytest.mark.netns
def test_loopback_inside_pod_is_untouched(captured: Topology) -> None:
    out = captured.tunnel_listener(defaults.OUTBOUND_PORT)
    inbound = captured.tunnel_listener(defaults.INBOUND_PLAIN_PORT)
    app = captured.app_server()
    for target in ("127.0.0.1", POD_IP):  # loopback, and the app calling its own pod IP
        caller = captured.pod_socket()
        caller.connect((target, APP_PORT))
        conn, peer = app.accept()
        with conn:
            assert peer == caller.getsockname()
            assert conn.getsockname() == (target, APP_PORT)
            _exchange(caller, conn, 1 << 20)
    assert _nothing_pending(out)
    assert _nothing_pending(inbound)


@pytest.mark.netns
def test_transparent_connect_to_app_keeps_client_source(captured: Topology) -> None:
    """The tunnel's inbound leg: connect to the app from the client's own address. The app's
    replies go towards the client's network and must come back to the tunnel's socket."""
    inbound = captured.tunnel_listener(defaults.INBOUND_PLAIN_PORT)
    app = captured.app_server()
    tunnel = captured.tunnel_socket()
    make_transparent(tunnel, CLIENT_IP)
    tunnel.connect((POD_IP, APP_PORT))
    conn, peer = app.accept()
    with conn:
        assert peer == tunnel.getsockname()
        assert peer[0] == CLIENT_IP
        _exchange(tunnel, conn, 4 << 20)
    assert _nothing_pending(inbound)


@pytest.mark.netns
def test_kubelet_probe_source_passes_untouched(captured: Topology) -> None:
    inbound = captured.tunnel_listener(defaults.INBOUND_PLAIN_PORT)
    app = captured.app_server()
    probe = captured.client_socket()
    probe.bind((PROBE_IP, 0))
    probe.connect((POD_IP, APP_PORT))
    conn, peer = app.accept()
    with conn:
        assert peer[0] == PROBE_IP
        _exchange(probe, conn, 1 << 16)
    assert _nothing_pending(inbound)


@pytest.mark.netns
def test_without_tunnel_listeners_nothing_bypasses_the_tunnel(captured: Topology) -> None:
    """Fail closed: with no tunnel in the pod, captured connections do not reach their
    destination. Their SYNs are dropped, not refused, in both modes, so the client's
    retransmission reaches the next tunnel (a tunnel gap is a delay, not an error)."""
    app = captured.app_server()
    remote = captured.remote_server()
    inbound = captured.client_socket()
    inbound.settimeout(ABSENT)
    with pytest.raises(TimeoutError):
        inbound.connect((POD_IP, APP_PORT))
    outbound = captured.pod_socket()
    outbound.settimeout(ABSENT)
    with pytest.raises(TimeoutError):
        outbound.connect((CLIENT_IP, REMOTE_PORT))
    assert _nothing_pending(app)
    assert _nothing_pending(remote)


@pytest.mark.netns
def test_release_keeps_captured_connections_and_lets_new_ones_go_direct(
    captured: Topology, mode: RedirectMode
) -> None:
    """`stop_redirects` (a pod leaving the mesh): a connection the capture steered to the
    tunnel keeps flowing there; a new one goes straight to its destination."""
    out = captured.tunnel_listener(defaults.OUTBOUND_PORT)
    remote = captured.remote_server()
    app = captured.pod_socket()
    app.connect((CLIENT_IP, REMOTE_PORT))
    conn, _ = out.accept()
    with conn:
        _exchange(app, conn, 64 << 10)
        capture.stop_redirects(captured.pod, mode)
        _exchange(app, conn, 1 << 20)  # still through the tunnel's socket
        assert _nothing_pending(remote)
        direct = captured.pod_socket()
        direct.connect((CLIENT_IP, REMOTE_PORT))
        peer, _ = remote.accept()
        with peer:
            _exchange(direct, peer, 64 << 10)
        assert _nothing_pending(out)
    capture.remove(captured.pod, mode)


# --- install / remove -----------------------------------------------------------------


def _state(path: str) -> dict[str, object]:
    """Everything either mode may change in the pod, as the tools print it (tc filter lines
    carry the program id, so a re-attached program shows)."""
    links = [
        line.split(":")[1].strip().split("@")[0]
        for line in nsutil.run_in(path, "ip", "-o", "link", "show").splitlines()
    ]
    save = nsutil.run_in(path, "iptables-save")
    state: dict[str, object] = {
        "qdiscs": nsutil.run_in(path, "tc", "qdisc", "show"),
        "rules": nsutil.run_in(path, "ip", "rule"),
        "routes": nsutil.run_in(path, "ip", "-4", "route", "show", "table", "all"),
        "accept_local": nsutil.run_in(path, "sysctl", "-n", "net.ipv4.conf.lo.accept_local"),
        "iptables": [line for line in save.splitlines() if not line.startswith("#")],
        "nft": nsutil.run_in(path, "nft", "-s", "list", "ruleset"),
        "bpffs": sorted(os.listdir("/sys/fs/bpf")) if os.path.isdir("/sys/fs/bpf") else [],
    }
    for link in links:
        for hook in ("ingress", "egress"):
            state[f"filter {link} {hook}"] = nsutil.run_in(
                path, "tc", "filter", "show", "dev", link, hook
            )
    return state


@pytest.mark.netns
def test_install_twice_changes_nothing_and_remove_restores(
    topology: Topology, mode: RedirectMode
) -> None:
    before = _state(topology.pod)
    capture.install(topology.pod, mode)
    once = _state(topology.pod)
    assert once != before
    assert "fwmark 0x111/0xfff lookup 100" in str(once["rules"])
    if mode is RedirectMode.EBPF:
        assert "ambient-capture:lo:" in str(once["filter lo ingress"])
        assert "ambient-capture:in:" in str(once["filter eth0 ingress"])
        assert "ambient-capture:out:" in str(once["filter eth0 egress"])
        assert str(once["accept_local"]).strip() == "1"

    capture.install(topology.pod, mode)
    assert _state(topology.pod) == once

    capture.remove(topology.pod, mode)
    assert _state(topology.pod) == before
    capture.remove(topology.pod, mode)
    assert _state(topology.pod) == before


@pytest.mark.netns
def test_ebpf_remove_keeps_foreign_tc_and_prior_accept_local(topology: Topology) -> None:
    """What was there before stays: another clsact filter on eth0 and lo's accept_local=1."""
    pod = topology.pod
    nsutil.run_in(pod, "sysctl", "-w", "net.ipv4.conf.lo.accept_local=1")
    nsutil.run_in(pod, "tc", "qdisc", "add", "dev", "eth0", "clsact")
    # Someone else's classifier (matching only TCP port 1, so it decides nothing here).
    nsutil.run_in(pod, *shlex.split("tc filter add dev eth0 ingress pref 7 protocol ip u32"),
            *shlex.split("match ip dport 1 0xffff"))  # fmt: skip
    before = _state(pod)
    capture.install(pod, RedirectMode.EBPF)
    assert "ambient-capture:lo:" in str(_state(pod)["filter lo ingress"])
    capture.remove(pod, RedirectMode.EBPF)
    assert _state(pod) == before


@pytest.mark.netns
def test_ebpf_failed_install_rolls_back(
    topology: Topology, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure on the last hook (lo and the ingress hooks, routing and accept_local already
    in place) leaves the pod as it was."""
    before = _state(topology.pod)
    real = ebpf._put_filter

    def failing(ipr: object, index: int, hook: ebpf_plan.Hook, *args: object, **kw: object) -> None:
        if hook is ebpf_plan.POD_EGRESS:
            raise NetlinkError(errno.EBUSY)
        real(ipr, index, hook, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(ebpf, "_put_filter", failing)
    with pytest.raises(CaptureError, match="tc") as info:
        capture.install(topology.pod, RedirectMode.EBPF)
    assert "Device or resource busy" in info.value.detail
    assert _state(topology.pod) == before


@pytest.mark.netns
def test_missing_netns_is_a_capture_error(mode: RedirectMode) -> None:
    path = f"/var/run/netns/ebt-missing-{secrets.token_hex(4)}"
    with pytest.raises(CaptureError, match="pod still running"):
        capture.install(path, mode)
    with pytest.raises(CaptureError):
        capture.remove(path, mode)
    assert not os.path.exists(path)


@pytest.mark.netns
def test_ebpf_pod_without_addressed_interface_fails_closed() -> None:
    with throwaway_netns("ebt-bare", lo_up=False) as path:
        before = _state(path)
        with pytest.raises(CaptureError, match="no interface with an IPv4 address"):
            capture.install(path, RedirectMode.EBPF)
        assert _state(path) == before


@pytest.mark.netns
def test_ebpf_refuses_a_pod_with_a_non_ethernet_interface(topology: Topology) -> None:
    """A tun device carries bare IP: the programs could not parse it, so its traffic would
    pass uncaptured. The install fails and leaves the pod as it was."""
    nsutil.run_in(topology.pod, *shlex.split("ip tuntap add dev tun7 mode tun"))
    nsutil.run_in(topology.pod, *shlex.split("ip addr add 10.253.9.1/24 dev tun7"))
    before = _state(topology.pod)
    with pytest.raises(CaptureError, match="not Ethernet: tun7"):
        capture.install(topology.pod, RedirectMode.EBPF)
    assert _state(topology.pod) == before


# --- pure -----------------------------------------------------------------------------


def test_dns_capture_is_a_setting_of_the_build() -> None:
    plain = ebpf_plan.cflags(InpodConfig())
    dns = ebpf_plan.cflags(InpodConfig(capture_dns=True, dns_port=5353))
    assert "-DCFG_CAPTURE_DNS=0" in plain and "-DCFG_CAPTURE_DNS=1" in dns
    assert "-DCFG_DNS_PORT=5353" in dns
    source = ebpf_plan.SOURCE_PATH.read_text()
    assert ebpf_plan.build_id(source, plain) != ebpf_plan.build_id(source, dns)


def test_filter_names_round_trip_and_foreign_names_are_not_ours() -> None:
    lo = ebpf_plan.filter_name(ebpf_plan.LO_INGRESS, "abc123", 0)
    out = ebpf_plan.filter_name(ebpf_plan.POD_EGRESS, "abc123", 0)
    assert lo.text() == "ambient-capture:lo:abc123:al=0"
    assert out.text() == "ambient-capture:out:abc123"  # only lo records accept_local
    for name in (lo, out, ebpf_plan.FilterName("in", "f00", None)):
        assert ebpf_plan.FilterName.parse(name.text()) == name
    foreign_names = (
        None,
        "",
        "cil_from_container",
        "ambient-capture",
        "ambient-capture::x",
        "ambient-capture:lo:b:al=2",
        "ambient-capture:lo:b:xx=1",
        "other:lo:b",
    )
    for foreign in foreign_names:
        assert ebpf_plan.FilterName.parse(foreign) is None


def test_up_to_date_only_for_same_role_and_build() -> None:
    hook = ebpf_plan.POD_INGRESS
    assert ebpf_plan.up_to_date(ebpf_plan.FilterName("in", "b1"), hook, "b1")
    assert not ebpf_plan.up_to_date(ebpf_plan.FilterName("in", "b0"), hook, "b1")
    assert not ebpf_plan.up_to_date(ebpf_plan.FilterName("out", "b1"), hook, "b1")
    assert not ebpf_plan.up_to_date(None, hook, "b1")


def test_build_id_follows_source_and_every_setting() -> None:
    src = ebpf_plan.SOURCE_PATH.read_text()
    base = ebpf_plan.build_id(src, ebpf_plan.cflags(InpodConfig()))
    assert base == ebpf_plan.build_id(src, ebpf_plan.cflags(InpodConfig()))
    variants = [
        InpodConfig(tunnel_mark=0x538),
        InpodConfig(conn_mark=0x112),
        InpodConfig(mask=0xFFFF),
        InpodConfig(probe_snat_ip=ipaddress.IPv4Address("169.254.7.128")),
        InpodConfig(outbound_port=15101),
        InpodConfig(inbound_plain_port=15106),
        InpodConfig(inbound_hbone_port=15108),
    ]
    ids = {ebpf_plan.build_id(src, ebpf_plan.cflags(c)) for c in variants}
    assert base not in ids and len(ids) == len(variants)
    assert ebpf_plan.build_id(src + "\n", ebpf_plan.cflags(InpodConfig())) != base


def test_probe_address_is_passed_as_the_raw_network_order_word() -> None:
    flags = dict(f.removeprefix("-D").split("=") for f in ebpf_plan.cflags(InpodConfig()))
    raw = int(flags["CFG_PROBE_IP"].rstrip("u"), 16).to_bytes(4, sys.byteorder)
    assert socket.inet_ntoa(raw) == "169.254.7.127"
    assert flags["CFG_TUNNEL_MARK"] == "0x539u" and flags["CFG_CONN_MARK"] == "0x111u"


def test_original_dst_without_conntrack_entry_is_the_local_address() -> None:
    """A connection that was not NATed (loopback here; eBPF-steered in a pod) has its
    original destination as its own local address."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        with socket.create_connection(srv.getsockname()) as cli:
            conn, _ = srv.accept()
            with conn:
                assert sockets.original_dst(conn) == SocketAddr.of(srv.getsockname())
                assert cli.getpeername() == srv.getsockname()
