"""The sans-IO HTTP/2 core against a different HTTP/2 stack (the `h2` library), in memory.

Our server is driven by an h2 client and our client by an h2 server, so what is tested is
conformance to HTTP/2, not agreement of our code with itself.
"""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest

from meshcore.hbone.conn import (
    CONNECTION_WINDOW,
    SEND_LOW_WATER,
    STREAM_WINDOW,
    H2Connection,
)
from meshcore.hbone.h2frames import (
    PREFACE,
    ErrorCode,
    FrameType,
    frame_header,
    rst_stream,
)
from tests.support.h2 import (
    CONNECT,
    STATUS_OK,
    Recorder,
    ServedStream,
    StreamRec,
    data_frame,
    h2_client,
    h2_server,
    headers_frame,
    our_client_stream,
    pump_to_ours,
    pump_to_theirs,
    taken,
)


def test_server_accepts_connect_from_h2_client_and_relays_both_ways() -> None:
    rec = Recorder()
    server = H2Connection(client=False, handler=rec)
    server.initiate()
    client = h2_client()
    pump_to_ours(client, server)
    events = pump_to_theirs(server, client)
    settings = [e for e in events if isinstance(e, h2.events.RemoteSettingsChanged)]
    assert settings, "server must send SETTINGS"
    changed = settings[0].changed_settings
    assert changed[h2.settings.SettingCodes.INITIAL_WINDOW_SIZE].new_value == STREAM_WINDOW
    assert changed[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS].new_value == 200
    assert client.outbound_flow_control_window == CONNECTION_WINDOW

    client.send_headers(1, CONNECT)
    pump_to_ours(client, server)
    assert rec.requests == [(1, CONNECT)]
    stream = StreamRec(server)
    stream.sid = 1
    server.respond(1, 200, stream, end=False)
    events = pump_to_theirs(server, client)
    resp = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
    assert resp and dict(resp[0].headers)[b":status"] == b"200"

    payload = bytes(range(256)) * 1000
    client.send_data(1, payload)
    pump_to_ours(client, server)
    assert bytes(stream.data) == payload
    server.send_data(1, b"pong" * 100)
    server.end_stream(1)
    events = pump_to_theirs(server, client)
    got = b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived))
    assert got == b"pong" * 100
    assert any(isinstance(e, h2.events.StreamEnded) for e in events)
    client.end_stream(1)
    pump_to_ours(client, server)
    assert stream.ended
    assert server.open_streams == 0


def test_client_against_h2_server_flow_control_and_half_close() -> None:
    server = h2_server()
    server.initiate_connection()
    rec = Recorder()
    ours = H2Connection(client=True, handler=rec)
    ours.initiate()
    pump_to_theirs(ours, server)
    pump_to_ours(server, ours)
    stream = StreamRec(ours)
    stream.sid = ours.open_stream(CONNECT, stream)
    events = pump_to_theirs(ours, server)
    req = [e for e in events if isinstance(e, h2.events.RequestReceived)]
    assert req and dict(req[0].headers)[b":method"] == b"CONNECT"
    server.send_headers(stream.sid, STATUS_OK)
    pump_to_ours(server, ours)
    assert stream.response is not None and stream.response[0] == 200

    # More than the peer's default 64 KiB window: the rest must wait for WINDOW_UPDATE.
    big = b"x" * 200_000
    ours.send_data(stream.sid, big)
    ours.end_stream(stream.sid)
    received = bytearray()
    ended = False
    for _ in range(50):
        events = pump_to_theirs(ours, server)
        for e in events:
            if isinstance(e, h2.events.DataReceived):
                received += e.data
                server.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
            if isinstance(e, h2.events.StreamEnded):
                ended = True
        pump_to_ours(server, ours)
        if ended:
            break
    assert bytes(received) == big
    assert ended, "END_STREAM must follow the queued data"


