"""Hostile HBONE peers against one pod's 15008, on the two-node cluster (the issue "The
HBONE server survives hostile peers": each attack it found, run again).

Every attack comes from a pod on n1 (`plain/outsider`, outside the mesh; with a
certificate from the mesh CA where the attack needs one) and aims at server-b's 15008 on
n2, while a well-behaved client (`mesh/client`, a new connection every 50 ms through n2's
tunnel to server-b's echo port) runs. Each test then checks that the attacker's
connection ended with the right error (the GOAWAY read from its socket, or the TCP close
before TLS), that n2 counted it in `hbone_connections_refused_total` and logged it, that
the well-behaved client lost no connection, and that n2's tunnel stayed within a bound of
memory and came back near where it started. The figures (resident memory, CPU time, the
client's p99 and max, what the attacker got out) are printed for `pytest -s`; no time is
asserted, the machine is shared.

n2's tunnel runs with shorter timeouts than the defaults (10 s handshake and preface, 60 s
stall, 600 s idle), so the timed limits show within a test, and with 16 connections in
flight per plaintext listener (1024); every other limit is at its default. The same
tunnel's 15001 and 15006 face a hostile app inside server-b and a plaintext client.
"""

from __future__ import annotations

import contextlib
import dataclasses
import select
import socket
import ssl
import time
from collections.abc import Iterator

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

import nsutil
from controlplane.ca import CertificateAuthority
from localcluster import mesh
from meshcore import tls
from meshcore.hbone.h2frames import (
    PREFACE,
    ErrorCode,
    FrameType,
    Setting,
    frame_header,
    ping,
    rst_stream,
    settings_frame,
)
from meshcore.identity.certs import WorkloadCertificate
from meshcore.identity.spiffe import SpiffeId
from tests.support.certs import client_hello, issue
from tests.support.h2 import data_frame, headers_frame

from .common import mesh_ca, pod_ip
from .hostile import (
    Figures,
    Peer,
    PodSockets,
    SteadyClient,
    Tunnel,
    failures,
    settings_entries,
)

pytestmark = pytest.mark.netns

NODE = "n2"  # the attacked tunnel: server-b's
TUNED = {
    "HBONE_HANDSHAKE_TIMEOUT": "2",
    "HBONE_PREFACE_TIMEOUT": "2",
    "HBONE_STALL_TIMEOUT": "2",
    "HBONE_IDLE_TIMEOUT": "3",
    # The idle and stall checks run on the keepalive timer.
    "HBONE_PING_INTERVAL": "0.5",
    # Small enough to reach with a few sockets (the default is 1024).
    "HBONE_MAX_CONNECTS_IN_FLIGHT_PER_LISTENER": "16",
}
# What an attack may add to the tunnel's resident memory at its peak, and what may be left
# once it is over and the tunnel has been quiet for a second. Unbounded, the same attacks
# grew it by 150 MB to a gigabyte.
PEAK_MB = 30.0
LEFT_MB = 8.0
ATTACKER_ID = SpiffeId("cluster.local", "mesh", "attacker")


@pytest.fixture(scope="module")
def tunnel(cluster: mesh.Cluster) -> Tunnel:
    mesh.stop_tunnel(cluster, NODE)
    mesh.start_node_tunnel(cluster, NODE, extra_env=TUNED)
    mesh.wait_ready(cluster)
    return Tunnel(cluster, NODE)


@pytest.fixture(scope="module")
def mesh_cert(cluster: mesh.Cluster) -> WorkloadCertificate:
    """A certificate any pod of the mesh could hold: the attacker needs nothing more."""
    return issue(mesh_ca(cluster), ATTACKER_ID)


@pytest.fixture
def outsider(cluster: mesh.Cluster) -> Iterator[PodSockets]:
    sockets = PodSockets(cluster, "plain", "outsider")
    yield sockets
    sockets.close()


