"""What one HBONE peer may cost: every limit an HBONE endpoint enforces (limits.md), and
what a hostile app may make a pod's plaintext listeners hold.

Each limit is modelled on what Envoy and upstream ztunnel's Rust stack (h2, hyper)
enforce, counts events as well as bytes (an attack made of empty frames costs the attacker
nothing per frame), and ends what exceeded it: a connection over the limits is closed
before its TLS handshake, an HTTP/2 connection with GOAWAY (ENHANCE_YOUR_CALM for a
flood), a stream with RST_STREAM. A hit is logged (at a bounded rate) and counted in
`hbone_connections_refused_total{direction,reason}`, the reason being the field's name.
The same limits hold on both sides: a hostile client of a pod's 15008, and a hostile
server behind an outbound connection. Each field is a tunnel setting: the environment
variable `HBONE_<FIELD IN CAPITALS>` (ztunnel/config.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True, slots=True)
class HboneLimits:
    # Fields that may be set to 0 (none of it): they bound something the tunnel chooses to
    # do, not what a peer may make it do. Every other field is a protection: positive.
    ZERO_MEANS_NONE: ClassVar[frozenset[str]] = frozenset({"early_data_bytes"})

    # -- TLS handshakes: the cheapest state a stranger can make us hold --------------------
    # Handshakes in progress at once over every HBONE listener of the process, and from one
    # source address (any pod can reach any pod IP; one must not starve the rest).
    max_pending_handshakes: int = 512
    max_pending_handshakes_per_source: int = 64
    # Of those, what sources the tunnel knows no workload at may hold together: addresses
    # outside the mesh (the tunnel's peers dial from their pods' addresses). Many strangers
    # can then fill only this share, and the mesh's own pods keep the rest.
    max_pending_handshakes_from_strangers: int = 256
    handshake_timeout: float = 10.0
    # -- HTTP/2 ----------------------------------------------------------------------------
    # From the end of the handshake to the client's preface and SETTINGS.
    preface_timeout: float = 10.0
    # Streams the peer may have open at once (our SETTINGS_MAX_CONCURRENT_STREAMS).
    max_concurrent_streams: int = 200
    # A request's header block (HEADERS + CONTINUATION), in bytes. CONNECT requests are
    # tiny; Envoy allows 60 KiB of request headers.
    max_header_block: int = 64 * 1024
    # Rapid reset (CVE-2023-44487): streams the peer reset before we answered them. Past
    # this many, and once they are more than half of the streams it opened, GOAWAY.
    # Envoy: 500 streams, 50 % premature; Rust h2: 20 pending.
    max_premature_resets: int = 100
    # App connects a connection's streams may have in flight; past it, REFUSED_STREAM.
    max_connects_in_flight: int = 100
    # Frames in a row that carry nothing and change nothing: empty DATA without
    # END_STREAM, empty CONTINUATION, PRIORITY, unknown types (CVE-2024-27316 sent
    # millions of empty CONTINUATION frames). Envoy: 1; Helidon: 10.
    max_empty_frames: int = 10
    # Control frames the peer makes us handle (PING, SETTINGS) between two frames that do
    # some work (open, end or carry data on a stream). Only a flood reaches it.
    max_control_frames_without_progress: int = 10_000
    # Entries in one SETTINGS frame (seven settings are defined), and in all SETTINGS
    # frames of one second: each INITIAL_WINDOW_SIZE walks every open stream.
    max_settings_entries: int = 32
    max_settings_entries_per_second: int = 1_000
    # Replies (PING and SETTINGS ACKs, RST_STREAM) we may queue while the peer does not
    # read its socket; past it the connection is closed (Envoy: max_outbound_control_frames).
    max_queued_replies: int = 1_000
    # Bytes queued for the peer on all of a connection's streams (each stream's own queue
    # pauses its producer at 512 KiB); past it every stream's producer pauses.
    max_buffered_per_connection: int = 4 * 1024 * 1024
    # -- what we send a peer before it answers ----------------------------------------------
    # Early data: an outbound connection's first bytes (a request's head, a TLS ClientHello)
    # that go in the same TLS record as its CONNECT, at most; the peer holds them until it
    # answers. Saves a record and a round trip per connection. 0: none (the app's bytes wait
    # for the 200, as upstream ztunnel's do), for a peer that refuses early data (Envoy's
    # `reject_connect_request_early_data`). Never sent to a fail-open waypoint, whose
    # failure would send the same bytes again on the direct path.
    early_data_bytes: int = 16 * 1024
    # -- a pod's plaintext listeners (15001, 15006): a hostile app inside the pod ------------
    # Connections one listener has accepted and not yet joined to where they go (waiting for
    # an HBONE CONNECT answer, a passthrough connect, or the app's connect on 15006): each
    # holds descriptors and a task for up to the 10 s connect timeout. Past it a newly
    # accepted connection is reset at once. Generous for a busy app; the connections
    # already relaying are not counted.
    max_connects_in_flight_per_listener: int = 1024
    # Connections one pod's listener holds open (in flight and relaying), per direction:
    # outbound (15001) and inbound plaintext (15006). One pod cannot take the tunnel's fds
    # from every other pod. Upstream ztunnel has none; Envoy's per-listener
    # max_connections is unlimited by default. Generous: two descriptors a connection.
    max_connections_per_pod: int = 16_384
    # Connections the tunnel holds open over all its pods (the connection table: relays of
    # every listener, HBONE streams included); past it, a pod's listener resets new ones.
    # Keep it below RLIMIT_NOFILE / 2 so the tunnel refuses before the kernel does.
    max_connections_per_tunnel: int = 100_000
    # -- time ------------------------------------------------------------------------------
    # An inbound connection with no stream open for this long is drained (upstream
    # ztunnel's pool closes idle client connections after 5 minutes; Envoy's default is 1 h).
    idle_timeout: float = 600.0
    # Keepalive (protocols.md): PING every `ping_interval`, close after `ping_timeout`
    # without an answer, on both sides.
    ping_interval: float = 10.0
    ping_timeout: float = 20.0
    # A connection with bytes queued for the peer and none sent for this long: the peer
    # reads nothing (grants no window). It is closed, and what it held is freed.
    stall_timeout: float = 60.0
    # A connection we ended: how long its TLS close may take (our close_notify out, the
    # peer's awaited) before it is dropped. asyncio and uvloop wait 30 s, so a peer that
    # never answers held every connection refused to it that long (300 silent connections
    # ended at the preface timeout: 15 MB for 30 s).
    shutdown_timeout: float = 5.0


DEFAULT_LIMITS = HboneLimits()