def test_send_ready_fires_after_a_pause_between_the_marks() -> None:
    # A producer that paused for another reason (a full TLS buffer) while the queue sat
    # between the low and high marks must still hear when the queue drains.
    server = h2_server()
    ours, stream = our_client_stream(server)
    window = 65_535  # the h2 server's default stream window
    more = ours.send_data(stream.sid, b"z" * (window + SEND_LOW_WATER + 1000))
    assert more, "below the high mark: no pause asked for"
    assert ours.pending(stream.sid) > SEND_LOW_WATER
    ours.notify_when_drained(stream.sid)
    received = 0
    for _ in range(20):
        for e in pump_to_theirs(ours, server):
            if isinstance(e, h2.events.DataReceived):
                received += e.flow_controlled_length
                server.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
        pump_to_ours(server, ours)
        if stream.ready:
            break
    assert stream.ready == 1
    assert ours.pending(stream.sid) <= SEND_LOW_WATER


def test_notify_when_drained_below_the_low_mark_asks_for_nothing() -> None:
    server = h2_server()
    ours, stream = our_client_stream(server)
    ours.send_data(stream.sid, b"q" * 1000)
    ours.notify_when_drained(stream.sid)
    pump_to_theirs(ours, server)
    assert stream.ready == 0


def test_receive_credit_only_returned_after_ack() -> None:
    served = ServedStream(auto_ack=False)
    server, client, stream = served.server, served.client, served.stream
    sent = 0
    chunk = b"y" * 16384
    while client.local_flow_control_window(1) >= len(chunk) and sent < 2 * STREAM_WINDOW:
        client.send_data(1, chunk)
        sent += len(chunk)
    pump_to_ours(client, server)
    pump_to_theirs(server, client)
    # Without acks the client is stuck at the stream window: nothing unbounded buffered.
    assert sent <= STREAM_WINDOW
    assert client.local_flow_control_window(1) < len(chunk)
    server.ack(1, len(stream.data))
    pump_to_theirs(server, client)
    assert client.local_flow_control_window(1) >= STREAM_WINDOW // 2


def _send(client: h2.connection.H2Connection, sid: int, nbytes: int, chunk: int = 16384) -> None:
    for _ in range(nbytes // chunk):
        client.send_data(sid, b"z" * chunk)


def test_credit_goes_back_in_batches() -> None:
    """Each WINDOW_UPDATE costs both tunnels a TLS record and a wake-up: a stream's consumed
    bytes are credited once half its window is owed, the connection's once what is owed is
    half of what the peer may still send on it."""
    served = ServedStream(auto_ack=False)
    server, client = served.server, served.client
    mib = 1024 * 1024
    _send(client, 1, mib)
    pump_to_ours(client, server)
    server.ack(1, mib)  # owed 1 MiB of the stream's 4: nothing announced
    pump_to_theirs(server, client)
    assert client.local_flow_control_window(1) == STREAM_WINDOW - mib
    _send(client, 1, mib)
    pump_to_ours(client, server)
    server.ack(1, mib)  # owed 2 MiB, half the stream's window: announced
    pump_to_theirs(server, client)
    assert client.local_flow_control_window(1) == STREAM_WINDOW
    # The connection's window is four times larger: 2 MiB owed of 14 left, not yet.
    assert client.outbound_flow_control_window == CONNECTION_WINDOW - 2 * mib


def test_streams_that_stopped_reading_do_not_hold_back_the_credit_of_the_others() -> None:
    """Three streams whose consumers stopped hold three quarters of the connection's window,
    a fourth has the rest and has passed half of it on. That half goes back at once (it is
    more than half of what the peer may still send: nothing), not when a fixed batch fills,
    which a quarter or half of the connection's window never would."""
    served = ServedStream(auto_ack=False)
    server, client = served.server, served.client
    for sid in (3, 5):
        served.open(sid, auto_ack=False)
    reader = served.open(7, auto_ack=False)
    for sid in (1, 3, 5):  # whole stream windows, never passed on
        _send(client, sid, STREAM_WINDOW)
    pump_to_ours(client, server)
    left = client.outbound_flow_control_window
    assert left == CONNECTION_WINDOW - 3 * STREAM_WINDOW
    _send(client, 7, left)
    pump_to_ours(client, server)
    assert client.outbound_flow_control_window == 0  # the peer has nothing left to send
    assert len(reader.data) == left
    server.ack(7, left // 2)  # half of it passed on so far
    pump_to_theirs(server, client)
    assert client.outbound_flow_control_window == left // 2


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\n\r\n",
        PREFACE + frame_header(4, FrameType.PING, 0, 0) + b"abcd",
        PREFACE + frame_header(2 * 1024 * 1024, FrameType.SETTINGS, 0, 0),
    ],
)
def test_malformed_input_ends_connection_with_goaway(garbage: bytes) -> None:
    rec = Recorder()
    server = H2Connection(client=False, handler=rec)
    server.receive(garbage)
    assert server.closed
    assert rec.terminated and rec.terminated[0][0] != ErrorCode.NO_ERROR
    out = taken(server)
    assert out[3] == FrameType.GOAWAY


