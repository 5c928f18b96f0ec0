"""What a hostile HTTP/2 peer may cost the sans-IO connection (HboneLimits), as transcripts:
bytes in, then the GOAWAY or RST_STREAM out, the limit named, and the cost bounded.

Each flood here is one that a peer can send for almost nothing (issue: rapid reset,
empty CONTINUATION, PING and SETTINGS floods, SETTINGS amplification, malformed headers).
"""

from __future__ import annotations

import struct

import hpack
import pytest

from meshcore.hbone.conn import H2Connection, Headers
from meshcore.hbone.h2frames import (
    PREFACE,
    ErrorCode,
    Flag,
    FrameType,
    Setting,
    frame_header,
    parse_header,
    ping,
    rst_stream,
    settings_frame,
)
from meshcore.hbone.limits import HboneLimits
from tests.support.h2 import StreamRec

CONNECT: Headers = [(":method", "CONNECT"), (":authority", "10.0.0.1:8080")]


class Recorder:
    """Connection handler that answers nothing by itself and remembers what happened."""

    def __init__(self) -> None:
        self.requests: list[tuple[int, Headers]] = []
        self.terminated: list[tuple[int, str]] = []

    def on_request(self, stream_id: int, headers: Headers) -> None:
        self.requests.append((stream_id, headers))

    def on_terminated(self, code: int, reason: str) -> None:
        self.terminated.append((code, reason))

    def on_ping_ack(self, payload: bytes) -> None:
        pass


class Peer:
    """The hostile client: a server-side H2Connection and the bytes we feed it."""

    def __init__(self, limits: HboneLimits | None = None, clock: float | None = None) -> None:
        self.handler = Recorder()
        self.now = clock if clock is not None else 0.0
        self.conn = H2Connection(
            False, self.handler, limits or HboneLimits(), clock=lambda: self.now
        )
        self.conn.initiate()
        self.encoder = hpack.Encoder()
        self.conn.receive(PREFACE + settings_frame({}))
        self.conn.take_output()

    def headers(self, sid: int, headers: Headers = CONNECT, flags: int = Flag.END_HEADERS) -> bytes:
        block = self.encoder.encode(headers)
        return frame_header(len(block), FrameType.HEADERS, flags, sid) + block

    def send(self, data: bytes) -> None:
        self.conn.receive(data)

    def frames(self) -> list[tuple[int, int, int, bytes]]:
        """(type, flags, stream, payload) of everything queued for the peer."""
        raw = b"".join(bytes(x) for x in self.conn.take_output())
        out, off = [], 0
        while off < len(raw):
            length, ftype, flags, sid = parse_header(raw, off)
            out.append((ftype, flags, sid, raw[off + 9 : off + 9 + length]))
            off += 9 + length
        return out

    def goaway(self) -> tuple[int, bytes]:
        """(error code, debug data) of the GOAWAY sent."""
        for ftype, _, _, payload in self.frames():
            if ftype == FrameType.GOAWAY:
                return struct.unpack(">L", payload[4:8])[0], payload[8:]
        raise AssertionError("no GOAWAY was sent")


def test_rapid_reset_is_cut_off_with_enhance_your_calm():
    """CVE-2023-44487: CONNECT + RST_STREAM pairs. Each costs the peer 40 bytes and would
    cost us an app connect; past the limit the connection ends."""
    p = Peer(HboneLimits(max_premature_resets=20))
    sid = 1
    while not p.conn.closed and sid < 20_000:
        p.send(p.headers(sid) + rst_stream(sid, ErrorCode.CANCEL))
        sid += 2
    assert p.conn.closed and p.conn.limit_hit == "max_premature_resets"
    assert len(p.handler.requests) == 21  # the 21st reset is the one over the limit
    assert p.goaway()[0] == ErrorCode.ENHANCE_YOUR_CALM