@pytest.fixture
def steady(cluster: mesh.Cluster, tunnel: Tunnel) -> Iterator[SteadyClient]:
    client = SteadyClient(cluster, "mesh", "client", (pod_ip(cluster, "mesh", "server-b"), 9000))
    client.start()
    # The baseline before the attack; its second or so also gives the tunnel's log a fresh
    # budget (ten lines a second), so an attack's refusals are not left out of it.
    client.wait_for(25)
    yield client
    client.stop()


def server(cluster: mesh.Cluster) -> str:
    return pod_ip(cluster, "mesh", "server-b")


def conclude(figures: Figures, tunnel: Tunnel, steady: SteadyClient) -> None:
    """Stop the well-behaved client, let the tunnel settle, print the figures, and check
    what holds for every attack: no client connection failed, memory stayed bounded."""
    steady.wait_since(figures.attack_start, 20)  # a second at least, however short the attack
    steady.stop()
    left = tunnel.settled_rss(figures.rss_before + LEFT_MB)
    figures.report(steady, left)
    assert failures(steady.attempts) == [], "the well-behaved client lost connections"
    assert figures.rss_peak - figures.rss_before < PEAK_MB
    assert left - figures.rss_before < LEFT_MB


def refused_once(tunnel: Tunnel, log_at: int, reason: str, before: float, n: int = 1) -> None:
    """The tunnel counted `n` refusals for `reason` and logged each once."""
    assert tunnel.wait_refused(reason, before + n) == before + n
    lines = tunnel.wait_logged(log_at, n, reason=reason)
    assert len(lines) == n, lines


# ---- 1. rapid reset ------------------------------------------------------------------------


def test_rapid_reset_ends_with_enhance_your_calm(
    cluster: mesh.Cluster,
    tunnel: Tunnel,
    outsider: PodSockets,
    steady: SteadyClient,
    mesh_cert: WorkloadCertificate,
) -> None:
    """20 000 CONNECT + RST_STREAM pairs on one connection (once: 20 000 app connects, the
    open-file limit, a 23.6 s outage for everyone)."""
    n = 20_000
    reason = "max_premature_resets"
    peer = outsider.tls(tls.client_context(mesh_cert), server(cluster))
    authority = f"{server(cluster)}:9000"
    first = peer.connect_block(authority)
    again = peer.connect_block(authority)  # indexed now: every later block is the same
    pair = len(headers_frame(3, again) + rst_stream(3, ErrorCode.CANCEL))
    opening = PREFACE + settings_frame({})
    attack = opening + headers_frame(1, first) + rst_stream(1, ErrorCode.CANCEL)
    attack += b"".join(
        headers_frame(sid, again) + rst_stream(sid, ErrorCode.CANCEL) for sid in range(3, 2 * n, 2)
    )
    before, log_at = tunnel.refused(reason), tunnel.log_offset()

    figures = Figures.start("rapid reset", tunnel)
    sent = peer.flood(attack)
    goaway = peer.finish()
    figures.end(
        tunnel,
        f"{(sent - len(opening)) // pair} of {n} CONNECT+RST_STREAM pairs sent "
        f"({sent // 1024} KB) before GOAWAY {goaway.name if goaway else None}",
    )
    conclude(figures, tunnel, steady)

    assert goaway is not None and goaway.code == ErrorCode.ENHANCE_YOUR_CALM
    refused_once(tunnel, log_at, reason, before)
    assert "Too many open files" not in tunnel.log_path.read_text()[-200_000:]


# ---- 2. empty CONTINUATION flood -----------------------------------------------------------


