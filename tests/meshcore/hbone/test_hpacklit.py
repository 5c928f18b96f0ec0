"""HPACK without the dynamic table: what we write, any decoder (the hpack library as the
reference) reads back; what `decode_plain` accepts, it reads as the reference does and
without touching the reference's table; anything else it leaves to the full decoder."""

from __future__ import annotations

import hpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshcore.hbone import hpacklit

names = st.one_of(
    st.sampled_from([n for n, _ in hpacklit.STATIC_TABLE]),
    st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=40),
)
values = st.one_of(
    st.sampled_from([v for _, v in hpacklit.STATIC_TABLE]),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=300),
)
header_lists = st.lists(st.tuples(names, values), max_size=12)


def _reference(block: bytes, decoder: hpack.Decoder | None = None) -> list[tuple[str, str]]:
    d = decoder if decoder is not None else hpack.Decoder()
    return [
        (bytes(k).decode("latin-1"), bytes(v).decode("latin-1"))
        for k, v in d.decode(block, raw=True)
    ]


@given(header_lists)
def test_what_we_write_the_reference_reads_and_so_do_we(headers: list[tuple[str, str]]) -> None:
    block = hpacklit.encode(headers)
    assert _reference(block) == headers
    assert hpacklit.decode_plain(block, 1 << 20) == headers


@given(header_lists)
def test_the_reference_table_is_untouched(headers: list[tuple[str, str]]) -> None:
    d = hpack.Decoder()
    _reference(hpacklit.encode(headers), d)
    assert len(d.header_table.dynamic_entries) == 0


def test_a_connect_is_small_and_a_200_is_one_byte() -> None:
    assert hpacklit.encode([(":status", "200")]) == b"\x88"
    block = hpacklit.encode([(":method", "CONNECT"), (":authority", "10.0.0.1:8080")])
    assert block == b"\x02\x07CONNECT\x01\x0d10.0.0.1:8080"


def test_a_table_size_update_leads_the_block() -> None:
    block = hpacklit.encode([(":status", "503")], table_size_update=0)
    assert block[0] == 0x20
    d = hpack.Decoder()
    assert _reference(block, d) == [(":status", "503")]
    # The update is ours to send, not to read on the fast path.
    assert hpacklit.decode_plain(block, 1 << 20) is None


@given(header_lists, st.booleans())
def test_reference_blocks_read_alike_or_are_left_to_the_full_decoder(
    headers: list[tuple[str, str]], huffman: bool
) -> None:
    """Blocks the hpack library writes (incremental indexing, Huffman, dynamic-table
    references on repeats): the fast path gives the same headers or declines."""
    enc = hpack.Encoder()
    ref = hpack.Decoder()
    for _ in range(2):  # the second block refers to the table the first one filled
        block = enc.encode(headers, huffman=huffman)
        expected = _reference(block, ref)
        got = hpacklit.decode_plain(block, 1 << 20)
        assert got is None or got == expected


@pytest.mark.parametrize(
    "block",
    [
        b"\x80",  # index 0
        b"\xff\x00",  # index past the static table (127)
        b"\xbe",  # index 62: the dynamic table
        b"\x40\x01a\x01b",  # incremental indexing
        b"\x3f\xe1\x1f",  # a table size update
        b"\x00\x81\xff\x01a",  # a Huffman name
        b"\x02\x85abc",  # a Huffman value
        b"\x02\x09CONN",  # cut short
        b"\x0f",  # an integer cut short
        b"\x0f\xff\xff\xff\xff\xff\xff\x01",  # an absurd integer
    ],
)
def test_anything_else_is_declined(block: bytes) -> None:
    assert hpacklit.decode_plain(block, 1 << 20) is None


def test_a_list_over_the_limit_is_declined() -> None:
    block = hpacklit.encode([("x-a", "v" * 100)])
    assert hpacklit.decode_plain(block, 200) is not None
    assert hpacklit.decode_plain(block, 100) is None  # 3 + 100 + 32 > 100
