"""The server's per-stream bookkeeping, as a table of request -> responses (pure)."""

from __future__ import annotations

from controlplane.xds.session import DeltaSession
from meshcore.xds import messages as m

T = m.ADDRESS_TYPE


def snap(**named: str) -> dict[str, dict[str, tuple[str, bytes]]]:
    return {T: {name: (version, version.encode()) for name, version in named.items()}}


def sent(
    session: DeltaSession, snapshot: dict[str, dict[str, tuple[str, bytes]]]
) -> list[tuple[list[str], list[str]]]:
    return [
        ([r.name for r in resp.resources], list(resp.removed_resources))
        for resp in session.responses(snapshot, "1")
    ]


def test_explicit_names_then_unsubscribe() -> None:
    s = DeltaSession(frozenset({T}))
    s.on_request(m.DeltaDiscoveryRequest(type_url=T, resource_names_subscribe=("a",)))
    assert sent(s, snap(a="1", b="1")) == [(["a"], [])]
    s.on_request(m.DeltaDiscoveryRequest(type_url=T, resource_names_subscribe=("b",)))
    assert sent(s, snap(a="1", b="1")) == [(["b"], [])]
    s.on_request(m.DeltaDiscoveryRequest(type_url=T, resource_names_unsubscribe=("a",)))
    assert sent(s, snap(a="2", b="1")) == []  # a changed, but nobody asks for it any more
    assert sent(s, snap(a="2")) == [([], ["b"])]


def test_wildcard_resume_and_nack_rollback() -> None:
    s = DeltaSession(frozenset({T}))
    s.on_request(
        m.DeltaDiscoveryRequest(
            type_url=T,
            resource_names_subscribe=("*",),
            initial_resource_versions=(m.VersionEntry("a", "1"), m.VersionEntry("gone", "1")),
        )
    )
    assert sent(s, snap(a="1", b="1")) == [(["b"], ["gone"])]
    # The next change is refused: the client still has a=1; not resent as such, but a newer
    # version of a is.
    first = s.responses(snap(a="2", b="1"), "2")
    assert [r.name for r in first[0].resources] == ["a"]
    nack = s.on_request(
        m.DeltaDiscoveryRequest(
            type_url=T, response_nonce=first[0].nonce, error_detail=m.Status(3, "no")
        )
    )
    assert nack is not None and nack.message == "no"
    assert sent(s, snap(a="2", b="1")) == []
    assert sent(s, snap(a="3", b="1")) == [(["a"], [])]
