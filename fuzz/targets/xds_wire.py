"""The xDS wire decoders (meshcore.xds.wire, meshcore.xds.messages) and the resource
conversion after them (meshcore.xds.convert): a control plane's push as the tunnel and the
waypoint read it, and a client's request as the control plane reads it.

Contract: `decode` raises WireError and nothing else; `decode_resource` raises
ResourceError and nothing else; what decodes re-encodes and decodes to the same message.
"""

from __future__ import annotations

import contextlib
import json

from fuzz.targets import samples
from meshcore.discovery import parse_local_config
from meshcore.xds import convert
from meshcore.xds import messages as m
from meshcore.xds.convert import ResourceError
from meshcore.xds.wire import WireError


def test_one_input(data: bytes) -> None:
    try:
        response = m.decode(m.DeltaDiscoveryResponse, data)
    except WireError:
        pass
    else:
        assert m.decode(m.DeltaDiscoveryResponse, m.encode(response)) == response
        for res in response.resources:
            if res.resource is None:
                continue
            with contextlib.suppress(ResourceError):
                convert.decode_resource(res.resource.type_url, res.name, res.resource.value)
    try:
        request = m.decode(m.DeltaDiscoveryRequest, data)
    except WireError:
        pass
    else:
        assert m.decode(m.DeltaDiscoveryRequest, m.encode(request)) == request


def seeds() -> dict[str, bytes]:
    state = parse_local_config(json.dumps(samples.config()))
    out: dict[str, bytes] = {}
    for type_url, bodies in convert.resources_of(state).items():
        resources = tuple(
            m.Resource(name, (), "v1", m.Any_(type_url, body)) for name, body in bodies.items()
        )
        push = m.DeltaDiscoveryResponse("v1", resources, type_url, ("gone",), "1")
        out[f"push-{type_url.rsplit('.', 1)[-1]}"] = m.encode(push)
    subscribe = m.DeltaDiscoveryRequest(
        node=m.Node("ztunnel~10.0.0.1~node1", "travel"),
        type_url=m.ADDRESS_TYPE,
        resource_names_subscribe=("*",),
        initial_resource_versions=(m.VersionEntry("travel/frontend", "v1"),),
        response_nonce="1",
    )
    out["subscribe"] = m.encode(subscribe)
    return out