def test_empty_continuation_flood_ends_with_enhance_your_calm(
    cluster: mesh.Cluster,
    tunnel: Tunnel,
    outsider: PodSockets,
    steady: SteadyClient,
    mesh_cert: WorkloadCertificate,
) -> None:
    """A HEADERS without END_HEADERS, then empty CONTINUATION frames (CVE-2024-27316: once
    5.9 million of them were accepted, an 11 s outage)."""
    n = 100_000
    reason = "max_empty_frames"
    peer = outsider.tls(tls.client_context(mesh_cert), server(cluster))
    block = peer.connect_block(f"{server(cluster)}:9000")
    opening = PREFACE + settings_frame({}) + headers_frame(1, block, end_headers=False)
    attack = opening + frame_header(0, FrameType.CONTINUATION, 0, 1) * n
    before, log_at = tunnel.refused(reason), tunnel.log_offset()

    figures = Figures.start("empty CONTINUATION flood", tunnel)
    sent = peer.flood(attack)
    goaway = peer.finish()
    figures.end(
        tunnel,
        f"{(sent - len(opening)) // 9} of {n} empty CONTINUATION frames sent before GOAWAY "
        f"{goaway.name if goaway else None}",
    )
    conclude(figures, tunnel, steady)

    assert goaway is not None and goaway.code == ErrorCode.ENHANCE_YOUR_CALM
    refused_once(tunnel, log_at, reason, before)


# ---- 5. PING flood from a peer that never reads -----------------------------------------------


def test_ping_flood_from_a_peer_that_never_reads_is_cut_off(
    cluster: mesh.Cluster,
    tunnel: Tunnel,
    outsider: PodSockets,
    steady: SteadyClient,
    mesh_cert: WorkloadCertificate,
) -> None:
    """PINGs into a socket that is never read (once: 2 million of them grew the tunnel by
    150 MB). A DATA byte on an open stream every 4 096 PINGs keeps the flood under the
    control-frame limit, so what ends it is the bound on replies queued for the peer."""
    reason = "max_queued_replies"
    burst_pings = 4096
    max_bursts = 500  # 2 M PINGs at most
    peer = outsider.tls(tls.client_context(mesh_cert), server(cluster), rcvbuf=4096)
    block = peer.connect_block(f"{server(cluster)}:9000")
    burst = ping(b"hostile!") * burst_pings + data_frame(1, b"x")
    before, log_at = tunnel.refused(reason), tunnel.log_offset()

    figures = Figures.start("PING flood, never read", tunnel)
    assert peer.send(PREFACE + settings_frame({}) + headers_frame(1, block))
    peer.sock.settimeout(2.0)  # the server stops reading once it has ended the connection
    bursts = 0
    deadline = time.monotonic() + 30
    while bursts < max_bursts and time.monotonic() < deadline:
        if not peer.send(burst):
            break
        bursts += 1
        if bursts % 8 == 0 and tunnel.refused(reason) > before:
            break
    figures.end(tunnel, f"{bursts * burst_pings} PINGs sent, not a byte read")
    goaway = peer.finish()
    figures.sent += (
        f"; then read: {peer.frames.ping_acks} PING ACKs and GOAWAY "
        f"{goaway.name if goaway else None}"
    )
    conclude(figures, tunnel, steady)

    assert goaway is not None and goaway.code == ErrorCode.ENHANCE_YOUR_CALM
    refused_once(tunnel, log_at, reason, before)


# ---- 6. SETTINGS amplification -------------------------------------------------------------


def open_streams(peer: Peer, authority: str, n: int, batch: int = 50) -> list[int]:
    """`n` CONNECT streams, `batch` at a time (each waits for its app connect), answered."""
    sids: list[int] = []
    for first in range(0, n, batch):
        new = [1 + 2 * i for i in range(first, min(n, first + batch))]
        assert peer.send(b"".join(headers_frame(s, peer.connect_block(authority)) for s in new))
        sids += new
        assert peer.await_answers(len(sids))
    assert all(peer.frames.status[s] == 200 for s in sids)
    return sids


