"""The ZDS codec (zds.messages): the node agent's messages as the tunnel decodes them.

Contract: `decode_*` raise ZdsError and nothing else; what decodes re-encodes and decodes
to the same message.
"""

from __future__ import annotations

from collections.abc import Callable

from zds.messages import (
    Ack,
    AddWorkload,
    DelWorkload,
    KeepWorkload,
    Message,
    SnapshotSent,
    WorkloadInfo,
    WorkloadRequest,
    WorkloadResponse,
    ZdsError,
    ZdsHello,
    decode_hello,
    decode_request,
    decode_response,
    encode,
)

_DECODERS: tuple[Callable[[bytes], Message], ...] = (
    decode_hello,
    decode_request,
    decode_response,
)


def test_one_input(data: bytes) -> None:
    for decode in _DECODERS:
        try:
            msg = decode(data)
        except ZdsError:
            continue
        assert decode(encode(msg)) == msg


def seeds() -> dict[str, bytes]:
    info = WorkloadInfo("productpage-v1-7d4b", "bookinfo", "bookinfo-productpage")
    return {
        "hello": encode(ZdsHello()),
        "add": encode(WorkloadRequest(AddWorkload("9a7f-uid", info))),
        "keep": encode(WorkloadRequest(KeepWorkload("9a7f-uid"))),
        "del": encode(WorkloadRequest(DelWorkload("9a7f-uid"))),
        "snapshot": encode(WorkloadRequest(SnapshotSent())),
        "ack": encode(WorkloadResponse(Ack())),
        "nack": encode(WorkloadResponse(Ack("netns is gone"))),
    }
