"""gRPC message counting over arbitrary chunking."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from waypoint.telemetry.grpcframes import MessageCounter


def frame(payload: bytes) -> bytes:
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        ([b""], 0),
        ([frame(b"")], 1),
        ([frame(b"abc") + frame(b"de")], 2),
        ([frame(b"abc")[:2], frame(b"abc")[2:]], 1),
        ([frame(b"x" * 70000)[:3], frame(b"x" * 70000)[3:40000], frame(b"x" * 70000)[40000:]], 1),
        ([frame(b"a") + frame(b"b")[:4]], 1),  # counted once its prefix is whole
    ],
    ids=["nothing", "empty message", "two in one chunk", "split prefix", "large split", "partial"],
)
def test_counts(chunks: list[bytes], expected: int) -> None:
    counter = MessageCounter()
    for c in chunks:
        counter.feed(c)
    assert counter.messages == expected


@settings(max_examples=50)
@given(st.lists(st.binary(max_size=40), max_size=8), st.data())
def test_any_chunking_counts_the_same(payloads: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(frame(p) for p in payloads)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    counter = MessageCounter()
    start = 0
    for cut in [*cuts, len(stream)]:
        counter.feed(stream[start:cut])
        start = cut
    assert counter.messages == len(payloads)