def test_the_reset_over_the_limit_reaches_its_stream_too():
    """Every stream the peer resets hears of it, the one whose reset ends the connection
    too: its owner cancels the app connect it started (that stream had already left the
    connection's books, so the close alone would not reach it)."""
    p = Peer(HboneLimits(max_premature_resets=20))
    streams: dict[int, StreamRec] = {}
    sid = 1
    while not p.conn.closed and sid < 200:
        p.send(p.headers(sid))
        streams[sid] = p.conn.streams[sid].handler = StreamRec()
        p.send(rst_stream(sid, ErrorCode.CANCEL))
        sid += 2
    assert p.conn.limit_hit == "max_premature_resets"
    assert len(streams) == 21
    assert all(s.reset == ErrorCode.CANCEL for s in streams.values())


def test_resets_after_an_answer_and_a_few_early_ones_are_fine():
    """A client that gives up on some streams is not an attacker: answered streams may be
    reset freely, and early resets count only while they are most of its streams."""
    p = Peer(HboneLimits(max_premature_resets=20))
    for i in range(500):
        sid = 2 * i + 1
        p.send(p.headers(sid))
        if i % 3 == 0:
            p.send(rst_stream(sid, ErrorCode.CANCEL))  # early: a third of them
        else:
            p.conn.respond(sid, 200, None, end=False)
            p.send(rst_stream(sid, ErrorCode.CANCEL))
    assert not p.conn.closed


def test_empty_continuation_flood_is_cut_off_by_frames_not_bytes():
    """CVE-2024-27316: HEADERS without END_HEADERS, then empty CONTINUATION frames. They
    never grow the header block, so only counting frames stops them."""
    p = Peer(HboneLimits(max_empty_frames=10))
    p.send(p.headers(1, flags=0))
    sent = 0
    while not p.conn.closed and sent < 1_000_000:
        p.send(frame_header(0, FrameType.CONTINUATION, 0, 1) * 100)
        sent += 100
    assert p.conn.limit_hit == "max_empty_frames" and sent == 100
    assert p.goaway()[0] == ErrorCode.ENHANCE_YOUR_CALM
    assert p.handler.requests == []


@pytest.mark.parametrize(
    "frame",
    [
        frame_header(0, FrameType.DATA, 0, 1),
        frame_header(5, FrameType.PRIORITY, 0, 1) + b"\0\0\0\0\x10",
        frame_header(3, 0x21, 0, 0) + b"abc",  # an unknown type
    ],
    ids=["empty DATA", "PRIORITY", "unknown type"],
)
def test_frames_that_carry_nothing_are_bounded(frame: bytes):
    p = Peer(HboneLimits(max_empty_frames=10))
    p.send(p.headers(1))
    p.send(frame * 10)
    assert not p.conn.closed  # ten in a row is allowed
    p.send(p.headers(3))  # work resets the count
    p.send(frame * 11)
    assert p.conn.limit_hit == "max_empty_frames"


def test_ping_flood_is_cut_off_and_keepalive_pings_are_not():
    p = Peer(HboneLimits(max_control_frames_without_progress=1000))
    for _ in range(5):
        p.send(ping(b"12345678") * 200)
        p.send(p.headers(2 * _ + 1))  # a stream opened now and then: progress
    assert not p.conn.closed
    p.send(ping(b"12345678") * 1001)
    assert p.conn.limit_hit == "max_control_frames_without_progress"


def test_replies_to_a_peer_that_does_not_read_are_bounded():
    """PINGs answered into a socket nobody reads: once the shell says the peer is behind,
    only `max_queued_replies` more answers are queued, then the connection ends."""
    p = Peer(HboneLimits(max_queued_replies=100))
    p.send(ping(b"12345678") * 500)
    assert not p.conn.closed  # the peer reads (nothing said otherwise)
    p.conn.peer_caught_up()
    p.conn.peer_behind = True
    p.send(ping(b"12345678") * 500)
    assert p.conn.limit_hit == "max_queued_replies"
    acks = [f for f in p.frames() if f[0] == FrameType.PING]
    assert len(acks) == 500 + 101  # the first 500 went out; then the limit, plus the one over it


def test_settings_amplification_walks_the_streams_once_per_frame():
    """174 762 INITIAL_WINDOW_SIZE entries in one frame with 200 open streams blocked the
    loop for seconds: now a frame has at most `max_settings_entries` entries."""
    p = Peer()
    for i in range(200):
        p.send(p.headers(2 * i + 1))
    entries = b"".join(
        struct.pack(">HL", Setting.INITIAL_WINDOW_SIZE, 65_535 + (i % 2)) for i in range(174_762)
    )
    windows = [p.conn.streams[1].send_window]
    p.send(frame_header(len(entries), FrameType.SETTINGS, 0, 0) + entries)
    assert p.conn.limit_hit == "max_settings_entries"
    assert p.goaway()[0] == ErrorCode.ENHANCE_YOUR_CALM
    assert windows == [65_535]  # refused before any entry was applied


