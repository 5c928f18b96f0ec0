"""(e) The client against a server that sends what it must not: garbage messages, a response
for a type it did not ask for, resources whose body is not their type. The client never
crashes: it NACKs what decodes but is wrong, drops a stream that is not protobuf, and
retries."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from controlplane.xds.server import METHOD, SERVICE
from controlplane.xds.tls import bind, server_identity
from meshcore.state import MeshConfigError
from meshcore.xds import convert
from meshcore.xds import messages as m
from meshcore.xds.client import XdsClient, XdsTarget
from meshcore.xds.delta import DeltaClient
from meshcore.xds.grpc import client_context
from tests.support.aio import Loop
from tests.xds.conftest import OPEN, Harness


def test_a_server_sending_garbage_is_retried_not_fatal(aio: Loop, harness: Harness) -> None:
    calls: list[int] = []

    async def handler(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        calls.append(1)
        yield b"\x0a\xff\xff\xff"  # a length running past the end

    async def main() -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    SERVICE,
                    {
                        METHOD: grpc.stream_stream_rpc_method_handler(
                            handler, lambda b: b, lambda b: b
                        )
                    },
                ),
            )
        )
        port = bind(server, "127.0.0.1:0", harness.credentials)
        await server.start()
        aio.defer(lambda: server.stop(None))
        target = XdsTarget(
            "127.0.0.1",
            port,
            client_context(harness.ca.roots_pem()),
            server_identity("cluster.local"),
        )
        client = XdsClient(target, m.Node(id="n"), lambda _s: None, convert.RESOURCE_TYPES)
        aio.defer(client.close)
        with pytest.raises(MeshConfigError, match="no complete config"):
            await client.start(wait=2.0)
        assert len(calls) >= 2  # it came back after the first bad stream

    aio.run(main)


def test_wrong_server_identity_is_refused(aio: Loop, harness: Harness) -> None:
    from controlplane.xds.server import XdsServer
    from meshcore.identity.spiffe import SpiffeId

    async def main() -> None:
        port = await harness.serve(XdsServer(auth=OPEN))
        target = XdsTarget(
            "127.0.0.1",
            port,
            client_context(harness.ca.roots_pem()),
            SpiffeId("cluster.local", "default", "impostor"),
        )
        client = XdsClient(target, m.Node(id="n"), lambda _s: None, convert.RESOURCE_TYPES)
        aio.defer(client.close)
        with pytest.raises(MeshConfigError):
            await client.start(wait=1.5)
        assert client.responses == 0

    aio.run(main)


def _response(type_url: str, *resources: m.Resource, nonce: str = "1") -> m.DeltaDiscoveryResponse:
    return m.DeltaDiscoveryResponse(type_url=type_url, resources=resources, nonce=nonce)


@pytest.mark.parametrize(
    ("resp", "error"),
    [
        (_response("type.googleapis.com/other"), "not subscribed"),
        (_response(m.ADDRESS_TYPE, m.Resource("a", (), "1", None)), "without a body"),
        (
            _response(m.ADDRESS_TYPE, m.Resource("a", (), "1", m.Any_(m.L7_RESOURCE_TYPE, b""))),
            "in a",
        ),
        (
            _response(m.ADDRESS_TYPE, m.Resource("a", (), "1", m.Any_(m.ADDRESS_TYPE, b"\x0a"))),
            "truncated",
        ),
    ],
)
def test_bad_responses_are_nacked_and_change_nothing(
    resp: m.DeltaDiscoveryResponse, error: str
) -> None:
    client = DeltaClient(convert.RESOURCE_TYPES, m.Node(id="n"))
    client.initial_requests()
    outcome = client.on_response(resp)
    assert outcome.state is None and outcome.error is not None and error in outcome.error
    assert outcome.reply.error_detail is not None and outcome.reply.response_nonce == "1"
    assert client.versions() == {t: {} for t in convert.RESOURCE_TYPES}


def test_no_state_is_published_before_every_type_answered() -> None:
    client = DeltaClient(convert.RESOURCE_TYPES, m.Node(id="n"))
    requests = client.initial_requests()
    assert [r.type_url for r in requests] == list(convert.RESOURCE_TYPES)
    assert requests[0].node == m.Node(id="n") and requests[1].node is None
    for i, t in enumerate(convert.RESOURCE_TYPES):
        outcome = client.on_response(_response(t, nonce=str(i)))
        assert outcome.reply.response_nonce == str(i) and outcome.reply.error_detail is None
        assert (outcome.state is not None) == (i == len(convert.RESOURCE_TYPES) - 1)