def test_settings_amplification_ends_with_enhance_your_calm(
    cluster: mesh.Cluster,
    tunnel: Tunnel,
    outsider: PodSockets,
    steady: SteadyClient,
    mesh_cert: WorkloadCertificate,
) -> None:
    """200 open streams, then one 1 MiB SETTINGS frame of INITIAL_WINDOW_SIZE entries (once:
    each entry walked every stream, 4.4 s of a blocked loop per frame); and small frames
    sent faster than the per-second budget."""
    ctx = tls.client_context(mesh_cert)
    authority = f"{server(cluster)}:9000"
    entries = (1 << 20) // 6
    before_frame = tunnel.refused("max_settings_entries")
    before_rate = tunnel.refused("max_settings_entries_per_second")
    log_at = tunnel.log_offset()

    big = outsider.tls(ctx, server(cluster))
    assert big.send(PREFACE + settings_frame({}))
    open_streams(big, authority, 200)
    fast = outsider.tls(ctx, server(cluster))
    assert fast.send(PREFACE + settings_frame({}))

    figures = Figures.start("SETTINGS amplification", tunnel)
    big.send(settings_entries(Setting.INITIAL_WINDOW_SIZE, 65535, entries))
    one_frame = big.finish()
    fast.flood(settings_entries(Setting.INITIAL_WINDOW_SIZE, 65535, 32) * 40)
    per_second = fast.finish()
    figures.end(
        tunnel,
        f"one SETTINGS frame of {entries} entries over 200 open streams: GOAWAY "
        f"{one_frame.name if one_frame else None}; 40 frames of 32 entries at once: GOAWAY "
        f"{per_second.name if per_second else None}",
    )
    conclude(figures, tunnel, steady)

    assert one_frame is not None and one_frame.code == ErrorCode.ENHANCE_YOUR_CALM
    assert per_second is not None and per_second.code == ErrorCode.ENHANCE_YOUR_CALM
    refused_once(tunnel, log_at, "max_settings_entries", before_frame)
    refused_once(tunnel, log_at, "max_settings_entries_per_second", before_rate)


# ---- 7. stalled streams -------------------------------------------------------------------


def test_streams_never_read_are_bounded_and_closed_when_stalled(
    cluster: mesh.Cluster,
    tunnel: Tunnel,
    outsider: PodSockets,
    steady: SteadyClient,
    mesh_cert: WorkloadCertificate,
) -> None:
    """3 connections x 100 streams, each asking the bulk app for 512 KiB (a stream's own
    queue bound) and granting no window (once: 200 streams x 2 MiB on 3 connections held
    320 MB, for ever). Each connection may queue 4 MiB for its peer; the stall timeout then
    ends it."""
    reason = "stall_timeout"
    conns, streams, size = 3, 100, 512 * 1024
    ctx = tls.client_context(mesh_cert)
    authority = f"{server(cluster)}:9001"
    before, log_at = tunnel.refused(reason), tunnel.log_offset()

    figures = Figures.start("stalled streams", tunnel)
    peers = []
    for _ in range(conns):
        peer = outsider.tls(ctx, server(cluster))
        assert peer.send(PREFACE + settings_frame({}))
        sids = open_streams(peer, authority, streams)
        ask = f"SEND {size} 1\n".encode()
        assert peer.send(b"".join(data_frame(s, ask) for s in sids))
        peers.append(peer)
    # From here on nothing is read: the tunnel holds what the apps send, within its budget.
    stalled = tunnel.wait_refused(reason, before + conns)
    figures.end(
        tunnel,
        f"{conns} connections x {streams} streams x {size // 1024} KiB asked for "
        f"({conns * streams * size >> 20} MiB), no window granted",
    )
    goaways = [p.finish() for p in peers]
    figures.sent += f"; then read: GOAWAY {[g.name if g else None for g in goaways]}"
    conclude(figures, tunnel, steady)

    assert stalled == before + conns
    assert all(g is not None and g.code == ErrorCode.ENHANCE_YOUR_CALM for g in goaways)
    assert all(g is not None and g.debug == "stalled" for g in goaways)
    refused_once(tunnel, log_at, reason, before, conns)


# ---- the smaller findings: malformed requests and frames, GOAWAY text, certificates ----------


