"""The discovery server and our client over real gRPC + TLS on loopback: a reference grpcio
client sees what ours sees, NACKs keep the last good state, a resumed stream carries only
the difference, and bad input never takes either side down."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import ipaddress
from typing import Any

import grpc
import pytest

from controlplane.xds.server import XdsServer, snapshot_of
from controlplane.xds.tls import XdsTlsError, bind
from meshcore.state import HealthStatus, MeshState
from meshcore.xds import convert
from meshcore.xds import messages as m
from meshcore.xds.client import XdsClient
from tests.support.aio import Loop, wait_until
from tests.xds import pb
from tests.xds.conftest import OPEN, Harness
from tests.xds.states import demo_state


def changed_state() -> MeshState:
    """The demo with one workload unhealthy, one removed, one policy gone."""
    state = demo_state()
    workloads = list(state.workloads)
    workloads[0] = dataclasses.replace(workloads[0], status=HealthStatus.UNHEALTHY)
    removed = workloads.pop()
    assert removed.uid != workloads[0].uid
    policies = [p for p in state.policies if p.key != "travel/deny-legacy"]
    return MeshState.build(workloads, state.services, policies, state.l7_resources)


async def reference_resources(port: int, ca_roots: bytes) -> dict[str, dict[str, bytes]]:
    """What a grpcio client with messages compiled from our .proto files receives."""
    d = pb.discovery()
    stub_module = pb.discovery_grpc()
    creds = grpc.ssl_channel_credentials(root_certificates=ca_roots)
    # The server's certificate names istiod by SPIFFE URI only; grpcio checks a DNS name
    # unless told which to expect, so the override is the one name it will find: none.
    options = (("grpc.ssl_target_name_override", "istiod.istio-system.svc"),)
    got: dict[str, dict[str, bytes]] = {t: {} for t in convert.RESOURCE_TYPES}
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds, options) as channel:
        stub = stub_module.AggregatedDiscoveryServiceStub(channel)
        queue: asyncio.Queue[Any] = asyncio.Queue()
        for t in convert.RESOURCE_TYPES:
            queue.put_nowait(d.DeltaDiscoveryRequest(type_url=t))

        async def requests() -> Any:
            while True:
                item = await queue.get()
                if item is None:
                    return
                yield item

        call = stub.DeltaAggregatedResources(requests())
        answered: set[str] = set()
        async for resp in call:
            for r in resp.resources:
                got[resp.type_url][r.name] = r.resource.value
                assert r.version == hashlib.sha256(r.resource.value).hexdigest()[:16]
            queue.put_nowait(
                d.DeltaDiscoveryRequest(type_url=resp.type_url, response_nonce=resp.nonce)
            )
            answered.add(resp.type_url)
            if answered == set(convert.RESOURCE_TYPES):
                queue.put_nowait(None)
                call.cancel()
                break
    return got


def test_reference_grpcio_client_sees_what_ours_sees(aio: Loop, harness: Harness) -> None:
    """(a) Over TLS on loopback, with the verification each client does."""
    state = demo_state()
    server = XdsServer(state, auth=OPEN)

    async def main() -> None:
        port = await harness.serve(server)
        try:
            theirs = await reference_resources(port, harness.ca.roots_pem())
        except grpc.aio.AioRpcError as exc:  # pragma: no cover - shown on failure
            raise AssertionError(exc.details()) from exc
        assert theirs == convert.resources_of(state)
        client = await harness.client()
        assert client.current == convert.canonical(state)
        # Theirs decoded by the reference runtime, ours by our codec: the same resources.
        w = pb.workload().Address.FromString(
            theirs[m.ADDRESS_TYPE]["travel//Pod/travel/frontend-0"]
        )
        ours = client.current.workload_by_uid("travel//Pod/travel/frontend-0")
        assert ours is not None
        assert w.workload.name == ours.name and w.workload.node == ours.node
        assert [ipaddress.ip_address(a) for a in w.workload.addresses] == list(ours.ips)

    aio.run(main)


def test_pushes_every_update_and_removals(aio: Loop, harness: Harness) -> None:
    server = XdsServer(demo_state(), auth=OPEN)
    states: list[MeshState] = []

    async def main() -> None:
        await harness.serve(server)
        client = await harness.client(states.append)
        assert len(states) == 1
        server.update(changed_state())
        await wait_until(lambda: client.current == convert.canonical(changed_state()), "update")
        # Only what changed travelled: one workload changed, one removed, one policy removed.
        recent = [r for r in client.recent if r.names or r.removed][-2:]
        sent = {name for r in recent for name in r.names}
        removed = {name for r in recent for name in r.removed}
        assert sent == {demo_state().workloads[0].uid}
        assert removed == {demo_state().workloads[-1].uid, "travel/deny-legacy"}

    aio.run(main)


def test_nack_keeps_the_last_good_state_and_the_server_keeps_serving(
    aio: Loop, harness: Harness
) -> None:
    """(b) A resource that fails validation is NACKed with its error; nothing of that
    response is applied; the server logs and keeps the NACK and serves the next update."""
    good = demo_state()
    server = XdsServer(good, auth=OPEN)

    async def main() -> None:
        await harness.serve(server)
        client = await harness.client()
        # One Address response with a good change (a workload turns unhealthy) and a bad
        # resource: none of it is applied.
        snap = {t: dict(v) for t, v in snapshot_of(good).items()}
        uid = good.workloads[0].uid
        snap[m.ADDRESS_TYPE][uid] = snapshot_of(changed_state())[m.ADDRESS_TYPE][uid]
        assert snap[m.ADDRESS_TYPE][uid] != snapshot_of(good)[m.ADDRESS_TYPE][uid]
        bad = m.encode(m.Address(workload=m.Workload(uid="bad", namespace="ns", tunnel_protocol=9)))
        snap[m.ADDRESS_TYPE]["bad"] = ("v-bad", bad)
        server.publish(snap)
        await wait_until(lambda: len(server.nacks) == 1, "the NACK")
        nack = server.nacks[0]
        assert nack.type_url == m.ADDRESS_TYPE and nack.node == "node1"
        assert "workload bad" in nack.message and "tunnel_protocol" in nack.message
        assert nack.code == 3
        assert client.current == convert.canonical(good)  # the last good state stays
        assert client.status.rejected_error == nack.message
        # The server carries on: the next good state is applied.
        server.update(changed_state())
        await wait_until(lambda: client.current == convert.canonical(changed_state()), "recovery")
        assert client.status.rejected_error is None

    aio.run(main)


def test_resume_after_server_restart_sends_only_the_difference(aio: Loop, harness: Harness) -> None:
    """(c) The client reconnects with initial_resource_versions; the new server process
    state sends the changed workload and the removals, nothing else."""

    async def main() -> None:
        first = XdsServer(demo_state(), auth=OPEN)
        port = await harness.serve(first)
        client = await harness.client()
        assert client.connects == 1
        await harness.servers[0].stop(None)
        second = XdsServer(changed_state(), auth=OPEN)
        await harness.serve(second, port)
        await wait_until(
            lambda: client.current == convert.canonical(changed_state()), "resumed", limit=30
        )
        assert client.connects >= 2
        after = list(client.recent)[-3:]  # the resumed stream: one response per type
        assert {r.type_url for r in after} == set(convert.RESOURCE_TYPES)
        assert sorted(n for r in after for n in r.names) == [demo_state().workloads[0].uid]
        assert sorted(n for r in after for n in r.removed) == sorted(
            [demo_state().workloads[-1].uid, "travel/deny-legacy"]
        )

    aio.run(main)


def test_malformed_requests_end_only_that_stream(aio: Loop, harness: Harness) -> None:
    """(e) Garbage, an unknown type and a bad resumption each end their own stream with
    INVALID_ARGUMENT; a well-behaved client on the same server is unaffected."""
    server = XdsServer(demo_state(), auth=OPEN)

    async def raw_call(port: int, payloads: list[bytes]) -> grpc.StatusCode:
        creds = grpc.ssl_channel_credentials(root_certificates=harness.ca.roots_pem())
        options = (("grpc.ssl_target_name_override", "istiod.istio-system.svc"),)
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds, options) as channel:
            call = channel.stream_stream(m.ADS_METHOD, lambda b: b, lambda b: b)(iter(payloads))
            try:
                async for _ in call:
                    pass
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            return await call.code()

    async def main() -> None:
        port = await harness.serve(server)
        client = await harness.client()
        garbage = b"\x0a\xff\xff"
        unknown = m.encode(m.DeltaDiscoveryRequest(type_url="type.googleapis.com/nope"))
        first = m.encode(m.DeltaDiscoveryRequest(type_url=m.ADDRESS_TYPE))
        again = m.encode(
            m.DeltaDiscoveryRequest(
                type_url=m.ADDRESS_TYPE, initial_resource_versions=(m.VersionEntry("a", "b"),)
            )
        )
        for payloads in ([garbage], [unknown], [first, again]):
            code = await asyncio.wait_for(raw_call(port, payloads), 10)
            assert code == grpc.StatusCode.INVALID_ARGUMENT
        server.update(changed_state())
        await wait_until(lambda: client.current == convert.canonical(changed_state()), "update")

    aio.run(main)


def test_what_one_subscriber_asks_changes_nothing_another_receives(
    aio: Loop, harness: Harness
) -> None:
    """A subscriber's stream state is its own: one that subscribes to a few names,
    unsubscribes from everything, claims versions it never had, NACKs every push and
    subscribes as another node changes nothing another subscriber receives, before or
    after an update, nor what a new subscriber starts with."""
    server = XdsServer(demo_state(), auth=OPEN)
    uid = demo_state().workloads[0].uid
    meddling = [
        m.DeltaDiscoveryRequest(
            node=m.Node(id="node2"),
            type_url=m.ADDRESS_TYPE,
            resource_names_subscribe=(uid,),
            resource_names_unsubscribe=("*",),
            initial_resource_versions=(m.VersionEntry(uid, "forged"),),
        ),
        m.DeltaDiscoveryRequest(
            type_url=m.ADDRESS_TYPE,
            response_nonce="not-a-nonce",
            error_detail=m.Status(code=3, message="every push rejected"),
        ),
        m.DeltaDiscoveryRequest(type_url=m.AUTHORIZATION_TYPE, resource_names_unsubscribe=("*",)),
    ]

    async def meddle(port: int) -> int:
        """The meddling stream, kept open while the others are watched; how many
        responses it got."""
        creds = grpc.ssl_channel_credentials(root_certificates=harness.ca.roots_pem())
        options = (("grpc.ssl_target_name_override", "istiod.istio-system.svc"),)
        got = 0
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds, options) as channel:
            method = channel.stream_stream(m.ADS_METHOD, lambda b: b, lambda b: b)
            call = method(iter([m.encode(r) for r in meddling]))
            try:
                async for _ in call:
                    got += 1
                    if got >= 3:
                        break
            except grpc.aio.AioRpcError:
                pass
            call.cancel()
        return got

    async def main() -> None:
        port = await harness.serve(server)
        watcher = await harness.client()
        seen = len(watcher.recent)
        before = watcher.current
        served = await asyncio.wait_for(meddle(port), 20)
        # It was served and its requests were read (its NACK is on record).
        assert served >= 1 and [n.message for n in server.nacks] == ["every push rejected"]
        assert watcher.current == before == convert.canonical(demo_state())
        assert len(watcher.recent) == seen  # nothing was pushed to it meanwhile
        server.update(changed_state())
        await wait_until(lambda: watcher.current == convert.canonical(changed_state()), "update")
        newcomer = await harness.client(node="node3")
        assert newcomer.current == convert.canonical(changed_state())

    aio.run(main)


def test_a_client_that_never_reads_does_not_hold_others_back(aio: Loop, harness: Harness) -> None:
    """A stream whose reader is stuck: updates to the others go on, and the stuck stream
    holds one pending state (the newest), not one per update."""
    server = XdsServer(demo_state(), auth=OPEN)

    async def main() -> None:
        port = await harness.serve(server)
        # A raw HTTP/2 connection that subscribes and then never reads a byte.
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=_raw_tls(harness.ca.roots_pem())
        )
        aio.defer(writer.close)
        from meshcore.xds.grpc import GrpcStream

        stuck = GrpcStream(reader, writer, _h2_started(writer, port), 1 << 20)
        await stuck.send(m.encode(m.DeltaDiscoveryRequest(type_url=m.ADDRESS_TYPE)))
        client = await harness.client()
        for i in range(30):
            state = changed_state() if i % 2 else demo_state()
            server.update(state)
            await wait_until(lambda s=state: client.current == convert.canonical(s), f"update {i}")  # type: ignore[misc]
        assert server.open_streams == 2

    aio.run(main)


def _raw_tls(roots: bytes) -> Any:
    from meshcore.xds.grpc import client_context

    return client_context(roots)


def _h2_started(writer: asyncio.StreamWriter, port: int) -> Any:
    from h2.config import H2Configuration
    from h2.connection import H2Connection

    conn = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    conn.send_headers(
        1,
        [
            (":method", "POST"),
            (":scheme", "https"),
            (":path", m.ADS_METHOD),
            (":authority", f"127.0.0.1:{port}"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ],
    )
    writer.write(conn.data_to_send())
    return conn


def test_plaintext_is_refused_off_loopback() -> None:
    server = grpc.aio.server()
    with pytest.raises(XdsTlsError, match="plaintext"):
        bind(server, "0.0.0.0:0", None)


def test_no_state_in_time_is_a_clear_error(aio: Loop, harness: Harness) -> None:
    async def main() -> None:
        from meshcore.state import MeshConfigError
        from meshcore.xds.client import XdsTarget
        from meshcore.xds.grpc import client_context

        target = XdsTarget("127.0.0.1", 9, client_context(harness.ca.roots_pem()), None)
        client = XdsClient(target, m.Node(id="n"), lambda _s: None, convert.RESOURCE_TYPES)
        with pytest.raises(MeshConfigError, match="XDS_ADDRESS"):
            await client.start(wait=1.0)

    aio.run(main)


def test_a_push_larger_than_the_flow_control_window(aio: Loop, harness: Harness) -> None:
    """A first push of ~1 MB (many HTTP/2 windows of 64 KiB) and then a change reach the
    client: its receive credit is given back as frames arrive."""
    from tests.xds.states import large_state

    big = large_state(3000)
    server = XdsServer(big, auth=OPEN)

    async def main() -> None:
        await harness.serve(server)
        client = await harness.client()
        assert client.current == convert.canonical(big)
        assert sum(len(b) for b in convert.resources_of(big)[m.ADDRESS_TYPE].values()) > 512 * 1024
        smaller = MeshState.build(big.workloads[:-10], big.services, big.policies)
        server.update(smaller)
        await wait_until(lambda: len(client.current.workloads) == 2990, "the removals")

    aio.run(main)


def test_discovery_over_a_unix_socket_with_tls(aio: Loop, harness: Harness, tmp_path: Any) -> None:
    # The local cluster's tunnels live in node namespaces and reach the control plane through
    # a socket file; it is TLS there too, and the server's identity is still checked.
    from controlplane.xds.tls import server_identity
    from meshcore.xds.client import XdsTarget
    from meshcore.xds.convert import RESOURCE_TYPES
    from meshcore.xds.grpc import client_context

    sock = tmp_path / "xds.sock"
    server = XdsServer(demo_state(), auth=OPEN)
    states: list[MeshState] = []

    async def main() -> None:
        grpc_server = grpc.aio.server()
        server.add_to_server(grpc_server)
        assert bind(grpc_server, f"unix:{sock}", harness.credentials) == 0
        await grpc_server.start()
        aio.defer(lambda: grpc_server.stop(None))
        target = XdsTarget.parse(
            f"unix:{sock}", client_context(harness.ca.roots_pem()), server_identity("cluster.local")
        )
        client = XdsClient(target, m.Node(id="node1"), states.append, RESOURCE_TYPES)
        aio.defer(client.close)
        await client.start(wait=20)
        assert client.current == convert.canonical(demo_state())
        server.update(changed_state())
        await wait_until(lambda: client.current == convert.canonical(changed_state()), "update")

    aio.run(main)


def test_plaintext_is_refused_on_a_unix_socket(tmp_path: Any) -> None:
    with pytest.raises(XdsTlsError):
        bind(grpc.aio.server(), f"unix:{tmp_path / 'x.sock'}", None)
