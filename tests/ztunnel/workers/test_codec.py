"""The owner <-> worker messages: every kind round-trips, and what the protocol does not
allow is a CodecError that says what, never a crash or a buffer that grows."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ztunnel.workers import codec

EXAMPLES: list[codec.Message] = [
    codec.Hello(3, 4242),
    codec.State((("type/a", "ns/a", b"\x00\x01"), ("type/b", "ns/b", b""))),
    codec.State(()),
    codec.Enrol(7, "uid-1", "pod", "ns", "sa"),
    codec.Release(8, "uid-1", 2.5),
    codec.Drain(9, 30.0),
    codec.Done(10, 2, ""),
    codec.Done(11, 0, "pod start failed: no certificate"),
    codec.CertRequest("spiffe://cluster.local/ns/a/sa/b"),
    codec.Cert("spiffe://td/ns/a/sa/b", b"KEY", (b"LEAF", b"ROOT"), b"ROOT", str(2**150), 1.5, 2.5),
    codec.CertFailed("spiffe://td/ns/a/sa/b", "CA away"),
    codec.ReportRequest(12),
    codec.LogLevel("debug"),
    codec.Report(13, {"connections": [{"src": "1.2.3.4:5"}], "metrics": {}}),
]


def roundtrip(msg: codec.Message, fds: int = 0) -> codec.Message:
    r = codec.Reassembler()
    frames = codec.encode(msg)
    out = None
    for i, frame in enumerate(frames):
        assert out is None
        out = r.feed(frame, fds if i == 0 else 0)
    assert out is not None
    return out


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_every_kind_round_trips(msg: codec.Message) -> None:
    assert roundtrip(msg, 1 if msg.KIND in codec.WITH_FD else 0) == msg


def test_a_large_message_goes_in_several_frames_and_comes_back_whole() -> None:
    big = codec.State(tuple(("t", f"n{i}", bytes(1000)) for i in range(500)))
    frames = codec.encode(big)
    assert len(frames) > 5
    assert all(len(f) <= codec.MAX_FRAME for f in frames)
    assert roundtrip(big) == big


def test_an_fd_only_on_the_message_that_carries_one() -> None:
    frame = codec.encode(codec.Hello(1, 2))[0]
    with pytest.raises(codec.CodecError, match=r"HELLO: 1 fd\(s\) where the protocol allows none"):
        codec.Reassembler().feed(frame, 1)
    enrol = codec.encode(codec.Enrol(1, "u", "", "", ""))[0]
    with pytest.raises(codec.CodecError, match="ENROL: carries no fd"):
        codec.Reassembler().feed(enrol, 0)
    with pytest.raises(codec.CodecError, match="ENROL: 2 fd"):
        codec.Reassembler().feed(enrol, 2)


@pytest.mark.parametrize(
    ("frame", "why"),
    [
        (b"\x01", "has no header"),
        (b"\x02\x01\x00\x00", "protocol version 2"),
        (b"\x01\x63\x00\x00", "unknown message kind 99"),
        (b"\x01\x01\x04\x00", "unknown flags"),
        (b"\x01\x01\x00\x00", "HELLO: no field count"),
        (b"\x01\x01\x00\x00\x00\x01", "HELLO: 1 fields, expected 2"),
        (b"\x01\x01\x00\x00\x00\x02\x00\x00\x00\x09", "HELLO.index: says 9 bytes"),
        (b"\x01\x01\x00\x00\x00\x02\x00\x00\x00\x01x\x00\x00\x00\x00", "8"),
        (b"\x01\x07\x00\x00\x00\x01\x00\x00\x00\x01\xff", "CERT_REQUEST.identity is not UTF-8"),
        (b"\x01\x0b\x00\x00\x00\x02" + b"\x00\x00\x00\x08" + bytes(8) + b"\x00\x00\x00\x02[]",
         "REPORT.body is not a JSON object"),
        (b"\x01\x0b\x00\x00\x00\x02" + b"\x00\x00\x00\x08" + bytes(8) + b"\x00\x00\x00\x01{",
         "REPORT.body is not JSON"),
        (b"\x01\x01\x00\x00" + b"x" * codec.MAX_FRAME, "more than"),
    ],
)  # fmt: skip
def test_bad_frames_are_refused_saying_why(frame: bytes, why: str) -> None:
    with pytest.raises(codec.CodecError, match=why):
        codec.Reassembler().feed(frame)


def test_bytes_after_the_last_field_are_refused() -> None:
    frame = codec.encode(codec.Hello(1, 2))[0] + b"!"
    with pytest.raises(codec.CodecError, match="HELLO: 1 bytes after the last field"):
        codec.Reassembler().feed(frame)


def test_a_frame_of_another_kind_inside_a_message_is_refused() -> None:
    frames = codec.encode(codec.State(tuple(("t", "n", bytes(codec.MAX_CHUNK)) for _ in range(2))))
    r = codec.Reassembler()
    assert r.feed(frames[0]) is None
    with pytest.raises(codec.CodecError, match="a HELLO frame inside a STATE message"):
        r.feed(codec.encode(codec.Hello(1, 2))[0])


def test_a_message_larger_than_the_limit_is_refused_before_it_is_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(codec, "MAX_MESSAGE", 3 * codec.MAX_CHUNK)
    r = codec.Reassembler()
    more = codec.HEADER.pack(codec.VERSION, codec.Kind.STATE, codec.MORE) + bytes(codec.MAX_CHUNK)
    for _ in range(3):
        assert r.feed(more) is None
    with pytest.raises(codec.CodecError, match="STATE: more than"):
        r.feed(more)


def test_a_nested_list_that_lies_about_its_length_is_refused() -> None:
    body = codec.encode_body(codec.State((("t", "n", b"abc"),)))
    bad = body[:-1]  # the last item is one byte short, and the lengths say otherwise
    frame = codec.HEADER.pack(codec.VERSION, codec.Kind.STATE, 0) + bad
    with pytest.raises(codec.CodecError, match="STATE"):
        codec.Reassembler().feed(frame)


@given(st.binary(max_size=200))
def test_arbitrary_bytes_are_a_message_or_a_codec_error(data: bytes) -> None:
    with contextlib.suppress(codec.CodecError):
        codec.Reassembler().feed(data)
