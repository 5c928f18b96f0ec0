"""What one HTTP/2 peer may cost: the limits an HBONE connection enforces (limits.md).

Each limit is modelled on what Envoy and upstream ztunnel's Rust stack (h2, hyper)
enforce, counts events as well as bytes (an attack made of empty frames costs the attacker
nothing per frame), and ends the connection with GOAWAY when hit; a hit is logged once per
connection and counted. The same limits hold on both sides of a connection: a hostile
client of the inbound listener and a hostile server behind an outbound connection.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class H2Limits:
    # Streams the peer may have open at once (our SETTINGS_MAX_CONCURRENT_STREAMS).
    max_concurrent_streams: int = 200
    # A request's header block (HEADERS + CONTINUATION), in bytes. CONNECT requests are
    # tiny; Envoy allows 60 KiB of request headers.
    max_header_block: int = 64 * 1024
    # Rapid reset (CVE-2023-44487): streams the peer reset before we answered them. Past
    # this many, and once they are more than half of the streams it opened, GOAWAY
    # ENHANCE_YOUR_CALM. Envoy: 500 streams, 50 % premature; Rust h2: 20 pending.
    max_premature_resets: int = 100
    # Frames in a row that carry nothing and change nothing: empty DATA without
    # END_STREAM, empty CONTINUATION, PRIORITY, unknown types (CVE-2024-27316 sent
    # millions of empty CONTINUATION frames). Envoy: 1; Helidon: 10.
    max_empty_frames: int = 10
    # Control frames the peer makes us answer (PING, SETTINGS) between two frames that do
    # some work (open, end or carry data on a stream). Only a flood reaches it.
    max_control_frames_without_progress: int = 10_000
    # Entries in one SETTINGS frame (seven settings are defined), and in all SETTINGS
    # frames of one second: each INITIAL_WINDOW_SIZE walks every open stream.
    max_settings_entries: int = 32
    max_settings_entries_per_second: int = 1_000
    # Replies (PING and SETTINGS ACKs, RST_STREAM) we may queue while the peer does not
    # read its socket; past it the connection is closed (Envoy: max_outbound_control_frames).
    max_queued_replies: int = 1_000


DEFAULT_LIMITS = H2Limits()


@dataclass(frozen=True, slots=True)
class Timeouts:
    """How long an HBONE connection may take, or sit, before it is closed (seconds)."""

    # TLS handshake of an accepted connection (unauthenticated until it completes).
    handshake: float = 10.0
    # From the end of the handshake to the client's HTTP/2 preface and SETTINGS.
    preface: float = 10.0
    # An inbound connection with no stream open for this long is drained (upstream
    # ztunnel's pool closes idle client connections after 5 minutes; Envoy's default is 1 h).
    idle: float = 600.0
    # Keepalive (protocols.md): PING every `ping_interval`, give up after `ping_timeout`
    # without an answer, on both sides.
    ping_interval: float = 10.0
    ping_timeout: float = 20.0


DEFAULT_TIMEOUTS = Timeouts()