def test_settings_entries_per_frame_and_per_second():
    p = Peer(HboneLimits(max_settings_entries=8, max_settings_entries_per_second=40))
    two_entries: dict[int, int] = {
        Setting.INITIAL_WINDOW_SIZE: 70_000,
        Setting.MAX_FRAME_SIZE: 20_000,
    }
    body = settings_frame(two_entries)
    for _ in range(5):  # 10 entries, then 31 more within the same second
        p.send(body)
    assert not p.conn.closed
    p.send(settings_frame({Setting.HEADER_TABLE_SIZE: 1}) * 31)  # 10 + 31 = 41 > 40
    assert p.conn.limit_hit == "max_settings_entries_per_second"
    q = Peer(HboneLimits(max_settings_entries=8))
    nine = b"".join(struct.pack(">HL", Setting.HEADER_TABLE_SIZE, 0) for _ in range(9))
    q.send(frame_header(len(nine), FrameType.SETTINGS, 0, 0) + nine)
    assert q.conn.limit_hit == "max_settings_entries"


def test_settings_budget_refills_each_second():
    p = Peer(HboneLimits(max_settings_entries_per_second=10), clock=100.0)
    for second in range(20):
        p.now = 100.0 + second
        p.send(settings_frame({Setting.HEADER_TABLE_SIZE: 4096}) * 10)
        p.send(p.headers(2 * second + 1))
    assert not p.conn.closed


def test_initial_window_applies_the_last_value_of_a_frame():
    p = Peer()
    p.send(p.headers(1))
    body = b"".join(
        struct.pack(">HL", Setting.INITIAL_WINDOW_SIZE, v) for v in (1, 10, 1_000_000, 200)
    )
    p.send(frame_header(len(body), FrameType.SETTINGS, 0, 0) + body)
    assert not p.conn.closed
    assert p.conn.streams[1].send_window == 200


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        ([(":method", "CONNECT"), (":authority", "a:1"), (":authority", "b:2")], "twice"),
        ([(":method", "CONNECT"), (":Authority", "a:1")], "lowercase"),
        ([(":method", "CONNECT"), (":authority", "a:1"), ("X-Trace", "1")], "lowercase"),
        ([(":method", "CONNECT"), ("x", "1"), (":authority", "a:1")], "after"),
        ([(":method", "CONNECT"), (":authority", "a:1"), (":status", "200")], "unknown"),
        ([(":method", "CONNECT"), (":authority", "a:1"), ("connection", "close")], "connection"),
        ([(":authority", "a:1")], "no :method"),
    ],
    ids=["duplicate authority", "uppercase pseudo", "uppercase name", "pseudo after",
         "response pseudo", "connection header", "no method"],
)  # fmt: skip
def test_malformed_requests_are_reset_not_served(headers: Headers, why: str):
    p = Peer()
    p.send(p.headers(1, headers))
    assert p.handler.requests == []
    frames = p.frames()
    assert (FrameType.RST_STREAM, 0, 1, struct.pack(">L", ErrorCode.PROTOCOL_ERROR)) in frames
    assert not p.conn.closed


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (frame_header(7, FrameType.PING, 0, 0) + b"1234567", ErrorCode.FRAME_SIZE_ERROR),
        (frame_header(8, FrameType.PING, 0, 1) + b"12345678", ErrorCode.PROTOCOL_ERROR),
        (frame_header(3, FrameType.RST_STREAM, 0, 1) + b"\0\0\0", ErrorCode.FRAME_SIZE_ERROR),
        (frame_header(4, FrameType.RST_STREAM, 0, 0) + b"\0\0\0\0", ErrorCode.PROTOCOL_ERROR),
    ],
    ids=["PING of 7", "PING on a stream", "RST_STREAM of 3", "RST_STREAM on 0"],
)
def test_wrong_length_control_frames_are_frame_size_errors(frame: bytes, code: int):
    p = Peer()
    p.send(p.headers(1))
    p.send(frame)
    assert p.goaway()[0] == code


