"""The hand-written ZDS codec against the real protobuf runtime (zds.proto compiled by
protoc at test time), both directions, plus strictness and fuzzing."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.zds.pb import from_pb, reference, to_pb
from zds.messages import (
    MAX_MESSAGE_SIZE,
    Ack,
    AddWorkload,
    DelWorkload,
    KeepWorkload,
    SnapshotSent,
    Version,
    WorkloadInfo,
    WorkloadRequest,
    WorkloadResponse,
    ZdsError,
    ZdsHello,
    decode,
    decode_hello,
    decode_request,
    decode_response,
    describe,
    encode,
)

text = st.text(max_size=40)
infos = st.builds(WorkloadInfo, text, text, text)
payloads = st.one_of(
    st.builds(AddWorkload, text, st.none() | infos),
    st.builds(KeepWorkload, text),
    st.builds(DelWorkload, text),
    st.just(SnapshotSent()),
)
requests = st.builds(WorkloadRequest, payloads)
responses = st.builds(WorkloadResponse, st.builds(Ack, text))
hellos = st.builds(ZdsHello, st.integers(-(2**31), 2**31 - 1))
messages = st.one_of(requests, responses, hellos, infos)

TOP_LEVEL = (ZdsHello, WorkloadRequest, WorkloadResponse, WorkloadInfo)


def test_field_numbers_match_upstream():
    # Upstream istio.workload.zds; a renumbering would break every real peer.
    pb = reference()
    fields = {
        m: {f.name: f.number for f in getattr(pb, m).DESCRIPTOR.fields}
        for m in ("ZdsHello", "WorkloadInfo", "AddWorkload", "KeepWorkload", "DelWorkload")
    }
    assert fields == {
        "ZdsHello": {"version": 1},
        "WorkloadInfo": {"name": 1, "namespace": 2, "service_account": 3},
        "AddWorkload": {"uid": 1, "workload_info": 2},
        "KeepWorkload": {"uid": 1},
        "DelWorkload": {"uid": 2},
    }
    req = {f.name: f.number for f in pb.WorkloadRequest.DESCRIPTOR.fields}
    assert req == {"add": 1, "keep": 5, "del": 2, "snapshot_sent": 3}
    assert {f.name: f.number for f in pb.WorkloadResponse.DESCRIPTOR.fields} == {"ack": 1}
    assert {f.name: f.number for f in pb.Ack.DESCRIPTOR.fields} == {"error": 1}
    assert pb.DESCRIPTOR.package == "istio.workload.zds"
    assert pb.Version.Value("V1") == int(Version.V1) == 1


@pytest.mark.parametrize(
    ("msg", "wire"),
    [
        (ZdsHello(), "0801"),
        (WorkloadRequest(SnapshotSent()), "1a00"),
        (WorkloadResponse(Ack()), "0a00"),
        (WorkloadResponse(Ack("no")), "0a040a026e6f"),
        (WorkloadRequest(KeepWorkload("x")), "2a030a0178"),
        (WorkloadRequest(DelWorkload("y")), "1203120179"),
        (WorkloadRequest(AddWorkload("u")), "0a030a0175"),
        (
            WorkloadRequest(AddWorkload("u", WorkloadInfo("a", "b", "c"))),
            "0a0e0a017512090a01611201621a0163",
        ),
        (WorkloadInfo("", "", ""), ""),
        (ZdsHello(-5), "08fbffffffffffffffff01"),
    ],
)
def test_known_encodings(msg, wire):
    assert encode(msg).hex() == wire
    assert to_pb(msg).SerializeToString().hex() == wire
    assert decode(type(msg), bytes.fromhex(wire)) == msg


@settings(max_examples=200)
@given(messages)
def test_ours_encodes_as_protobuf_does(msg):
    assert encode(msg) == to_pb(msg).SerializeToString(deterministic=True)


@settings(max_examples=200)
@given(messages)
def test_we_decode_what_protobuf_encodes(msg):
    assert decode(type(msg), to_pb(msg).SerializeToString()) == msg


@settings(max_examples=200)
@given(messages)
def test_protobuf_decodes_what_we_encode(msg):
    pb_cls = getattr(reference(), type(msg).__name__)
    assert from_pb(pb_cls.FromString(encode(msg))) == msg


def _pb_decode(cls: type, data: bytes) -> Any:
    """Theirs, or the exception it raised."""
    try:
        return from_pb(getattr(reference(), cls.__name__).FromString(data))
    except Exception as e:
        return e


def _agree_when_we_accept(cls: type, data: bytes) -> None:
    """Any input: we return a message or raise ZdsError, nothing else. What we accept,
    protobuf accepts with the same value (we may be stricter, never looser)."""
    try:
        ours: Any = decode(cls, data)
    except ZdsError as e:
        ours = e
    if isinstance(ours, ZdsError):
        assert str(ours)
    else:
        assert _pb_decode(cls, data) == ours


@settings(max_examples=250)
@given(st.sampled_from(TOP_LEVEL), st.binary(max_size=64))
def test_random_bytes_are_a_message_or_a_zds_error(cls, data):
    _agree_when_we_accept(cls, data)


def _tag(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _varint(v: int) -> bytes:
    out = bytearray()
    while v > 0x7F:
        out.append(v & 0x7F | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


# Plausible-looking fields: valid values, unknown numbers, every wire type, groups.
_field = st.one_of(
    st.tuples(st.integers(1, 20), st.just(0), st.integers(0, 2**64 - 1)).map(
        lambda t: _tag(t[0], 0) + _varint(t[2])
    ),
    st.tuples(st.integers(1, 20), st.binary(max_size=12)).map(
        lambda t: _tag(t[0], 2) + _varint(len(t[1])) + t[1]
    ),
    st.tuples(st.integers(1, 20), st.sampled_from([1, 5])).map(
        lambda t: _tag(t[0], t[1]) + b"\0" * (8 if t[1] == 1 else 4)
    ),
    st.integers(6, 20).map(lambda n: _tag(n, 3) + _tag(1, 0) + b"\x01" + _tag(n, 4)),
    messages.map(lambda m: _tag(1, 2) + _varint(len(encode(m))) + encode(m)),
    requests.map(encode),
)


@settings(max_examples=250)
@given(st.sampled_from(TOP_LEVEL), st.lists(_field, max_size=5))
def test_structured_fuzz_agrees_with_protobuf(cls, fields):
    _agree_when_we_accept(cls, b"".join(fields))


def test_unknown_fields_are_skipped_in_every_wire_type():
    body = encode(WorkloadRequest(DelWorkload("p")))
    extras = (
        _tag(9, 0)
        + _varint(2**63)
        + _tag(10, 1)
        + b"12345678"
        + _tag(11, 2)
        + b"\x02hi"
        + _tag(12, 5)
        + b"1234"
        + _tag(13, 3)
        + _tag(1, 2)
        + b"\x00"
        + _tag(14, 3)
        + _tag(14, 4)
        + _tag(13, 4)
    )
    assert decode_request(extras + body + extras) == WorkloadRequest(DelWorkload("p"))
    # trust_domain (field 4, reserved upstream) from an older agent is ignored too.
    info = encode(WorkloadInfo("n", "ns", "sa")) + _tag(4, 2) + b"\x0dcluster.local"
    assert decode(WorkloadInfo, info) == WorkloadInfo("n", "ns", "sa")


def test_protobuf_merge_rules():
    a = encode(WorkloadRequest(AddWorkload("u1", WorkloadInfo("n", "", ""))))
    b = encode(WorkloadRequest(AddWorkload("", WorkloadInfo("", "ns", "sa"))))
    # The same oneof member twice merges; a later scalar wins only when present.
    merged = WorkloadRequest(AddWorkload("u1", WorkloadInfo("n", "ns", "sa")))
    assert decode_request(a + b) == merged == _pb_decode(WorkloadRequest, a + b)
    # Another member replaces the earlier one.
    c = encode(WorkloadRequest(SnapshotSent()))
    assert decode_request(a + c) == WorkloadRequest(SnapshotSent())
    assert decode_request(c + a) == decode_request(a)
    # A repeated string keeps its last value.
    two = _tag(1, 2) + b"\x01a" + _tag(1, 2) + b"\x01b"
    assert decode(Ack, two) == Ack("b")


@pytest.mark.parametrize(
    ("cls", "data", "says"),
    [
        (WorkloadRequest, b"", "has no payload"),
        (WorkloadResponse, b"", "has no payload"),
        (WorkloadResponse, _tag(7, 2) + b"\x00", "has no payload"),
        (WorkloadRequest, b"\x0a", "truncated varint"),
        (WorkloadRequest, b"\x0a\x05\x0a\x01", "truncated WorkloadRequest.add"),
        (WorkloadRequest, b"\x0a\x80", "truncated varint"),
        (AddWorkload, b"\x08\x01", "wire type 0, expected 2"),
        (ZdsHello, b"\x0a\x00", "wire type 2, expected 0"),
        (WorkloadRequest, b"\x1d\x00\x00\x00\x00", "wire type 5, expected 2"),
        (AddWorkload, b"\x0a\x01\xff", "not valid UTF-8"),
        (WorkloadInfo, b"\x12\x03\xed\xa0\x80", "not valid UTF-8"),  # a UTF-16 surrogate
        (ZdsHello, b"\x08" + b"\xff" * 10 + b"\x01", "overflows 64 bits"),
        (ZdsHello, b"\x08" + b"\x80" * 11, "overflows 64 bits"),
        (ZdsHello, b"\x00\x00", "field number 0"),
        (ZdsHello, b"\x4e", "invalid wire type 6"),
        (ZdsHello, b"\x4f", "invalid wire type 7"),
        (ZdsHello, b"\x4c", "end of group 9 without its start"),
        (ZdsHello, b"\x4b", "group 9 is not closed"),
        (ZdsHello, b"\x4b\x54", "group 9 closed as group 10"),
        (ZdsHello, b"\x49\x00\x00", "truncated unknown field 9"),
        (ZdsHello, b"\x4a\x7f", "truncated unknown field 9"),
        (ZdsHello, b"\x4b" * 100, "groups nested deeper"),
        (ZdsHello, b"\x80\x80\x80\x80\x80\x01", "over 32 bits"),
    ],
)
def test_malformed_input_is_a_clear_zds_error(cls, data, says):
    with pytest.raises(ZdsError, match=says):
        decode(cls, data)


def test_overlong_input_is_refused_both_ways():
    big = "x" * MAX_MESSAGE_SIZE
    with pytest.raises(ZdsError, match="over"):
        encode(WorkloadResponse(Ack(big)))
    data = to_pb(WorkloadResponse(Ack(big))).SerializeToString()
    with pytest.raises(ZdsError, match=f"over {MAX_MESSAGE_SIZE}"):
        decode_response(data)


@pytest.mark.parametrize(
    ("msg", "says"),
    [
        (ZdsHello(2**31), "int32"),
        (ZdsHello("1"), "int32"),  # type: ignore[arg-type]
        (WorkloadRequest(KeepWorkload("\ud800")), "not valid text"),
        (WorkloadRequest(KeepWorkload(7)), "must be a string"),  # type: ignore[arg-type]
        (WorkloadRequest("add"), "needs a payload"),  # type: ignore[arg-type]
        (WorkloadResponse(KeepWorkload("x")), "needs a payload"),  # type: ignore[arg-type]
        (AddWorkload("u", "info"), "must be WorkloadInfo"),  # type: ignore[arg-type]
        ("hello", "not a ZDS message"),
    ],
)
def test_unencodable_values_are_a_clear_zds_error(msg, says):
    with pytest.raises(ZdsError, match=says):
        encode(msg)


def test_open_enum_keeps_unknown_versions():
    assert decode_hello(encode(ZdsHello(7))) == ZdsHello(7)
    assert decode_hello(b"") == ZdsHello(Version.NOT_USED)


def test_describe_names_the_payload():
    assert describe(WorkloadRequest(DelWorkload("p"))) == "DelWorkload(uid='p')"
    assert describe(ZdsHello()) == "ZdsHello(version=<Version.V1: 1>)"