def test_malformed_requests_are_reset_and_the_connection_goes_on(
    cluster: mesh.Cluster, tunnel: Tunnel, outsider: PodSockets, mesh_cert: WorkloadCertificate
) -> None:
    """A duplicate :authority and an uppercase header name are malformed (RFC 9113): the
    stream is reset with PROTOCOL_ERROR, the connection serves the next request."""
    authority = f"{server(cluster)}:9000"
    peer = outsider.tls(tls.client_context(mesh_cert), server(cluster))
    enc = peer.encoder
    duplicate = enc.encode(
        [(":method", "CONNECT"), (":authority", "10.0.0.1:80"), (":authority", authority)]
    )
    upper = enc.encode([(":method", "CONNECT"), (":authority", authority), ("X-Evil", "1")])
    assert peer.send(
        PREFACE
        + settings_frame({})
        + headers_frame(1, duplicate)
        + headers_frame(3, upper)
        + headers_frame(5, peer.connect_block(authority))
    )
    assert peer.read_until(lambda: 5 in peer.frames.status and len(peer.frames.resets) >= 2)
    assert peer.frames.resets == {1: ErrorCode.PROTOCOL_ERROR, 3: ErrorCode.PROTOCOL_ERROR}
    assert peer.frames.status == {5: 200}
    assert peer.frames.goaway is None


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (frame_header(7, FrameType.PING, 0, 0) + b"1234567", ErrorCode.FRAME_SIZE_ERROR),
        (frame_header(3, FrameType.RST_STREAM, 0, 1) + b"123", ErrorCode.FRAME_SIZE_ERROR),
        # An HPACK index far beyond any table: the decoder's own words stay in the log.
        (headers_frame(1, b"\xff\xff\xff\x7f"), ErrorCode.COMPRESSION_ERROR),
    ],
    ids=["PING of 7 bytes", "RST_STREAM of 3 bytes", "bad header block"],
)
def test_protocol_errors_are_counted_and_logged_with_our_own_words(
    cluster: mesh.Cluster,
    tunnel: Tunnel,
    outsider: PodSockets,
    mesh_cert: WorkloadCertificate,
    frame: bytes,
    code: int,
) -> None:
    """A connection-level protocol error: GOAWAY with its code, counted under the HTTP/2
    error's name and logged (once neither)."""
    name = ErrorCode(code).name
    before, log_at = tunnel.refused(name), tunnel.log_offset()
    peer = outsider.tls(tls.client_context(mesh_cert), server(cluster))
    block = peer.connect_block(f"{server(cluster)}:9000")
    opening = PREFACE + settings_frame({}) + headers_frame(1, block)
    if frame.startswith(frame_header(3, FrameType.RST_STREAM, 0, 1)):
        assert peer.send(opening)
        assert peer.read_until(lambda: 1 in peer.frames.status)
        assert peer.send(frame)
    else:
        assert peer.send(PREFACE + settings_frame({}) + frame)
    goaway = peer.finish()
    assert goaway is not None and goaway.code == code
    # The GOAWAY's debug text is ours: printable, and nothing of the process's memory.
    assert goaway.debug.isprintable() and "0x" not in goaway.debug, goaway.debug
    refused_once(tunnel, log_at, name, before)