def test_priority_of_the_wrong_length_resets_only_its_stream():
    p = Peer()
    p.send(p.headers(1))
    p.send(frame_header(4, FrameType.PRIORITY, 0, 1) + b"\0\0\0\0")
    assert not p.conn.closed
    assert (FrameType.RST_STREAM, 0, 1, struct.pack(">L", ErrorCode.FRAME_SIZE_ERROR)) in (
        p.frames()
    )


def test_goaway_debug_data_is_ours_and_printable():
    """A bad header block's decoder message stays in our log; the peer gets plain words."""
    p = Peer()
    p.send(frame_header(3, FrameType.HEADERS, Flag.END_HEADERS, 1) + b"\xff\xff\xff")
    code, debug = p.goaway()
    assert code == ErrorCode.COMPRESSION_ERROR
    assert debug == b"bad header block"
    assert "bad header block" in p.conn.close_reason
    p2 = Peer()
    p2.conn.close(ErrorCode.INTERNAL_ERROR, "line one\nline \u2603 two")
    assert p2.goaway()[1] == b"line oneline  two"


class Producer:
    """A stream's owner on our side: counts the wake-ups after a pause."""

    def __init__(self) -> None:
        self.ready = 0

    def on_response(self, status: int, headers: Headers) -> None: ...
    def on_data(self, data: memoryview) -> None: ...
    def on_end(self) -> None: ...
    def on_reset(self, code: int) -> None: ...

    def on_send_ready(self) -> None:
        self.ready += 1


def test_what_all_streams_queue_is_bounded_by_the_connection_budget():
    """A peer that grants no window to any of its streams: each stream's queue pauses at
    512 KiB, but 200 of them would hold 100 MiB; the connection's budget pauses every
    producer once the sum is over it, and wakes them when the peer reads again."""
    budget = 1024 * 1024
    p = Peer(HboneLimits(max_buffered_per_connection=budget))
    p.send(settings_frame({Setting.INITIAL_WINDOW_SIZE: 0}))  # no stream may send a byte
    producers = {}
    for i in range(20):
        sid = 2 * i + 1
        p.send(p.headers(sid))
        producers[sid] = Producer()
        p.conn.respond(sid, 200, producers[sid], end=False)
    accepted = {sid: 0 for sid in producers}
    for _ in range(8):  # every producer offers 64 KiB at a time until told to pause
        for sid in producers:
            if accepted[sid] < 0:
                continue
            if p.conn.send_data(sid, b"x" * 65536):
                accepted[sid] += 1
            else:
                accepted[sid] = -1
    # Each producer pauses once the sum is over the budget (the shell, H2Transport, also
    # pauses all of them at once at that point): at most one more chunk each.
    assert p.conn.buffered <= budget + len(producers) * 65536
    assert all(a == -1 for a in accepted.values())  # every producer was paused
    p.frames()
    # The peer reads again: windows for every stream, and for the connection.
    p.send(frame_header(4, FrameType.WINDOW_UPDATE, 0, 0) + struct.pack(">L", 1 << 24))
    for sid in producers:
        p.send(frame_header(4, FrameType.WINDOW_UPDATE, 0, sid) + struct.pack(">L", 1 << 20))
    assert p.conn.buffered == 0
    assert all(pr.ready == 1 for pr in producers.values())  # each woken once


def test_a_reset_stream_gives_its_queue_back_to_the_budget():
    p = Peer(HboneLimits(max_buffered_per_connection=256 * 1024))
    p.send(settings_frame({Setting.INITIAL_WINDOW_SIZE: 0}))
    a, b = Producer(), Producer()
    p.send(p.headers(1) + p.headers(3))
    p.conn.respond(1, 200, a, end=False)
    p.conn.respond(3, 200, b, end=False)
    assert p.conn.send_data(1, b"x" * 200_000)
    assert not p.conn.send_data(3, b"y" * 100_000)  # over the budget: paused
    p.send(rst_stream(1, ErrorCode.CANCEL))
    assert p.conn.buffered == 100_000