def test_bad_hpack_is_a_compression_error() -> None:
    rec = Recorder()
    server = H2Connection(client=False, handler=rec)
    client = h2_client()
    pump_to_ours(client, server)
    server.receive(headers_frame(1, b"\xff\xff\xff", end_stream=True))
    assert server.closed
    assert rec.terminated[0][0] == ErrorCode.COMPRESSION_ERROR


def test_split_frames_reassemble_across_reads() -> None:
    rec = Recorder()
    server = H2Connection(client=False, handler=rec)
    server.initiate()
    client = h2_client()
    client.send_headers(1, CONNECT)
    data = client.data_to_send()
    for i in range(len(data)):  # one byte at a time
        server.receive(data[i : i + 1])
    assert rec.requests == [(1, CONNECT)]
    stream = StreamRec(server)
    stream.sid = 1
    server.respond(1, 200, stream, end=False)
    pump_to_theirs(server, client)
    client.send_data(1, b"abcdef" * 1000, end_stream=True)
    data = client.data_to_send()
    for i in range(0, len(data), 7):
        server.receive(data[i : i + 7])
    assert bytes(stream.data) == b"abcdef" * 1000
    assert stream.ended


def test_padded_data_is_delivered_without_padding_and_credited() -> None:
    served = ServedStream()
    server, client, stream = served.server, served.client, served.stream
    client.send_data(1, b"padded" * 100, pad_length=200, end_stream=True)
    pump_to_ours(client, server)
    assert bytes(stream.data) == b"padded" * 100
    assert stream.ended


def test_drain_refuses_new_streams_and_lets_open_ones_finish() -> None:
    served = ServedStream()
    server, client, stream = served.server, served.client, served.stream

    server.drain("upgrade")
    events = pump_to_theirs(server, client)
    goaways = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    assert goaways and goaways[0].last_stream_id == 1
    assert goaways[0].error_code == ErrorCode.NO_ERROR
    assert not server.drained  # stream 1 is still open

    # A stream the client opened before it saw the GOAWAY is refused, never processed.
    late = h2_client()
    raw = late.data_to_send()
    late.send_headers(3, CONNECT)
    server2 = H2Connection(client=False, handler=Recorder())
    server2.initiate()
    server2.receive(raw)
    server2.drain()
    server2.receive(late.data_to_send())
    # (h2 stops reading at a GOAWAY, so the frame is checked on the wire.)
    wire = taken(server2)
    assert wire.endswith(rst_stream(3, ErrorCode.REFUSED_STREAM))
    assert not server2.streams

    # The open stream still carries data both ways, then ends the drain. (h2 refuses to
    # send after a GOAWAY, so the client's frame is written by hand.)
    server.receive(data_frame(1, b"still here", end_stream=True))
    assert bytes(stream.data) == b"still here" and stream.ended
    server.send_data(1, b"bye")
    server.end_stream(1)
    wire = taken(server)
    # The end rides on the last DATA frame, still queued: one frame, not two.
    assert wire.endswith(data_frame(1, b"bye", end_stream=True))
    assert data_frame(1, end_stream=True) not in wire
    assert server.drained


def test_the_end_of_a_stream_rides_on_its_last_data_frame_only_while_that_is_queued_last() -> None:
    """END_STREAM goes on the stream's last DATA frame when that frame is still queued and
    the newest; once it has been taken for the wire, or another frame came after it, the
    end is a frame of its own."""
    s = ServedStream()
    s.server.send_data(1, b"one")
    s.server.end_stream(1)
    wire = taken(s.server)
    assert wire == data_frame(1, b"one", end_stream=True)
    events = s.client.receive_data(wire)  # another HTTP/2 stack reads it as data and end
    assert [type(e).__name__ for e in events] == ["DataReceived", "StreamEnded"]

    s = ServedStream()
    s.server.send_data(1, b"two")
    first = taken(s.server)  # on the wire already
    s.server.end_stream(1)
    assert first == data_frame(1, b"two")
    assert taken(s.server) == data_frame(1, end_stream=True)

    s = ServedStream()
    s.server.send_data(1, b"three")
    s.server.send_ping(b"12345678")  # another frame after it
    s.server.end_stream(1)
    wire = taken(s.server)
    assert wire.startswith(data_frame(1, b"three"))
    assert wire.endswith(data_frame(1, end_stream=True))


