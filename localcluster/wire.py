"""What crossed the wire: TCP streams rebuilt from a packet capture and read as TLS.

Pure functions over captured packets (scapy is imported by the caller that reads the
pcap). Used by the demo and the tests to show that node-to-node traffic is TLS only.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

TLS_CONTENT_TYPES = {20: "change_cipher_spec", 21: "alert", 22: "handshake", 23: "application_data"}


class NotTLS(ValueError):
    """A byte stream that is not a sequence of TLS records."""


@dataclass(frozen=True, slots=True)
class Segment:
    src: tuple[str, int]
    dst: tuple[str, int]
    seq: int
    payload: bytes


def reassemble(segments: Iterable[Segment]) -> dict[tuple[tuple[str, int], tuple[str, int]], bytes]:
    """Each direction's byte stream, in sequence order, retransmissions dropped."""
    flows: dict[tuple[tuple[str, int], tuple[str, int]], dict[int, bytes]] = {}
    for s in segments:
        if s.payload:
            flows.setdefault((s.src, s.dst), {}).setdefault(s.seq, s.payload)
    out = {}
    for key, by_seq in flows.items():
        data = bytearray()
        expected: int | None = None
        for seq in sorted(by_seq):
            chunk = by_seq[seq]
            if expected is not None and seq < expected:
                chunk = chunk[expected - seq :]
            data += chunk
            expected = (
                seq + len(by_seq[seq])
                if expected is None
                else max(expected, seq + len(by_seq[seq]))
            )
        out[key] = bytes(data)
    return out


@dataclass(frozen=True, slots=True)
class Record:
    content_type: int
    version: int
    body: bytes


def tls_records(stream: bytes, allow_truncated_tail: bool = True) -> list[Record]:
    """Split a stream into TLS records; raise NotTLS at the first byte that is not one."""
    records = []
    off = 0
    while off < len(stream):
        if len(stream) - off < 5:
            if allow_truncated_tail:
                break
            raise NotTLS(f"truncated record header at offset {off}")
        ctype, major, minor = stream[off], stream[off + 1], stream[off + 2]
        length = int.from_bytes(stream[off + 3 : off + 5], "big")
        if ctype not in TLS_CONTENT_TYPES or major != 3 or minor > 4 or length > 2**14 + 256:
            raise NotTLS(
                f"bytes at offset {off} are not a TLS record header: {stream[off : off + 5].hex()}"
            )
        body = stream[off + 5 : off + 5 + length]
        records.append(Record(ctype, (major << 8) | minor, body))
        off += 5 + length
    return records


def negotiated_version(server_records: list[Record]) -> int | None:
    """The version a ServerHello chose: its supported_versions extension for TLS 1.3."""
    for r in server_records:
        if r.content_type != 22 or not r.body or r.body[0] != 2:  # handshake, ServerHello
            continue
        b = r.body
        version = int.from_bytes(b[4:6], "big")
        off = 4 + 2 + 32
        sid_len = b[off]
        off += 1 + sid_len + 2 + 1  # session id, cipher suite, compression
        ext_total = int.from_bytes(b[off : off + 2], "big")
        off += 2
        end = min(len(b), off + ext_total)
        while off + 4 <= end:
            etype = int.from_bytes(b[off : off + 2], "big")
            elen = int.from_bytes(b[off + 2 : off + 4], "big")
            if etype == 0x002B and elen == 2:
                return int.from_bytes(b[off + 4 : off + 6], "big")
            off += 4 + elen
        return version
    return None


def read_pcap(path: str) -> list[Segment]:
    # scapy is a test/demo dependency, imported on use; its star-exports are untyped.
    from scapy.layers.inet import IP, TCP
    from scapy.utils import rdpcap

    segs = []
    for pkt in rdpcap(path):
        if IP in pkt and TCP in pkt:
            ip, tcp = pkt[IP], pkt[TCP]
            segs.append(
                Segment(
                    (ip.src, int(tcp.sport)),
                    (ip.dst, int(tcp.dport)),
                    int(tcp.seq),
                    bytes(tcp.payload),
                )
            )
    return segs