def two_uri_certificate(ca: CertificateAuthority) -> WorkloadCertificate:
    """A leaf of the mesh root with a SPIFFE URI and a second URI SAN (an X.509-SVID has
    exactly one): signed directly, the CA's own signing never makes such a thing."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = ca.root_cert.not_valid_before_utc
    sans = [
        x509.UniformResourceIdentifier(str(ATTACKER_ID)),
        x509.UniformResourceIdentifier("https://attacker.example"),
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca.root_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(ca.root_cert.not_valid_after_utc)
        .add_extension(x509.SubjectAlternativeName(sans), critical=True)
        .sign(ca.root_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return WorkloadCertificate(
        identity=ATTACKER_ID,
        key_pem=key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        chain_pem=[cert.public_bytes(pem), ca.roots_pem()],
        roots_pem=ca.roots_pem(),
        serial=cert.serial_number,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
    )


def test_a_certificate_with_a_second_uri_san_is_refused_counted_and_logged(
    cluster: mesh.Cluster, tunnel: Tunnel, outsider: PodSockets
) -> None:
    reason = "peer_identity"
    before, log_at = tunnel.refused(reason), tunnel.log_offset()
    ctx = tls.client_context(two_uri_certificate(mesh_ca(cluster)))
    peer = outsider.tls(ctx, server(cluster))
    peer.send(PREFACE + settings_frame({}))
    assert peer.finish() is None  # not one HTTP/2 frame: the connection is cut after TLS
    assert peer.frames.status == {} and peer.frames.data == 0
    refused_once(tunnel, log_at, reason, before)
    (line,) = tunnel.log_lines(log_at, reason=reason)
    assert "2 URI SANs" in line["detail"]


# ---- 8. connections that say nothing ------------------------------------------------------


def spoke(peer: Peer) -> bool:
    """The server's SETTINGS arrived: its handshake is over and HTTP/2 has begun."""
    return peer.read_until(lambda: peer.frames.settings > 0)


def test_connections_that_send_nothing_are_closed(
    cluster: mesh.Cluster,
    tunnel: Tunnel,
    outsider: PodSockets,
    steady: SteadyClient,
    mesh_cert: WorkloadCertificate,
) -> None:
    """300 connections finish the handshake with a mesh certificate and send nothing (once
    held for ever): each ends with GOAWAY PROTOCOL_ERROR at the preface timeout. One that
    spoke HTTP/2 and then went quiet is drained as idle: GOAWAY NO_ERROR, not a refusal."""
    n = 300
    reason = "preface_timeout"
    ctx = tls.client_context(mesh_cert)
    before, log_at = tunnel.refused(reason), tunnel.log_offset()

    figures = Figures.start("connections that send nothing", tunnel)
    quiet = outsider.tls(ctx, server(cluster))
    assert quiet.send(PREFACE + settings_frame({}))
    silent = []
    for _ in range(n):  # one at a time: each handshake is over before the next begins
        peer = outsider.tls(ctx, server(cluster))
        assert spoke(peer)
        silent.append(peer)
    figures.end(tunnel, f"{n} TLS connections with a mesh certificate, silent")
    goaways = [p.finish() for p in silent]
    idle = quiet.finish()
    figures.sent += (
        f"; {sum(1 for g in goaways if g and g.code == ErrorCode.PROTOCOL_ERROR)} ended with "
        f"GOAWAY PROTOCOL_ERROR; the quiet one with {idle.name if idle else None}"
    )
    conclude(figures, tunnel, steady)

    assert all(g is not None and g.code == ErrorCode.PROTOCOL_ERROR for g in goaways)
    assert tunnel.wait_refused(reason, before + n) == before + n
    # Logged at most ten lines a second: the rest are summed up in a later line.
    assert 1 <= len(tunnel.wait_logged(log_at, 1, reason=reason)) <= n
    assert idle is not None and idle.code == ErrorCode.NO_ERROR and "idle" in idle.debug


# ---- 3. handshakes that never finish ---------------------------------------------------------


def wait_closed(socks: list[socket.socket], limit: float = 20.0) -> int:
    """How many of `socks` the server closed (EOF or reset) within `limit` seconds."""
    poller = select.poll()
    by_fd = {s.fileno(): s for s in socks}
    for fd in by_fd:
        poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    closed = 0
    deadline = time.monotonic() + limit
    while by_fd and time.monotonic() < deadline:
        for fd, _ in poller.poll(200):
            s = by_fd.pop(fd, None)
            if s is None:
                continue
            poller.unregister(fd)
            s.setblocking(False)
            try:
                data = s.recv(1)
            except BlockingIOError:
                by_fd[fd] = s  # woken for nothing: keep waiting
                poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
                continue
            except OSError:
                data = b""
            closed += data == b""
    return closed


