"""`RequestFacts`: everything an L7 policy may look at, for one request. Pure, frozen.

The proxy builds one per request (`facts_for`) once the JWT (if any) is verified; the
policy decision, the access log and `explain` read the same value.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from meshcore.identity.spiffe import SpiffeId
from meshcore.policy.model import canonical_ip, principal_of
from meshcore.state import IPAddress
from waypoint.authz.paths import path_only
from waypoint.http.message import Request

_NO_CLAIMS: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class RequestFacts:
    # Who sent it: the identity proven on the HBONE connection (None: none proven) and the
    # client's address as the tunnel reports it (`source.ip`, `ipBlocks`).
    source_identity: SpiffeId | None
    source_ip: IPAddress
    # Where it goes: the original destination (the service VIP or pod IP, and port) and the
    # service it belongs to ("name.namespace.svc..." hostname; None for a pod address).
    destination_ip: IPAddress
    destination_port: int
    destination_service: str | None
    method: str
    host: str  # :authority / Host, as sent
    path: str  # without query or fragment
    headers: tuple[tuple[str, str], ...]  # lower-case names, repeats kept
    # The original client (`remote.ip`, `remoteIpBlocks`): X-Forwarded-For as trusted by the
    # proxy; the source address when it trusts none.
    remote_ip: IPAddress | None = None
    sni: str | None = None  # connection.sni: the TLS server name the client asked for
    # From a verified JWT (RequestAuthentication): "iss/sub" and the payload.
    request_principal: str | None = None
    claims: Mapping[str, Any] = field(default_factory=lambda: _NO_CLAIMS)

    @property
    def principal(self) -> str | None:
        """The source principal as policies write it: "td/ns/<ns>/sa/<sa>"."""
        return principal_of(self.source_identity)

    @property
    def client_ip(self) -> IPAddress:
        return canonical_ip(self.source_ip)

    @property
    def original_ip(self) -> IPAddress:
        return canonical_ip(self.remote_ip if self.remote_ip is not None else self.source_ip)

    def header(self, name: str) -> str | None:
        """Every value of `name` joined with ",", as Envoy's header matcher sees repeats."""
        values = [v for k, v in self.headers if k == name]
        return ",".join(values) if values else None


def facts_for(
    request: Request,
    *,
    source_identity: SpiffeId | None,
    source_ip: IPAddress,
    destination_ip: IPAddress,
    destination_port: int,
    destination_service: str | None = None,
    remote_ip: IPAddress | None = None,
    sni: str | None = None,
    request_principal: str | None = None,
    claims: Mapping[str, Any] | None = None,
) -> RequestFacts:
    """The facts of `request` as it arrived (before routing rewrites it)."""
    return RequestFacts(
        source_identity=source_identity,
        source_ip=source_ip,
        destination_ip=destination_ip,
        destination_port=destination_port,
        destination_service=destination_service,
        method=request.method,
        host=request.authority,
        path=path_only(request.path),
        headers=tuple(request.headers),
        remote_ip=remote_ip,
        sni=sni,
        request_principal=request_principal,
        claims=MappingProxyType(dict(claims)) if claims else _NO_CLAIMS,
    )
