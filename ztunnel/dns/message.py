"""DNS messages (RFC 1035) as bytes in, frozen values out, and answers built back. Pure.

Only what the tunnel's DNS proxy needs: a query is parsed whole (header, the question, and
every resource record walked so an EDNS OPT record is found and nothing is left unread);
an answer is built from A/AAAA/CNAME records; a forwarded answer is relayed as bytes after
its header and question were checked.

Invariants (each is a `DnsFormatError`, never another exception, whatever the bytes):
- a name is at most 255 octets on the wire and each label at most 63;
- a compression pointer points strictly before the position it was read from, so pointer
  chains cannot loop, and at most `MAX_POINTERS` are followed per name;
- the counts in the header must be met exactly by the message and nothing may follow the
  last record (a query with trailing bytes is malformed);
- a query carries exactly one question (what every resolver sends; RFC 9619).
Building never produces more than the limit given: a UDP answer bigger than 512 bytes
(or the client's EDNS size) is cut to its header and question with TC set, so the client
asks again over TCP (RFC 1035 4.2.1, RFC 6891 7).
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
HEADER = struct.Struct("!HHHHHH")
HEADER_LEN = HEADER.size  # 12
MAX_NAME_WIRE = 255
MAX_LABEL = 63
MAX_POINTERS = 64  # far more than any real name needs; a bound on work per name
MAX_UDP_PLAIN = 512  # a UDP answer without EDNS
MAX_UDP_EDNS = 1232  # what we advertise and honour at most (DNS flag day 2020)
MAX_MESSAGE = 65535  # a TCP message's 2-byte length prefix

# Flag bits of the header's second word.
QR = 0x8000
AA = 0x0400
TC = 0x0200
RD = 0x0100
RA = 0x0080
OPCODE_SHIFT = 11
OPCODE_MASK = 0xF
RCODE_MASK = 0xF


class RType(enum.IntEnum):
    A = 1
    NS = 2
    CNAME = 5
    SOA = 6
    PTR = 12
    MX = 15
    TXT = 16
    AAAA = 28
    SRV = 33
    OPT = 41
    ANY = 255


CLASS_IN = 1


class Rcode(enum.IntEnum):
    NOERROR = 0
    FORMERR = 1
    SERVFAIL = 2
    NXDOMAIN = 3
    NOTIMP = 4
    REFUSED = 5


class DnsFormatError(ValueError):
    """Bytes that are not a DNS message we accept; the message says what is wrong."""


# A name as a tuple of raw labels (no root label), as it was on the wire.
Labels = tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Question:
    labels: Labels
    qtype: int
    qclass: int

    @property
    def name(self) -> str:
        """The name in presentation form, lower case, no trailing dot ("" for the root);
        labels with bytes outside printable ASCII, or a '.', are escaped as \\DDD."""
        return name_text(self.labels)


@dataclass(frozen=True, slots=True)
class Query:
    """A parsed query: what the proxy decides on."""

    id: int
    flags: int
    question: Question
    # The client's EDNS UDP payload size, or None if the query had no OPT record.
    edns_size: int | None
    # The question section exactly as it was on the wire (echoed in answers).
    question_wire: bytes

    @property
    def opcode(self) -> int:
        return (self.flags >> OPCODE_SHIFT) & OPCODE_MASK

    @property
    def recursion_desired(self) -> bool:
        return bool(self.flags & RD)

    def udp_limit(self) -> int:
        """The largest UDP answer this client takes."""
        if self.edns_size is None:
            return MAX_UDP_PLAIN
        return max(MAX_UDP_PLAIN, min(self.edns_size, MAX_UDP_EDNS))


@dataclass(frozen=True, slots=True)
class Record:
    """An answer record: `rdata` is already encoded for its type (see `a`, `aaaa`, `cname`)."""

    labels: Labels
    rtype: int
    ttl: int
    rdata: bytes
    # When rdata is a name (CNAME), its labels, so it can be compressed against the rest.
    rdata_name: Labels | None = None


def _escape_label(label: bytes) -> str:
    out: list[str] = []
    for b in label.lower():
        if 0x21 <= b <= 0x7E and b not in (0x2E, 0x5C):  # printable, not '.' or '\'
            out.append(chr(b))
        else:
            out.append(f"\\{b:03d}")
    return "".join(out)


def name_text(labels: Labels) -> str:
    return ".".join(_escape_label(label) for label in labels)


def name_labels(text: str) -> Labels:
    """A presentation name ("a.b.c", a trailing dot allowed) as labels. Only plain names
    (letters, digits, '-', '_', '*'): hostnames from the mesh config, never client input."""
    text = text.rstrip(".")
    if not text:
        return ()
    labels = tuple(part.encode("ascii") for part in text.split("."))
    if any(not 0 < len(label) <= MAX_LABEL for label in labels):
        raise DnsFormatError(f"name {text!r}: a label is empty or longer than {MAX_LABEL}")
    if sum(len(label) + 1 for label in labels) + 1 > MAX_NAME_WIRE:
        raise DnsFormatError(f"name {text!r} is longer than {MAX_NAME_WIRE} octets")
    return labels


# -- reading ------------------------------------------------------------------------------


def _read_name(data: bytes, pos: int) -> tuple[Labels, int]:
    """The name at `pos` and the position after it (after the first pointer, if any)."""
    labels: list[bytes] = []
    wire_len = 1  # the root label
    end: int | None = None
    hops = 0
    limit = pos  # a pointer must point strictly before where it was read
    while True:
        if pos >= len(data):
            raise DnsFormatError("name runs past the end of the message")
        length = data[pos]
        kind = length & 0xC0
        if kind == 0xC0:
            if pos + 1 >= len(data):
                raise DnsFormatError("compression pointer runs past the end of the message")
            target = ((length & 0x3F) << 8) | data[pos + 1]
            if end is None:
                end = pos + 2
            hops += 1
            if hops > MAX_POINTERS:
                raise DnsFormatError(f"name follows more than {MAX_POINTERS} pointers")
            if target >= limit:
                raise DnsFormatError("compression pointer does not point backwards")
            limit = target
            pos = target
            continue
        if kind != 0:
            raise DnsFormatError(f"label type {kind >> 6:#b} is not supported")
        pos += 1
        if length == 0:
            return tuple(labels), (end if end is not None else pos)
        if pos + length > len(data):
            raise DnsFormatError("label runs past the end of the message")
        wire_len += length + 1
        if wire_len > MAX_NAME_WIRE:
            raise DnsFormatError(f"name is longer than {MAX_NAME_WIRE} octets")
        labels.append(data[pos : pos + length])
        pos += length
        if end is None:
            limit = pos


def _read_question(data: bytes, pos: int) -> tuple[Question, int]:
    labels, pos = _read_name(data, pos)
    if pos + 4 > len(data):
        raise DnsFormatError("question runs past the end of the message")
    qtype, qclass = struct.unpack_from("!HH", data, pos)
    return Question(labels, qtype, qclass), pos + 4


def _skip_records(data: bytes, pos: int, count: int, edns: list[int]) -> int:
    """Walk `count` records; an OPT record's UDP size is appended to `edns`."""
    for _ in range(count):
        labels, pos = _read_name(data, pos)
        if pos + 10 > len(data):
            raise DnsFormatError("record header runs past the end of the message")
        rtype, rclass, _ttl, rdlen = struct.unpack_from("!HHIH", data, pos)
        pos += 10
        if pos + rdlen > len(data):
            raise DnsFormatError("record data runs past the end of the message")
        if rtype == RType.OPT:
            if labels:
                raise DnsFormatError("an OPT record's name must be the root")
            edns.append(rclass)
        pos += rdlen
    return pos


