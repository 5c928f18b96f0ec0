"""The CA service's two messages (meshcore/identity/proto/ca.proto) and their protobuf codec.

Written out by hand, as zds/messages.py is: two messages and one map entry of a
`google.protobuf.Struct` do not justify generated code, and a strict codec turns every
malformation into one `CaMessageError` saying what was wrong. Both ends use it: the CA
server decodes requests and encodes responses, the certificate worker the other way.

The encoding is protobuf's own, byte for byte (tests check it against the runtime):
proto3 implicit presence (empty strings and zero are not written), `metadata` written only
when there is an impersonated identity, as a Struct with the one entry
`"ImpersonatedIdentity": Value{string_value}`.

Decoding follows protobuf's rules (unknown fields skipped, the last value of a scalar wins,
a map's last entry for a key wins, within `Value`'s oneof the last member wins) and is
strict where leniency would hide a bug: a known field with the wrong wire type, truncated
varints or lengths, field number 0, invalid UTF-8, an input over the size limit, and an
`ImpersonatedIdentity` that is not a string are errors.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

IMPERSONATED_IDENTITY = "ImpersonatedIdentity"
# A CSR is about 500 bytes; anything near this is not a certificate request.
MAX_REQUEST_SIZE = 64 * 1024
# A chain is a few KB; this only bounds a broken or hostile server.
MAX_RESPONSE_SIZE = 1024 * 1024
_VARINT, _I64, _LEN, _SGROUP, _EGROUP, _I32 = 0, 1, 2, 3, 4, 5
_MAX_DEPTH = 64  # nested groups in unknown fields


class CaMessageError(ValueError):
    """A CA request or response is malformed; the text says how."""


@dataclass(frozen=True, slots=True)
class CertificateRequest:
    """istio.v1.auth.IstioCertificateRequest."""

    csr: str
    validity_duration: int = 0  # seconds; int64 on the wire
    impersonated_identity: str = ""  # metadata["ImpersonatedIdentity"]; empty: none


@dataclass(frozen=True, slots=True)
class CertificateResponse:
    """istio.v1.auth.IstioCertificateResponse."""

    cert_chain: tuple[str, ...]


# ---- encoding ----------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64: ten bytes, as protobuf writes them
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _len_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | _LEN) + _varint(len(payload)) + payload


def _text(value: str, what: str) -> bytes:
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise CaMessageError(f"{what} is not valid text: {e}") from None


def encode_request(req: CertificateRequest) -> bytes:
    if not -(2**63) <= req.validity_duration < 2**63:
        raise CaMessageError(f"validity_duration {req.validity_duration} is not an int64")
    out = bytearray()
    if req.csr:
        out += _len_field(1, _text(req.csr, "csr"))
    if req.validity_duration:
        out += _varint(2 << 3 | _VARINT) + _varint(req.validity_duration)
    if req.impersonated_identity:
        value = _len_field(3, _text(req.impersonated_identity, IMPERSONATED_IDENTITY))
        entry = _len_field(1, IMPERSONATED_IDENTITY.encode()) + _len_field(2, value)
        out += _len_field(3, _len_field(1, entry))
    if len(out) > MAX_REQUEST_SIZE:
        raise CaMessageError(f"request is {len(out)} bytes, over {MAX_REQUEST_SIZE}")
    return bytes(out)


def encode_response(resp: CertificateResponse) -> bytes:
    out = bytearray()
    for pem in resp.cert_chain:
        # repeated: every element is written, an empty one too
        out += _len_field(1, _text(pem, "cert_chain"))
    return bytes(out)


# ---- decoding ----------------------------------------------------------------------------


def _read_varint(buf: bytes, pos: int, end: int, what: str) -> tuple[int, int]:
    result = 0
    for i in range(10):
        if pos >= end:
            raise CaMessageError(f"truncated varint ({what}) at byte {pos}")
        b = buf[pos]
        pos += 1
        if i == 9 and b > 1:
            raise CaMessageError(f"varint ({what}) overflows 64 bits at byte {pos - 1}")
        result |= (b & 0x7F) << (7 * i)
        if not b & 0x80:
            return result, pos
    raise CaMessageError(f"varint ({what}) longer than 10 bytes")  # pragma: no cover


def _fields(buf: bytes, pos: int, end: int, depth: int = 0) -> Iterator[tuple[int, int, Any]]:
    """Yield (number, wire type, value) for each field in buf[pos:end]: an int for a varint,
    a (start, end) slice for a length-delimited field; other wire types are skipped."""
    while pos < end:
        start = pos
        tag, pos = _read_varint(buf, pos, end, "field tag")
        number, wire_type = tag >> 3, tag & 7
        if number == 0 or tag > 0xFFFFFFFF:
            raise CaMessageError(f"invalid field tag at byte {start}")
        if wire_type == _VARINT:
            value, pos = _read_varint(buf, pos, end, f"field {number}")
            yield number, wire_type, value
        elif wire_type == _LEN:
            length, pos = _read_varint(buf, pos, end, f"length of field {number}")
            if length > end - pos:
                raise CaMessageError(
                    f"truncated field {number}: {length} bytes declared, {end - pos} left"
                )
            yield number, wire_type, (pos, pos + length)
            pos += length
        elif wire_type in (_I64, _I32):
            size = 8 if wire_type == _I64 else 4
            if end - pos < size:
                raise CaMessageError(f"truncated field {number}: {size} bytes needed")
            yield number, wire_type, None
            pos += size
        elif wire_type == _SGROUP:
            pos = _skip_group(buf, pos, end, number, depth)
            yield number, wire_type, None
        else:
            raise CaMessageError(f"invalid wire type {wire_type} for field {number}")


def _skip_group(buf: bytes, pos: int, end: int, number: int, depth: int) -> int:
    if depth >= _MAX_DEPTH:
        raise CaMessageError(f"groups nested deeper than {_MAX_DEPTH}")
    while pos < end:
        tag, pos = _read_varint(buf, pos, end, "field tag")
        inner, wire_type = tag >> 3, tag & 7
        if wire_type == _EGROUP:
            if inner != number:
                raise CaMessageError(f"group {number} closed as group {inner}")
            return pos
        if inner == 0:
            raise CaMessageError("field number 0 inside a group")
        if wire_type == _VARINT:
            pos = _read_varint(buf, pos, end, f"field {inner}")[1]
        elif wire_type == _LEN:
            length, pos = _read_varint(buf, pos, end, f"length of field {inner}")
            if length > end - pos:
                raise CaMessageError(f"truncated field {inner} inside group {number}")
            pos += length
        elif wire_type in (_I64, _I32):
            pos += 8 if wire_type == _I64 else 4
            if pos > end:
                raise CaMessageError(f"truncated field {inner} inside group {number}")
        elif wire_type == _SGROUP:
            pos = _skip_group(buf, pos, end, inner, depth + 1)
        else:
            raise CaMessageError(f"invalid wire type {wire_type} inside group {number}")
    raise CaMessageError(f"group {number} is not closed")


def _expect(number: int, wire_type: int, wanted: int, what: str) -> None:
    if wire_type != wanted:
        raise CaMessageError(f"{what} (field {number}) has wire type {wire_type}, not {wanted}")


def _utf8(buf: bytes, span: tuple[int, int], what: str) -> str:
    try:
        return buf[span[0] : span[1]].decode("utf-8")
    except UnicodeDecodeError as e:
        raise CaMessageError(f"{what} is not valid UTF-8: {e.reason}") from None


def decode_request(raw: bytes) -> CertificateRequest:
    if len(raw) > MAX_REQUEST_SIZE:
        raise CaMessageError(f"request is {len(raw)} bytes, over {MAX_REQUEST_SIZE}")
    csr, validity, impersonated = "", 0, ""
    for number, wire_type, value in _fields(raw, 0, len(raw)):
        if number == 1:
            _expect(number, wire_type, _LEN, "csr")
            csr = _utf8(raw, value, "csr")
        elif number == 2:
            _expect(number, wire_type, _VARINT, "validity_duration")
            validity = value - (1 << 64) if value >= 1 << 63 else value
        elif number == 3:
            _expect(number, wire_type, _LEN, "metadata")
            # A repeated message field merges: entries of a later one override earlier ones.
            impersonated = _struct_impersonated(raw, value, impersonated)
    return CertificateRequest(csr, validity, impersonated)


def _struct_impersonated(buf: bytes, span: tuple[int, int], current: str) -> str:
    """The ImpersonatedIdentity string of a Struct (or `current` if it has none)."""
    for number, wire_type, entry in _fields(buf, span[0], span[1]):
        if number != 1:
            continue
        _expect(number, wire_type, _LEN, "metadata.fields")
        key, kind, text = "", 0, ""
        for n, wt, v in _fields(buf, entry[0], entry[1]):
            if n == 1:
                _expect(n, wt, _LEN, "metadata.fields key")
                key = _utf8(buf, v, "metadata key")
            elif n == 2:
                _expect(n, wt, _LEN, "metadata.fields value")
                # google.protobuf.Value: a oneof, the last member seen wins.
                for vn, vwt, vv in _fields(buf, v[0], v[1]):
                    if 1 <= vn <= 6:
                        kind = vn
                    if vn == 3:
                        _expect(vn, vwt, _LEN, "metadata string_value")
                        text = _utf8(buf, vv, "metadata string_value")
        if key != IMPERSONATED_IDENTITY:
            continue
        if kind != 3:
            raise CaMessageError(f"metadata {IMPERSONATED_IDENTITY} must be a string value")
        current = text
    return current


def decode_response(raw: bytes) -> CertificateResponse:
    if len(raw) > MAX_RESPONSE_SIZE:
        raise CaMessageError(f"response is {len(raw)} bytes, over {MAX_RESPONSE_SIZE}")
    chain: list[str] = []
    for number, wire_type, value in _fields(raw, 0, len(raw)):
        if number == 1:
            _expect(number, wire_type, _LEN, "cert_chain")
            chain.append(_utf8(raw, value, "cert_chain"))
    return CertificateResponse(tuple(chain))


__all__ = [
    "IMPERSONATED_IDENTITY",
    "CaMessageError",
    "CertificateRequest",
    "CertificateResponse",
    "decode_request",
    "decode_response",
    "encode_request",
    "encode_response",
]
