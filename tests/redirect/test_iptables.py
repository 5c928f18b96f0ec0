"""Netns tests of applying and removing the in-pod capture rules in a throwaway namespace.

State is compared through the command-line tools (iptables-save, nft, ip), independently of
the module under test.
"""

from __future__ import annotations

import os
import secrets
import socket
import struct
from collections.abc import Iterator

import pytest
from pyroute2 import IPRoute

import nsutil
from redirect import rules
from redirect.iptables import CaptureError, apply_inpod, remove_inpod, snapshot
from redirect.rules import InpodConfig
from tests.support.netns import throwaway_netns

pytestmark = pytest.mark.netns

SO_ORIGINAL_DST = 80
# Nothing listens on the capture port in these tests unless a test starts it.
POD_ADDR = "10.250.0.2"
REMOTE = ("10.250.0.9", 80)


def _state(path: str) -> dict[str, str]:
    """Everything apply may change: rules without counters or timestamps, ip rules, table 100."""
    save = nsutil.run_in(path, "iptables-save")
    return {
        "iptables": "".join(line + "\n" for line in save.splitlines() if not line.startswith("#")),
        "nft": nsutil.run_in(path, "nft", "-s", "list", "ruleset"),
        "rules": nsutil.run_in(path, "ip", "rule"),
        # "show table 100" fails while the table does not exist; list all and filter.
        "table100": "".join(
            line + "\n"
            for line in nsutil.run_in(
                path, "ip", "-4", "route", "show", "table", "all"
            ).splitlines()
            if " table 100 " in line + " "
        ),
    }


@pytest.fixture
def pod() -> Iterator[str]:
    with throwaway_netns("rdt") as path:
        yield path


def test_apply_twice_changes_nothing_and_remove_restores(pod: str) -> None:
    cfg = InpodConfig()
    before = _state(pod)
    assert "ISTIO" not in before["iptables"]

    apply_inpod(pod, cfg)
    once = _state(pod)
    assert "-A OUTPUT -j ISTIO_OUTPUT" in once["iptables"]
    assert "fwmark 0x111/0xfff lookup 100" in once["rules"]
    assert "local default dev lo table 100" in once["table100"]
    assert rules.chain_bodies_match(cfg, rules.parse_iptables_save(once["iptables"]))

    apply_inpod(pod, cfg)
    assert _state(pod) == once

    remove_inpod(pod, cfg)
    assert _state(pod) == before  # includes: no empty nat/mangle tables left behind
    remove_inpod(pod, cfg)
    assert _state(pod) == before


def test_remove_from_untouched_pod_creates_nothing(pod: str) -> None:
    before = _state(pod)
    remove_inpod(pod, InpodConfig())
    assert _state(pod) == before


def test_foreign_rules_survive_apply_and_remove(pod: str) -> None:
    nsutil.run_in(pod, "iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "lo", "-j", "ACCEPT")
    nsutil.run_in(pod, "iptables", "-t", "filter", "-A", "INPUT", "-p", "udp", "-j", "ACCEPT")
    before = _state(pod)
    apply_inpod(pod, InpodConfig())
    remove_inpod(pod, InpodConfig())
    after = _state(pod)
    assert after == before
    assert "-A POSTROUTING -o lo -j ACCEPT" in after["iptables"]


def test_dns_variant_is_removed_by_any_config(pod: str) -> None:
    before = _state(pod)
    apply_inpod(pod, InpodConfig(capture_dns=True))
    applied = _state(pod)
    assert "*raw" in applied["iptables"]
    assert "--to-ports 15053" in applied["iptables"]
    remove_inpod(pod, InpodConfig())  # removal is driven by what the pod has
    assert _state(pod) == before


def test_snapshot_reflects_apply(pod: str) -> None:
    cfg = InpodConfig()
    empty = snapshot(pod, cfg)
    apply_inpod(pod, cfg)
    full = snapshot(pod, cfg)
    assert (32764, 0x111, 0xFFF, 100) in full.ip_rules
    assert (32764, 0x111, 0xFFF, 100) not in empty.ip_rules
    assert len(full.routes) == 1
    assert "ISTIO_PRERT" in full.iptables
    remove_inpod(pod, cfg)
    assert snapshot(pod, cfg) == empty


def test_missing_netns_is_a_capture_error() -> None:
    path = f"/var/run/netns/rdt-missing-{secrets.token_hex(4)}"
    with pytest.raises(CaptureError, match="pod still running"):
        apply_inpod(path, InpodConfig())
    with pytest.raises(CaptureError):
        remove_inpod(path, InpodConfig())
    assert not os.path.exists(path)  # and nothing created it


def test_failed_apply_rolls_back(pod: str, monkeypatch: pytest.MonkeyPatch) -> None:
    before = _state(pod)
    # A rule iptables cannot load: the restore step fails after routing was applied.
    monkeypatch.setattr(
        rules, "chain_bodies", lambda cfg: {"mangle": (), "nat": (("ISTIO_OUTPUT", "-j NOPE"),)}
    )
    with pytest.raises(CaptureError, match="iptables-restore") as info:
        apply_inpod(pod, InpodConfig())
    assert info.value.detail  # iptables' own stderr is carried
    assert _state(pod) == before


# --- behaviour ------------------------------------------------------------------------


@pytest.fixture
def wired_pod(pod: str) -> str:
    """The pod with a veth pair, both ends inside the netns, one holding 10.250.0.2/24.

    (No dummy links on this kernel.) Nothing answers ARP for other 10.250.0.x addresses,
    so a packet that escapes capture goes nowhere and stays inside the netns.
    """
    with IPRoute(netns=pod, flags=0) as ipr:
        ipr.link("add", ifname="eth0", kind="veth", peer="peer0")
        idx = ipr.link_lookup(ifname="eth0")[0]
        ipr.addr("add", index=idx, address=POD_ADDR, prefixlen=24)
        ipr.link("set", index=idx, state="up")
        ipr.link("set", index=ipr.link_lookup(ifname="peer0")[0], state="up")
    return pod


def _original_dst(conn: socket.socket) -> tuple[str, int]:
    raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, addr = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(addr), port


def test_outbound_tcp_is_redirected_and_marked_tcp_is_not(wired_pod: str) -> None:
    cfg = InpodConfig()
    apply_inpod(wired_pod, cfg)
    fd = nsutil.open_netns(wired_pod)
    listener = nsutil.socket_in(fd)
    app = nsutil.socket_in(fd)
    tunnel = nsutil.socket_in(fd)
    try:
        listener.bind(("0.0.0.0", cfg.outbound_port))
        listener.listen(8)
        listener.settimeout(5)

        app.settimeout(5)
        app.connect(REMOTE)  # lands on the capture listener
        conn, peer = listener.accept()
        with conn:
            assert peer[0] == POD_ADDR
            assert _original_dst(conn) == REMOTE
            app.sendall(b"ping")
            assert conn.recv(4) == b"ping"

        # The tunnel's own sockets carry the mark and must go out untouched: the SYN waits
        # for an ARP answer that never comes, and the capture listener sees nothing.
        tunnel.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, cfg.tunnel_mark)
        tunnel.setblocking(False)
        assert tunnel.connect_ex(REMOTE) != 0
        listener.settimeout(1.0)
        with pytest.raises(TimeoutError):
            listener.accept()
    finally:
        for s in (listener, app, tunnel):
            s.close()
        os.close(fd)