def parse_header_id(data: bytes) -> int | None:
    """The message ID, if there is a header to read it from."""
    if len(data) < HEADER_LEN:
        return None
    return int.from_bytes(data[:2], "big")


def parse_query(data: bytes) -> Query:
    """A query as a client sends it; `DnsFormatError` for anything else."""
    if len(data) < HEADER_LEN:
        raise DnsFormatError(f"message of {len(data)} bytes is shorter than a header")
    if len(data) > MAX_MESSAGE:
        raise DnsFormatError(f"message of {len(data)} bytes is longer than {MAX_MESSAGE}")
    ident, flags, qd, an, ns, ar = HEADER.unpack_from(data)
    if flags & QR:
        raise DnsFormatError("message is a response, not a query")
    if qd != 1:
        raise DnsFormatError(f"a query must carry exactly one question, this one has {qd}")
    question, pos = _read_question(data, HEADER_LEN)
    question_wire = data[HEADER_LEN:pos]
    edns: list[int] = []
    pos = _skip_records(data, pos, an + ns + ar, edns)
    if pos != len(data):
        raise DnsFormatError(f"{len(data) - pos} bytes follow the last record")
    if len(edns) > 1:
        raise DnsFormatError("more than one OPT record")
    return Query(ident, flags, question, edns[0] if edns else None, question_wire)


