"""The client's delta-ADS state machine. Pure: responses in, requests and MeshStates out.

The client holds, per resource type, every resource it accepted (name -> version and the
decoded MeshState entry). A response is applied to a copy of its type's map; the new map is
kept only if every resource in it decodes and the MeshState built from all maps is valid.
Then it is ACKed; otherwise it is NACKed with `error_detail` naming what failed, and the last
good maps stay (the whole response is refused, so a state never mixes two snapshots'
halves). A state is published only once every subscribed type has had its first response:
a tunnel must never run with workloads but no policies yet (that would allow too much).

On reconnect, `initial_requests` names what the client holds in `initial_resource_versions`,
so the server sends only the difference.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from meshcore.state import MeshConfigError, MeshState
from meshcore.xds import convert
from meshcore.xds import messages as m

INVALID_ARGUMENT = 3  # google.rpc.Code


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one response led to: the ACK or NACK to send, and a new state if one is ready."""

    reply: m.DeltaDiscoveryRequest
    state: MeshState | None
    error: str | None = None  # why the response was refused (the NACK's message)


class DeltaClient:
    def __init__(self, types: Iterable[str], node: m.Node) -> None:
        self.types = tuple(types)
        self.node = node
        self._held: dict[str, dict[str, tuple[str, convert.Decoded]]] = {t: {} for t in self.types}
        self._answered: set[str] = set()
        self.last_error: str | None = None
        self.system_version = ""

    @property
    def ready(self) -> bool:
        return self._answered.issuperset(self.types)

    def versions(self) -> dict[str, dict[str, str]]:
        return {t: {n: v for n, (v, _) in held.items()} for t, held in self._held.items()}

    def initial_requests(self) -> list[m.DeltaDiscoveryRequest]:
        """The first request of each type on a (new) stream: a wildcard subscription, and the
        versions held, so a resumed stream gets only what changed."""
        # The answered set is per stream: a resumed stream must answer every type again.
        self._answered.clear()
        out = []
        for i, t in enumerate(self.types):
            out.append(
                m.DeltaDiscoveryRequest(
                    node=self.node if i == 0 else None,
                    type_url=t,
                    resource_names_subscribe=(),
                    initial_resource_versions=tuple(
                        m.VersionEntry(n, v) for n, (v, _) in sorted(self._held[t].items())
                    ),
                )
            )
        return out

    def on_response(self, resp: m.DeltaDiscoveryResponse) -> Outcome:
        t = resp.type_url
        if t not in self._held:
            return self._nack(resp, f"not subscribed to resource type {t!r}")
        updated = dict(self._held[t])
        try:
            for res in resp.resources:
                if res.resource is None:
                    raise convert.ResourceError(f"{res.name}: resource without a body")
                if res.resource.type_url != t:
                    raise convert.ResourceError(
                        f"{res.name}: a {res.resource.type_url} in a {t} response"
                    )
                item = convert.decode_resource(t, res.name, res.resource.value)
                updated[res.name] = (res.version, item)
            for name in resp.removed_resources:
                updated.pop(name, None)
            held = {**self._held, t: updated}
            state = convert.build_state(
                item for named in held.values() for _, item in named.values()
            )
        except (convert.ResourceError, MeshConfigError) as exc:
            return self._nack(resp, str(exc))
        self._held = held
        self._answered.add(t)
        self.last_error = None
        self.system_version = resp.system_version_info
        ack = m.DeltaDiscoveryRequest(type_url=t, response_nonce=resp.nonce)
        return Outcome(ack, state if self.ready else None)

    def _nack(self, resp: m.DeltaDiscoveryResponse, error: str) -> Outcome:
        self.last_error = error
        # A refused first response leaves its type unanswered: no state is published
        # without it (fail closed) until the server sends one that is good.
        nack = m.DeltaDiscoveryRequest(
            type_url=resp.type_url,
            response_nonce=resp.nonce,
            error_detail=m.Status(INVALID_ARGUMENT, error),
        )
        return Outcome(nack, None, error)
