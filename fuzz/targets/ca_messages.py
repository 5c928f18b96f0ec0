"""The CA's protobuf messages (meshcore.identity.camessages), decoded as the CA and the
certificate worker do.

Contract: `decode_request`/`decode_response` raise CaMessageError and nothing else; what
decodes re-encodes and decodes to the same message.
"""

from __future__ import annotations

from meshcore.identity.camessages import (
    CaMessageError,
    CertificateRequest,
    CertificateResponse,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)

_PEM = "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUe==\n-----END CERTIFICATE-----\n"


def test_one_input(data: bytes) -> None:
    try:
        request = decode_request(data)
    except CaMessageError:
        pass
    else:
        assert decode_request(encode_request(request)) == request
    try:
        response = decode_response(data)
    except CaMessageError:
        pass
    else:
        assert decode_response(encode_response(response)) == response


def seeds() -> dict[str, bytes]:
    csr = _PEM.replace("CERTIFICATE", "CERTIFICATE REQUEST")
    return {
        "request": encode_request(CertificateRequest(csr, 86400)),
        "request-impersonated": encode_request(
            CertificateRequest(csr, 3600, "spiffe://cluster.local/ns/default/sa/app")
        ),
        "response": encode_response(CertificateResponse((_PEM, _PEM))),
    }