@dataclass(frozen=True, slots=True)
class ResponseHead:
    """What a forwarded answer is checked by before it is relayed."""

    id: int
    flags: int
    question: Question | None

    @property
    def rcode(self) -> int:
        return self.flags & RCODE_MASK


def parse_response_head(data: bytes) -> ResponseHead:
    """The header and question of an upstream answer; the records are the client's to read."""
    if len(data) < HEADER_LEN:
        raise DnsFormatError(f"answer of {len(data)} bytes is shorter than a header")
    ident, flags, qd, _an, _ns, _ar = HEADER.unpack_from(data)
    if not flags & QR:
        raise DnsFormatError("answer is not a response")
    if qd > 1:
        raise DnsFormatError(f"answer carries {qd} questions")
    question = _read_question(data, HEADER_LEN)[0] if qd == 1 else None
    return ResponseHead(ident, flags, question)


def answer_addresses(
    data: bytes, qtype: int
) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The addresses of type `qtype` (A or AAAA) in an answer's answer section, in order
    (whatever their owner name: a CNAME chain's end is among them)."""
    if len(data) < HEADER_LEN:
        raise DnsFormatError(f"answer of {len(data)} bytes is shorter than a header")
    _, _, qd, an, _, _ = HEADER.unpack_from(data)
    pos = HEADER_LEN
    for _ in range(qd):
        pos = _read_question(data, pos)[1]
    out: list[IPAddress] = []
    for _ in range(an):
        pos = _read_name(data, pos)[1]
        if pos + 10 > len(data):
            raise DnsFormatError("record header runs past the end of the message")
        rtype, rclass, _ttl, rdlen = struct.unpack_from("!HHIH", data, pos)
        pos += 10
        if pos + rdlen > len(data):
            raise DnsFormatError("record data runs past the end of the message")
        rdata = data[pos : pos + rdlen]
        if rtype == qtype == RType.A and rclass == CLASS_IN and rdlen == 4:
            out.append(ipaddress.IPv4Address(rdata))
        elif rtype == qtype == RType.AAAA and rclass == CLASS_IN and rdlen == 16:
            out.append(ipaddress.IPv6Address(rdata))
        pos += rdlen
    return out


# -- building -----------------------------------------------------------------------------


def a(labels: Labels, ip: ipaddress.IPv4Address, ttl: int) -> Record:
    return Record(labels, RType.A, ttl, ip.packed)


def aaaa(labels: Labels, ip: ipaddress.IPv6Address, ttl: int) -> Record:
    return Record(labels, RType.AAAA, ttl, ip.packed)


def cname(labels: Labels, target: Labels, ttl: int) -> Record:
    return Record(labels, RType.CNAME, ttl, b"", rdata_name=target)


class _Writer:
    """Message bytes with name compression against names already written."""

    def __init__(self) -> None:
        self.buf = bytearray()
        # A suffix of labels (lower case) -> where it starts; only offsets a pointer reaches.
        self._names: dict[Labels, int] = {}

    def name(self, labels: Labels) -> None:
        for i in range(len(labels)):
            key = tuple(label.lower() for label in labels[i:])
            at = self._names.get(key)
            if at is not None:
                self.buf += struct.pack("!H", 0xC000 | at)
                return
            if len(self.buf) < 0x4000:
                self._names[key] = len(self.buf)
            self.buf.append(len(labels[i]))
            self.buf += labels[i]
        self.buf.append(0)


def _opt_record() -> bytes:
    # Root name, type OPT, class = our UDP size, extended rcode/version/flags 0, no options.
    return b"\x00" + struct.pack("!HHIH", RType.OPT, MAX_UDP_EDNS, 0, 0)


def build_response(
    query: Query,
    rcode: int,
    answers: tuple[Record, ...] = (),
    *,
    authoritative: bool = True,
    limit: int = MAX_MESSAGE,
) -> bytes:
    """The answer to `query`: its ID, opcode, RD and question echoed, RA set (we forward),
    `answers` after it, an OPT record if the query had one. Longer than `limit`: the
    answers are dropped and TC set (the client retries over TCP)."""
    opt = _opt_record() if query.edns_size is not None else b""
    flags = QR | (query.flags & ((OPCODE_MASK << OPCODE_SHIFT) | RD)) | RA | (rcode & RCODE_MASK)
    if authoritative:
        flags |= AA
    w = _Writer()
    w.buf += HEADER.pack(query.id, flags, 1, len(answers), 0, 1 if opt else 0)
    w.name(query.question.labels)
    w.buf += struct.pack("!HH", query.question.qtype, query.question.qclass)
    for record in answers:
        w.name(record.labels)
        w.buf += struct.pack("!HHI", record.rtype, CLASS_IN, record.ttl)
        if record.rdata_name is not None:
            at = len(w.buf)
            w.buf += b"\x00\x00"
            w.name(record.rdata_name)
            struct.pack_into("!H", w.buf, at, len(w.buf) - at - 2)
        else:
            w.buf += struct.pack("!H", len(record.rdata)) + record.rdata
    w.buf += opt
    if len(w.buf) <= limit:
        return bytes(w.buf)
    truncated = HEADER.pack(query.id, flags | TC, 1, 0, 0, 1 if opt else 0)
    return truncated + query.question_wire + opt


def build_error(data: bytes, rcode: int) -> bytes | None:
    """A bare error answer (no question) to a message we could not parse: its ID and
    opcode echoed. None when there is not even a header to answer (the query is dropped),
    or when the message is itself a response (never answer an answer: no loops)."""
    if len(data) < HEADER_LEN:
        return None
    ident, flags = struct.unpack_from("!HH", data)
    if flags & QR:
        return None
    out_flags = QR | (flags & ((OPCODE_MASK << OPCODE_SHIFT) | RD)) | RA | (rcode & RCODE_MASK)
    return HEADER.pack(ident, out_flags, 0, 0, 0, 0)


def with_id(data: bytes, ident: int) -> bytes:
    """`data` with its message ID replaced (a forwarded query's ID, given back)."""
    return struct.pack("!H", ident) + data[2:]


def build_query(ident: int, labels: Labels, qtype: int, *, rd: bool = True) -> bytes:
    """A one-question query (tests, and a tunnel's own lookups)."""
    w = _Writer()
    w.buf += HEADER.pack(ident, RD if rd else 0, 1, 0, 0, 0)
    w.name(labels)
    w.buf += struct.pack("!HH", qtype, CLASS_IN)
    return bytes(w.buf)
