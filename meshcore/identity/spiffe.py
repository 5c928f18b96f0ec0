"""SPIFFE identities.

An identity is a parsed value, never a bare string:
`spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
"""

from __future__ import annotations

from dataclasses import dataclass

_PREFIX = "spiffe://"


class IdentityError(ValueError):
    """A string that is not a SPIFFE identity of the form this mesh issues."""


@dataclass(frozen=True, slots=True, order=True)
class SpiffeId:
    trust_domain: str
    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        for part in (self.trust_domain, self.namespace, self.service_account):
            if not part or "/" in part:
                raise IdentityError(f"invalid SPIFFE identity component {part!r}")

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        if not uri.startswith(_PREFIX):
            raise IdentityError(f"not a SPIFFE URI: {uri!r}")
        parts = uri[len(_PREFIX) :].split("/")
        if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa":
            raise IdentityError(
                f"SPIFFE URI {uri!r} is not of the form spiffe://<td>/ns/<ns>/sa/<sa>"
            )
        return cls(parts[0], parts[2], parts[4])

    def __str__(self) -> str:
        return f"{_PREFIX}{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"
