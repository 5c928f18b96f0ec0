"""HPACK without the dynamic table: how HBONE's own header blocks are written, and the
fast path for reading blocks written that way. Pure.

A CONNECT's headers differ on every stream (`:authority`, `forwarded` with the client's
port, a fresh `traceparent`), so a dynamic table only churns: the `hpack` library, in pure
Python, inserted and evicted five entries per CONNECT and searched its table for each
header, on both tunnels (its encode and decode were the largest single costs of a new
connection after the TLS records). Here every header is a static-table index or a literal
"without indexing" with raw (not Huffman) strings (RFC 7541 6.1, 6.2.2): valid for any
decoder, nothing for either side to remember.

Reading: `decode_plain` parses a block made only of such representations (whoever wrote
it) and returns None for anything else (an index into the dynamic table, a literal with
incremental indexing, a table size update, a Huffman string, a truncated block, a header
list over the limit), which the caller then hands to its full decoder. A block `decode_plain`
accepts neither reads nor changes the dynamic table, so skipping the full decoder for it
leaves that decoder's state exactly as decoding it would have.
"""

from __future__ import annotations

# RFC 7541 Appendix A: the static table, index 1..61.
STATIC_TABLE: tuple[tuple[str, str], ...] = (
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
)
STATIC_COUNT = len(STATIC_TABLE)

# A full (name, value) match: one byte (index < 127 always). Entries with an empty value
# are names only: an empty value is sent as a literal like any other.
_FULL: dict[tuple[str, str], bytes] = {}
# A name's first index.
_NAME: dict[str, int] = {}
for _i, (_n, _v) in enumerate(STATIC_TABLE, start=1):
    if _v:
        _FULL.setdefault((_n, _v), bytes([0x80 | _i]))
    _NAME.setdefault(_n, _i)

# RFC 7541 4.1: each entry counts its name, its value and 32 octets.
ENTRY_OVERHEAD = 32


def _int(value: int, prefix_bits: int, first: int) -> bytes:
    """An HPACK integer (RFC 7541 5.1) whose first byte carries `first`'s high bits."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(text: str) -> bytes:
    raw = text.encode("utf-8")
    n = len(raw)
    # One length byte for anything under 127 bytes (every HBONE header in practice).
    return (bytes((n,)) if n < 0x7F else _int(n, 7, 0)) + raw


def encode(headers: list[tuple[str, str]], table_size_update: int | None = None) -> bytes:
    """A header block of static-table indexes and literals without indexing. With
    `table_size_update`, the block starts with a dynamic table size update to that size
    (owed once after the peer changes SETTINGS_HEADER_TABLE_SIZE; RFC 7541 4.2)."""
    parts: list[bytes] = []
    if table_size_update is not None:
        parts.append(_int(table_size_update, 5, 0x20))
    for name, value in headers:
        full = _FULL.get((name, value))
        if full is not None:
            parts.append(full)
            continue
        index = _NAME.get(name)
        if index is None:
            parts.append(b"\x00")
            parts.append(_literal(name))
        elif index < 0x0F:
            parts.append(_SMALL_NAME_INDEX[index])
        else:
            parts.append(_int(index, 4, 0x00))
        parts.append(_literal(value))
    return b"".join(parts)


_SMALL_NAME_INDEX = tuple(bytes((i,)) for i in range(0x0F))


def _read_int(block: bytes, i: int, prefix_bits: int) -> tuple[int, int]:
    """(value, next offset), or (-1, _) when the block ends inside it or it is absurdly long."""
    limit = (1 << prefix_bits) - 1
    value = block[i] & limit
    i += 1
    if value < limit:
        return value, i
    shift = 0
    n = len(block)
    while i < n and shift <= 28:
        b = block[i]
        i += 1
        value += (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7
    return -1, i


def _read_raw(block: bytes, i: int) -> tuple[str | None, int]:
    """A raw string literal (None when Huffman-coded or cut short)."""
    if i >= len(block) or block[i] & 0x80:
        return None, i
    length, i = _read_int(block, i, 7)
    end = i + length
    if length < 0 or end > len(block):
        return None, i
    return block[i:end].decode("latin-1"), end


def decode_plain(block: bytes, max_list_size: int) -> list[tuple[str, str]] | None:
    """The headers of a block made only of static-table indexes and raw literals without
    (or never) indexing, with names and values as latin-1 text; None when the block holds
    anything else or its header list would exceed `max_list_size` (the full decoder then
    decodes it, or raises what it raises).

    Written for speed (it runs for every CONNECT and every answer): one-byte integers and
    lengths, the usual case, are read inline; anything longer goes through `_read_int`."""
    out: list[tuple[str, str]] = []
    size = 0
    i = 0
    n = len(block)
    static = STATIC_TABLE
    while i < n:
        b = block[i]
        if b & 0x80:  # indexed: only the static table
            index = b & 0x7F
            i += 1
            if not 0 < index <= STATIC_COUNT:  # 0, the dynamic table, or a longer integer
                return None
            name, value = static[index - 1]
        elif b & 0xE0:  # 01xxxxxx incremental indexing, 001xxxxx size update: the table
            return None
        else:  # 0000xxxx without indexing, 0001xxxx never indexed
            index = b & 0x0F
            if index == 0x0F:
                index, i = _read_int(block, i, 4)
                if not 0 < index <= STATIC_COUNT:
                    return None
            else:
                i += 1
            if index == 0:  # the name is a literal
                if i >= n:
                    return None
                length = block[i]
                if length >= 0x7F:  # Huffman (high bit) or a longer length
                    got, i = _read_raw(block, i)
                    if got is None:
                        return None
                    name = got
                else:
                    i += 1
                    end = i + length
                    if end > n:
                        return None
                    name = block[i:end].decode("latin-1")
                    i = end
            else:
                name = static[index - 1][0]
            if i >= n:
                return None
            length = block[i]
            if length >= 0x7F:
                got, i = _read_raw(block, i)
                if got is None:
                    return None
                value = got
            else:
                i += 1
                end = i + length
                if end > n:
                    return None
                value = block[i:end].decode("latin-1")
                i = end
        size += len(name) + len(value) + ENTRY_OVERHEAD
        if size > max_list_size:
            return None
        out.append((name, value))
    return out
