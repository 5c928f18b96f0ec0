"""A packet capture of the node link read back, and the two questions a chaos event asks of
it. Pure: bytes in, values out (no scapy: a capture of a loaded event holds tens of
thousands of packets, and this reads only what the checks need).

- `plaintext_flows`: the TCP flows whose bytes contain the load's marker. Every pod-to-pod
  byte between nodes travels inside TLS on the HBONE port, so the answer must be empty.
- `bypass_flows`: the TCP flows on the node link where neither side is the HBONE port:
  pod traffic that went around the tunnels (capture missing, or a proxy falling back to
  plain TCP). Nothing else of ours crosses the node link over TCP, so this must be empty.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from localcluster.wire import Segment, reassemble

HBONE_PORT = 15008
_MAGIC = {
    b"\xd4\xc3\xb2\xa1": "<",  # microsecond timestamps, little-endian writer
    b"\xa1\xb2\xc3\xd4": ">",
    b"\x4d\x3c\xb2\xa1": "<",  # nanosecond timestamps
    b"\xa1\xb2\x3c\x4d": ">",
}
LINKTYPE_ETHERNET = 1
LINKTYPE_LINUX_SLL = 113
_ETH_IPV4 = 0x0800
_ETH_VLAN = 0x8100
_TCP = 6

Endpoint = tuple[str, int]
Flow = tuple[Endpoint, Endpoint]


class PcapError(ValueError):
    """The file is not a pcap capture this reader understands."""


@dataclass(frozen=True, slots=True)
class TcpPacket:
    src: Endpoint
    dst: Endpoint
    seq: int
    flags: int
    payload: bytes

    @property
    def flow(self) -> Flow:
        return (self.src, self.dst)


def tcp_packets(data: bytes) -> Iterator[TcpPacket]:
    """Every IPv4 TCP packet of a pcap file, in order. A record cut short at the end (the
    capture was stopped while writing) ends the iteration; anything else malformed in the
    file header raises PcapError, and a malformed packet is skipped."""
    if len(data) < 24:
        raise PcapError(f"a pcap file has a 24-byte header; got {len(data)} bytes")
    order = _MAGIC.get(data[:4])
    if order is None:
        raise PcapError(f"not a pcap file (magic {data[:4].hex()})")
    (linktype,) = struct.unpack(order + "I", data[20:24])
    if linktype not in (LINKTYPE_ETHERNET, LINKTYPE_LINUX_SLL):
        raise PcapError(f"link type {linktype} is not Ethernet or Linux cooked")
    off = 24
    while off + 16 <= len(data):
        incl = struct.unpack(order + "I", data[off + 8 : off + 12])[0]
        frame = data[off + 16 : off + 16 + incl]
        if len(frame) < incl:
            return
        off += 16 + incl
        packet = _tcp(frame, linktype)
        if packet is not None:
            yield packet


def _tcp(frame: bytes, linktype: int) -> TcpPacket | None:
    if linktype == LINKTYPE_ETHERNET:
        if len(frame) < 14:
            return None
        ethertype, off = struct.unpack("!H", frame[12:14])[0], 14
        if ethertype == _ETH_VLAN and len(frame) >= 18:
            ethertype, off = struct.unpack("!H", frame[16:18])[0], 18
    else:
        if len(frame) < 16:
            return None
        ethertype, off = struct.unpack("!H", frame[14:16])[0], 16
    if ethertype != _ETH_IPV4 or len(frame) < off + 20:
        return None
    ihl = (frame[off] & 0x0F) * 4
    total = struct.unpack("!H", frame[off + 2 : off + 4])[0]
    if frame[off] >> 4 != 4 or ihl < 20 or frame[off + 9] != _TCP:
        return None
    src = ".".join(str(b) for b in frame[off + 12 : off + 16])
    dst = ".".join(str(b) for b in frame[off + 16 : off + 20])
    tcp = off + ihl
    end = min(len(frame), off + total) if total else len(frame)
    if end < tcp + 20:
        return None
    sport, dport, seq = struct.unpack("!HHI", frame[tcp : tcp + 8])
    doff = (frame[tcp + 12] >> 4) * 4
    flags = frame[tcp + 13]
    if doff < 20 or tcp + doff > end:
        return None
    return TcpPacket((src, sport), (dst, dport), seq, flags, frame[tcp + doff : end])


def plaintext_flows(packets: Iterable[TcpPacket], marker: bytes) -> list[Flow]:
    """The flows (one direction each) whose bytes contain `marker`: in one packet, or
    across packets once the stream is put back together."""
    packets = list(packets)
    hits = {p.flow for p in packets if marker in p.payload}
    streams = reassemble(Segment(p.src, p.dst, p.seq, p.payload) for p in packets)
    hits |= {flow for flow, data in streams.items() if marker in data}
    return sorted(hits)


def bypass_flows(packets: Iterable[TcpPacket], hbone_port: int = HBONE_PORT) -> list[Flow]:
    """The flows (one direction each) with neither end on the HBONE port."""
    return sorted({p.flow for p in packets if p.src[1] != hbone_port and p.dst[1] != hbone_port})


def hbone_packets(packets: Iterable[TcpPacket], hbone_port: int = HBONE_PORT) -> int:
    """How many packets were HBONE: a capture that saw none saw nothing (wrong link)."""
    return sum(1 for p in packets if hbone_port in (p.src[1], p.dst[1]))