def test_handshakes_that_never_finish_are_bounded_per_source_and_timed_out(
    cluster: mesh.Cluster, tunnel: Tunnel, outsider: PodSockets, steady: SteadyClient
) -> None:
    """3 000 TCP connections from one pod outside the mesh, each starting TLS and never
    finishing it (once: 43 000 of them grew the tunnel to a gigabyte). At most 64 from one
    source are in progress at once; the others are closed before any TLS state exists, and
    those 64 at the handshake timeout. Each is counted once, the log stays within ten
    lines a second."""
    n = 3000
    early, late = "max_pending_handshakes_per_source", "tls_handshake_timeout"
    hello = client_hello()[:100]  # a ClientHello cut short: the server waits for the rest
    before, log_at = tunnel.refusals(), tunnel.log_offset()

    figures = Figures.start("handshakes that never finish", tunnel)
    socks: list[socket.socket] = []
    deadline = time.monotonic() + 30
    while len(socks) < n and time.monotonic() < deadline:
        s = outsider.tcp(server(cluster), 15008, timeout=5)
        with contextlib.suppress(OSError):  # already closed by the server: it still counts
            s.send(hello)
        socks.append(s)
    figures.end(tunnel, f"{len(socks)} TCP connections each with a partial ClientHello, held")
    closed = wait_closed(socks)
    conclude(figures, tunnel, steady)

    after = tunnel.refusals()
    refused_early = after.get(early, 0) - before.get(early, 0)
    timed_out = after.get(late, 0) - before.get(late, 0)
    print(f"  refused before TLS: {refused_early:.0f}; timed out: {timed_out:.0f}")
    assert closed == len(socks), "the tunnel left connections open"
    assert refused_early > 0 and timed_out > 0
    assert refused_early + timed_out == len(socks)
    lines = tunnel.log_lines(log_at)
    seconds = time.monotonic() - figures.attack_start
    assert 1 <= len(lines) <= 10 * (seconds + 2)
    assert any(line.get("suppressed_before") for line in lines)


# ---- 4. failed handshakes leave nothing behind -------------------------------------------------


def test_failed_handshakes_leave_nothing_behind(
    cluster: mesh.Cluster, tunnel: Tunnel, outsider: PodSockets, steady: SteadyClient
) -> None:
    """10 000 failed handshakes, one at a time: connect then close, a partial ClientHello,
    a client certificate of another CA (once: 3.6 KB kept for each, for ever). Each is
    counted once, and the tunnel's memory comes back to where it was."""
    kinds = {"connect then close": 8000, "partial ClientHello": 1500, "another CA": 500}
    hello = client_hello()[:100]
    foreign = issue(CertificateAuthority.create("cluster.local"), ATTACKER_ID)
    rogue = tls.client_context(dataclasses.replace(foreign, roots_pem=mesh_ca(cluster).roots_pem()))
    before = tunnel.refusals()

    figures = Figures.start("failed handshakes", tunnel)
    done = dict.fromkeys(kinds, 0)
    deadline = time.monotonic() + 60
    for kind, n in kinds.items():
        while done[kind] < n and time.monotonic() < deadline:
            s = outsider.tcp(server(cluster), 15008, timeout=5)
            try:
                if kind == "partial ClientHello":
                    s.send(hello)
                elif kind == "another CA":
                    with rogue.wrap_socket(s, server_hostname=None) as t:
                        t.recv(1)  # the server's alert (TLS 1.3 verifies the client last)
            except (OSError, ssl.SSLError):
                pass
            finally:
                s.close()
            done[kind] += 1
    total = sum(done.values())
    figures.end(tunnel, ", ".join(f"{n} {kind}" for kind, n in done.items()))
    counted = 0.0
    wait = time.monotonic() + 20
    while counted < total and time.monotonic() < wait:
        after = tunnel.refusals()
        counted = sum(after.values()) - sum(before.values())
        time.sleep(0.1)
    conclude(figures, tunnel, steady)

    deltas = {r: after[r] - before.get(r, 0) for r in after if after[r] != before.get(r, 0)}
    print(f"  counted: {deltas}")
    assert done == kinds
    assert counted == total