def test_header_table_size_change_is_acknowledged_in_the_next_header_block() -> None:
    """Our header blocks use no dynamic table; a peer that shrinks its table still gets the
    size update RFC 7541 4.2 requires at the start of the next block, and reads it."""
    server = h2_server()
    server.initiate_connection()
    ours = H2Connection(client=True, handler=Recorder())
    ours.initiate()
    pump_to_theirs(ours, server)
    server.update_settings({h2.settings.SettingCodes.HEADER_TABLE_SIZE: 0})
    pump_to_ours(server, ours)
    pump_to_theirs(ours, server)  # our SETTINGS ack
    for n in range(2):
        stream = StreamRec(ours)
        stream.sid = ours.open_stream(CONNECT, stream)
        out = taken(ours)
        block_start = out[9]  # the HEADERS frame's first payload byte
        assert (block_start & 0xE0 == 0x20) == (n == 0)  # a size update, once
        events = server.receive_data(out)
        got = [e for e in events if isinstance(e, h2.events.RequestReceived)]
        assert got and dict(got[0].headers)[b":authority"] == dict(CONNECT)[":authority"].encode()


def test_a_framed_send_is_one_buffer_that_a_reference_peer_reads_as_the_data() -> None:
    """A payload with room for its frame header in front leaves as one buffer (one run of
    TLS records); the h2 library must read it as the DATA it is. Past the window it is
    queued like any other send, and what waits is exactly the payload, copied on request
    so the producer's buffer is free again."""
    server = h2_server()
    server.initiate_connection()
    ours = H2Connection(client=True, handler=Recorder())
    ours.initiate()
    pump_to_theirs(ours, server)
    pump_to_ours(server, ours)
    stream = StreamRec(ours)
    stream.sid = ours.open_stream(CONNECT, stream)
    pump_to_theirs(ours, server)
    server.send_headers(stream.sid, STATUS_OK)
    pump_to_ours(server, ours)

    buf = bytearray(9 + 1000)
    buf[9:] = bytes(range(200)) * 5
    framed = memoryview(buf)
    ours.send_data(stream.sid, framed[9:], framed)
    out = ours.take_output()
    assert len(out) == 1 and out[0].obj is buf  # type: ignore[union-attr]
    events = server.receive_data(bytes(out[0]))
    data = [e for e in events if isinstance(e, h2.events.DataReceived)]
    assert [bytes(e.data) for e in data] == [bytes(buf[9:])]

    # The peer's window (64 KiB by default) is nearly used up: the rest must wait.
    big = bytearray(9 + 70_000)
    big[9:] = b"y" * 70_000
    view = memoryview(big)
    ours.send_data(stream.sid, view[9:], view)
    sent = b"".join(bytes(b) for b in ours.take_output())
    got = b"".join(
        bytes(e.data) for e in server.receive_data(sent) if isinstance(e, h2.events.DataReceived)
    )
    assert got == b"y" * (65_535 - 1000)
    assert ours.pending(stream.sid) == 70_000 - len(got)

    # The producer reuses its buffer: the queue must hold a copy, not a view of it.
    ours.own_pending(stream.sid)
    big[9:] = b"z" * 70_000
    server.acknowledge_received_data(65_535, stream.sid)
    server.increment_flow_control_window(1 << 20)
    server.increment_flow_control_window(1 << 20, stream.sid)
    pump_to_ours(server, ours)
    rest = b"".join(
        bytes(e.data)
        for e in server.receive_data(b"".join(bytes(b) for b in ours.take_output()))
        if isinstance(e, h2.events.DataReceived)
    )
    assert rest == b"y" * (70_000 - len(got))
