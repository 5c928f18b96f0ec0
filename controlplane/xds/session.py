"""One delta-ADS stream's bookkeeping on the server. Pure: requests in, responses out.

Per resource type the session holds what the client subscribed to (wildcard and/or names)
and the version of every resource it believes the client has (`known`: from what was sent,
or from the client's `initial_resource_versions` when it resumes). A response carries
exactly the difference between the current snapshot and `known`: changed or new resources,
and the names that are gone. So a slow client that missed several snapshots gets one
response with the net change (coalesced), and a reconnecting client gets only what changed
while it was away.

ACK and NACK: a request with `response_nonce` answers one response; with `error_detail` it
is a NACK, and the client kept its last good resources. So the server puts back what it
believed the client had before that response, and remembers the refused change: the same
change is not sent again (that would loop), but any other difference, such as a newer
snapshot that fixes or replaces the bad resource, is. The NACK is returned to the caller to
log and keep.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from meshcore.xds import messages as m

WILDCARD = "*"
MAX_PENDING = 64  # unanswered responses remembered per type

# type URL -> resource name -> (version, encoded message)
Snapshot = Mapping[str, Mapping[str, tuple[str, bytes]]]


class ProtocolError(ValueError):
    """A request that breaks the protocol; the stream is closed with this message."""


@dataclass(frozen=True, slots=True)
class Nack:
    node: str
    type_url: str
    nonce: str
    code: int
    message: str


@dataclass(slots=True)
class _Subscription:
    wildcard: bool = False
    names: set[str] = field(default_factory=set)
    known: dict[str, str] = field(default_factory=dict)
    answered: bool = False  # the first response (even an empty one) went out
    # nonce -> what `known` held, before that response, for each name it touched
    pending: dict[str, dict[str, str | None]] = field(default_factory=dict)
    refused: frozenset[tuple[str, str]] | None = None  # the last NACKed change

    def wants(self, name: str) -> bool:
        return self.wildcard or name in self.names


class DeltaSession:
    """The server's side of one stream; `types` are the resource types it serves."""

    def __init__(self, types: frozenset[str]) -> None:
        self._types = types
        self._subs: dict[str, _Subscription] = {}
        self._nonce = 0
        self.node = ""

    @property
    def subscribed_types(self) -> tuple[str, ...]:
        return tuple(self._subs)

    def on_request(self, req: m.DeltaDiscoveryRequest) -> Nack | None:
        """Apply one request; a NACK is returned for the caller to report."""
        if req.node is not None and req.node.id:
            self.node = req.node.id
        if req.type_url not in self._types:
            raise ProtocolError(f"unknown resource type {req.type_url!r}")
        sub = self._subs.get(req.type_url)
        if sub is None:
            sub = self._subs[req.type_url] = _Subscription()
            # The legacy wildcard: a first request naming nothing subscribes to everything.
            if not req.resource_names_subscribe:
                sub.wildcard = True
            for entry in req.initial_resource_versions:
                sub.known[entry.key] = entry.value
        elif req.initial_resource_versions:
            raise ProtocolError("initial_resource_versions is only for a type's first request")
        for name in req.resource_names_subscribe:
            if name == WILDCARD:
                sub.wildcard = True
            else:
                sub.names.add(name)
        for name in req.resource_names_unsubscribe:
            if name == WILDCARD:
                sub.wildcard = False
            else:
                sub.names.discard(name)
                if not sub.wildcard:
                    sub.known.pop(name, None)
        if not req.response_nonce:
            return None
        before = sub.pending.pop(req.response_nonce, None)
        if req.error_detail is None:
            return None
        if before is not None:
            refused = {(n, sub.known.get(n, "")) for n in before}
            for name, version in before.items():
                if version is None:
                    sub.known.pop(name, None)
                else:
                    sub.known[name] = version
            sub.refused = frozenset(refused)
        return Nack(
            self.node,
            req.type_url,
            req.response_nonce,
            req.error_detail.code,
            req.error_detail.message,
        )

    def responses(self, snapshot: Snapshot, system_version: str) -> list[m.DeltaDiscoveryResponse]:
        """What the client lacks of `snapshot`, one response per type that has a change
        (and a first, possibly empty, response for a newly subscribed type)."""
        out: list[m.DeltaDiscoveryResponse] = []
        for type_url, sub in self._subs.items():
            current = snapshot.get(type_url, {})
            changed = [
                (name, version, body)
                for name, (version, body) in current.items()
                if sub.wants(name) and sub.known.get(name) != version
            ]
            removed = sorted(
                name for name in sub.known if name not in current or not sub.wants(name)
            )
            if not changed and not removed and sub.answered:
                continue
            change = frozenset({(n, v) for n, v, _ in changed} | {(n, "") for n in removed})
            if change == sub.refused:
                continue  # exactly what the client refused last time
            self._nonce += 1
            before: dict[str, str | None] = {}
            resources: list[m.Resource] = []
            for name, version, body in changed:
                before[name] = sub.known.get(name)
                sub.known[name] = version
                resources.append(m.Resource(name, (), version, m.Any_(type_url, body)))
            for name in removed:
                before[name] = sub.known.pop(name)
            sub.pending[str(self._nonce)] = before
            if len(sub.pending) > MAX_PENDING:  # a client that never answers: forget the oldest
                del sub.pending[next(iter(sub.pending))]
            sub.answered = True
            out.append(
                m.DeltaDiscoveryResponse(
                    system_version_info=system_version,
                    resources=tuple(resources),
                    type_url=type_url,
                    removed_resources=tuple(removed),
                    nonce=str(self._nonce),
                )
            )
        return out