# ---- 15001 and 15006: a hostile app in a pod, a plaintext client ------------------------------


@pytest.fixture
def stuck(cluster: mesh.Cluster, request: pytest.FixtureRequest) -> Iterator[tuple[str, int]]:
    """A port of a pod (`request.param`: namespace, pod) where nothing is ever accepted:
    its one-place accept queue fills with the first connection, and the kernel drops every
    later SYN, so each connect to it hangs."""
    ns, pod = request.param
    sock = nsutil.socket_at(cluster.pod_netns(ns, pod))
    ip = pod_ip(cluster, ns, pod)
    sock.bind((ip, 9100))
    sock.listen(0)
    yield ip, 9100
    sock.close()  # the connects still waiting are refused at their next SYN


@pytest.fixture
def app(cluster: mesh.Cluster, request: pytest.FixtureRequest) -> Iterator[PodSockets]:
    """Sockets of the pod `request.param` (namespace, pod), as its app would open them."""
    sockets = PodSockets(cluster, *request.param)
    yield sockets
    sockets.close()


@pytest.mark.parametrize(
    ("stuck", "app", "direction"),
    [
        (("plain", "legacy"), ("mesh", "server-b"), "outbound"),  # server-b's 15001
        (("mesh", "server-b"), ("plain", "outsider"), "inbound"),  # server-b's 15006
    ],
    indirect=["stuck", "app"],
    ids=["15001: an app in the pod", "15006: a plaintext client"],
)
def test_connections_waiting_on_a_plaintext_listener_are_bounded(
    cluster: mesh.Cluster,
    tunnel: Tunnel,
    steady: SteadyClient,
    stuck: tuple[str, int],
    app: PodSockets,
    direction: str,
) -> None:
    """40 connections through one of server-b's plaintext listeners to a port that never
    answers: each waits in n2's tunnel for its connect. Past 16 in flight a new one is reset
    at once, counted (outbound on 15001, inbound on 15006) and logged."""
    n, limit = 40, 16
    reason = "max_connects_in_flight_per_listener"
    before, log_at = tunnel.refused(reason, direction), tunnel.log_offset()

    figures = Figures.start(f"connections waiting on a plaintext listener ({direction})", tunnel)
    socks = []
    resets = 0
    for _ in range(n):
        try:
            socks.append(app.tcp(*stuck, timeout=5))
        except ConnectionResetError:
            # Refused so fast that the reset came before connect() looked at the socket
            # (it polls, then reads SO_ERROR): reset at once all the same.
            resets += 1
    # At most `limit` wait, one or two went into the queue: the rest are refused.
    tunnel.wait_refused(reason, before + n - limit - 2, direction)
    figures.end(tunnel, f"{n} connections to {stuck[0]}:{stuck[1]}, which never answers")
    # The tunnel takes the queued connections from the listener as it gets to them: one it
    # refuses after the count above was read is reset a moment later. Until the client has
    # seen as many resets as the tunnel counts (or 5 s), look again at those not reset yet.
    pending = socks
    for s in pending:
        s.setblocking(False)
    deadline = time.monotonic() + 5.0
    while True:
        still: list[socket.socket] = []
        for s in pending:
            try:
                s.recv(1)
            except BlockingIOError:
                still.append(s)
            except ConnectionResetError:
                resets += 1
        pending = still
        if tunnel.refused(reason, direction) == before + resets or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    waiting = len(pending)
    figures.sent += f"; {resets} reset at once, {waiting} waiting"
    conclude(figures, tunnel, steady)

    assert limit <= waiting <= limit + 2
    assert tunnel.wait_refused(reason, before + resets, direction) == before + resets
    assert len(tunnel.wait_logged(log_at, 1, reason=reason, direction=direction)) >= 1
