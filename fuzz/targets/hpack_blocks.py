"""HBONE header blocks read on the fast path (meshcore.hbone.hpacklit.decode_plain), against
the hpack library's decoder as the reference.

Contract: `decode_plain` raises nothing; a block it reads, a fresh hpack decoder reads to
the same headers without touching its dynamic table (so skipping that decoder for the block
loses no state); an ASCII list it returns, `encode` writes back to a block it reads alike.
"""

from __future__ import annotations

import hpack

from meshcore.hbone import hpacklit

_LIMIT = 64 * 1024


def test_one_input(data: bytes) -> None:
    got = hpacklit.decode_plain(data, _LIMIT)
    if got is None:
        return
    ref = hpack.Decoder()
    ref.max_header_list_size = _LIMIT
    expected = [
        (bytes(k).decode("latin-1"), bytes(v).decode("latin-1"))
        for k, v in ref.decode(data, raw=True)
    ]
    assert got == expected, (got, expected)
    assert not ref.header_table.dynamic_entries
    if all(k.isascii() and v.isascii() for k, v in got):
        assert hpacklit.decode_plain(hpacklit.encode(got), _LIMIT) == got


def seeds() -> dict[str, bytes]:
    connect = [
        (":method", "CONNECT"),
        (":authority", "10.244.2.10:8080"),
        ("baggage", "k8s.cluster.name=Kubernetes,k8s.namespace.name=mesh,service.name=client"),
        ("forwarded", 'for="10.244.1.10:45678";host=server.mesh.svc.cluster.local'),
        ("traceparent", "00-" + "ab" * 16 + "-" + "cd" * 8 + "-00"),
    ]
    return {
        "connect": hpacklit.encode(connect),
        "answer-200": hpacklit.encode([(":status", "200")]),
        "answer-503-after-size-update": hpacklit.encode([(":status", "503")], 0),
        "long-value": hpacklit.encode([("x-long", "v" * 300)]),
    }
