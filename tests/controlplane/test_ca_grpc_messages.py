"""The CA service's hand-written codec against protoc's code in the real protobuf runtime."""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshcore.identity import camessages as m
from tests.controlplane.ca_grpc_pb import compiled


@pytest.fixture(scope="module")
def pb(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    return compiled(Path(tmp_path_factory.mktemp("ca_pb")))[0]


def _theirs(pb: ModuleType, req: m.CertificateRequest) -> bytes:
    out = pb.IstioCertificateRequest(csr=req.csr, validity_duration=req.validity_duration)
    if req.impersonated_identity:
        out.metadata.fields[m.IMPERSONATED_IDENTITY].string_value = req.impersonated_identity
    return bytes(out.SerializeToString(deterministic=True))


texts = st.text(max_size=40)


@settings(max_examples=200, deadline=None)
@given(csr=texts, ttl=st.integers(-(2**63), 2**63 - 1), who=texts)
def test_request_encoding_is_protobufs_byte_for_byte(pb: ModuleType, csr, ttl, who) -> None:
    ours = m.CertificateRequest(csr, ttl, who)
    raw = m.encode_request(ours)
    assert raw == _theirs(pb, ours)
    assert m.decode_request(raw) == ours


@settings(max_examples=100, deadline=None)
@given(chain=st.lists(texts, max_size=4))
def test_response_round_trips_through_the_runtime(pb: ModuleType, chain) -> None:
    raw = m.encode_response(m.CertificateResponse(tuple(chain)))
    theirs = pb.IstioCertificateResponse.FromString(raw)
    assert list(theirs.cert_chain) == chain
    assert m.decode_response(theirs.SerializeToString()).cert_chain == tuple(chain)


def test_metadata_other_keys_are_ignored_and_the_last_entry_wins(pb: ModuleType) -> None:
    req = pb.IstioCertificateRequest(csr="x")
    req.metadata.fields["CertSigner"].string_value = "other"
    req.metadata.fields["Flag"].bool_value = True
    req.metadata.fields[m.IMPERSONATED_IDENTITY].string_value = "spiffe://a/ns/b/sa/c"
    got = m.decode_request(req.SerializeToString())
    assert got.impersonated_identity == "spiffe://a/ns/b/sa/c"
    # Two metadata fields on the wire merge; the later entry for the key wins.
    later = pb.IstioCertificateRequest()
    later.metadata.fields[m.IMPERSONATED_IDENTITY].string_value = "spiffe://a/ns/b/sa/d"
    assert (
        m.decode_request(req.SerializeToString() + later.SerializeToString()).impersonated_identity
        == "spiffe://a/ns/b/sa/d"
    )


def test_impersonated_identity_that_is_not_a_string_is_refused(pb: ModuleType) -> None:
    req = pb.IstioCertificateRequest(csr="x")
    req.metadata.fields[m.IMPERSONATED_IDENTITY].number_value = 3
    with pytest.raises(m.CaMessageError, match="must be a string"):
        m.decode_request(req.SerializeToString())


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b"\x0a\x05ab", "truncated field 1"),
        (b"\x10\xff\xff\xff\xff\xff\xff\xff\xff\xff\x7f", "overflows 64 bits"),
        (b"\x10", "truncated varint"),
        (b"\x08\x01", "csr \\(field 1\\) has wire type 0"),
        (b"\x12\x00", "validity_duration \\(field 2\\) has wire type 2"),
        (b"\x0a\x02\xff\xfe", "not valid UTF-8"),
        (b"\x00", "invalid field tag"),
        (b"\x1a\x03\x0a\x01\x0a", "truncated"),
        (b"\x0f", "invalid wire type 7"),
        (b"\x0b\x08\x01", "not closed"),
        (b"\x0a" + b"\x80\x80\x04" + b"a" * 65536, "over 65536"),
    ],
)
def test_malformed_requests_are_errors_that_say_why(raw: bytes, words: str) -> None:
    with pytest.raises(m.CaMessageError, match=words):
        m.decode_request(raw)


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=64))
def test_no_input_escapes_as_another_exception(raw: bytes) -> None:
    for decode in (m.decode_request, m.decode_response):
        with contextlib.suppress(m.CaMessageError):
            decode(raw)


def test_unknown_fields_of_every_wire_type_are_skipped() -> None:
    raw = b"\x28\x05" + b"\x31" + b"\x00" * 8 + b"\x3d" + b"\x00" * 4 + b"\x43\x08\x01\x44"
    assert m.decode_request(raw + b"\x0a\x01x") == m.CertificateRequest("x")
