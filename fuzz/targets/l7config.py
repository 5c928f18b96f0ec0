"""The waypoint's L7 configuration (waypoint.l7config): routes, authorization policies and
RequestAuthentications derived from a mesh config.

Contract: beyond the mesh config's own MeshConfigError, `L7Config.build` and
`for_destination` never raise: a resource that does not parse keeps a status or fails
closed.
"""

from __future__ import annotations

import yaml

from fuzz.targets import samples
from meshcore.discovery import parse_local_config
from meshcore.state import MeshConfigError
from waypoint.l7config import L7Config

_AUTHN = {
    "apiVersion": "security.istio.io/v1",
    "kind": "RequestAuthentication",
    "metadata": {"name": "jwt", "namespace": "travel"},
    "spec": {
        "targetRefs": [{"kind": "Service", "group": "", "name": "flights"}],
        "jwtRules": [{"issuer": "https://issuer.example", "jwks": '{"keys": []}'}],
    },
}


def test_one_input(data: bytes) -> None:
    try:
        state = parse_local_config(data.decode("utf-8", "replace"))
    except MeshConfigError:
        return
    config = L7Config.build(state, "travel", "waypoint")
    config.for_destination(None)
    for service in state.services:
        config.for_destination(service)


def seeds() -> dict[str, bytes]:
    return {
        "config": samples.text(samples.config()),
        "config-authn": samples.text(
            samples.config(policies=[*samples.POLICIES, *samples.ROUTES, _AUTHN])
        ),
        "config-yaml": yaml.safe_dump(samples.config()).encode(),
    }
