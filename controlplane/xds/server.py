"""`XdsServer`: delta ADS over grpcio.aio, pushing every new MeshState to every stream.

Registered with a generic handler and our codec (no generated code), so the CA service can
share the same `grpc.aio.Server` and port (15012, as istiod) through `add_to_server`.

Each stream is one task that sleeps until something changed for it (a new snapshot, or a
request), then writes `DeltaSession.responses` for the newest snapshot. The "queue" of a
stream is therefore one flag and a reference to the latest snapshot: a client that reads
slowly holds only its own task back, and when it catches up it gets the net change, never
the intermediate ones. A client that takes nothing at all (its flow-control window stays
shut) holds one push for at most `push_timeout`; then its stream ends (UNAVAILABLE: it
reconnects and gets the current state), and its connection at the latest when it reaches
its maximum age (GrpcLimits). A malformed request ends that stream with
INVALID_ARGUMENT; a NACK is logged and kept (`nacks`), and the server keeps serving.

Every stream is authenticated first (`auth.SubscriberAuth`): a subscriber that proves
nothing is refused UNAUTHENTICATED, with what was missing or wrong, before its first
request is read and before any resource is sent. Then the node its first request names
is judged (`subscribers.authorize`): an identity that claims to be another namespace's
proxy, or a tunnel without a tunnel's account, is refused PERMISSION_DENIED before any push.

A stream opened with a service-account token is judged again while it lasts: every
`recheck_period` (the review cache's lifetime, so each check past the first asks the API
server), and at once when the pod the token is bound to is deleted. A token that no longer
holds ends the stream UNAUTHENTICATED; an API server that cannot answer ends nothing.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import itertools
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import structlog

from controlplane.ca_grpc_auth import Refusal
from controlplane.xds.auth import SubscriberAuth
from controlplane.xds.session import DeltaSession, Nack, ProtocolError, Snapshot
from controlplane.xds.subscribers import ACCEPTED_TTL, Subscriber, Via, authorize
from meshcore.localtrust import RateLog
from meshcore.state import MeshState
from meshcore.xds import convert
from meshcore.xds import messages as m
from meshcore.xds.wire import WireError

log = structlog.get_logger("xds.server")

SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
METHOD = "DeltaAggregatedResources"
MAX_NACKS = 256  # the newest NACKs kept for inspection
PUSH_TIMEOUT = 60.0  # GrpcLimits.push_timeout's default (controlplane/grpc_limits.py)
RECHECK_PERIOD = ACCEPTED_TTL  # an open token stream is judged again this often


def _identity(data: bytes) -> bytes:
    return data


# (type URL, name) -> (the entry it was made from, version, encoded body).
EncodeCache = dict[tuple[str, str], tuple[object, str, bytes]]


def snapshot_of(state: MeshState, cache: EncodeCache | None = None) -> Snapshot:
    """Every resource of `state` with its version: a content hash, so an unchanged resource
    keeps its version across snapshots and across server restarts.

    With a `cache` (the previous snapshot's entries), an entry equal to the one a resource was
    last encoded from reuses that encoding: a label change on one namespace re-encodes that
    namespace's workloads, not 10 000 (comparing two frozen entries costs a tenth of encoding
    one). The cache is replaced by this snapshot's entries, so it never outgrows the state."""
    out: dict[str, dict[str, tuple[str, bytes]]] = {t: {} for t in convert.RESOURCE_TYPES}
    fresh: EncodeCache = {}
    items: list[convert.Decoded] = [*state.workloads, *state.services, *state.policies]
    items.extend(state.l7_resources)
    for item in items:
        key = convert.name_of(item)
        hit = cache.get(key) if cache is not None else None
        if hit is not None and hit[0] == item:
            version, body = hit[1], hit[2]
        else:
            _, _, body = convert.encode_item(item)
            version = hashlib.sha256(body).hexdigest()[:16]
        out[key[0]][key[1]] = (version, body)
        fresh[key] = (item, version, body)
    if cache is not None:
        cache.clear()
        cache.update(fresh)
    return out


class XdsServer:
    def __init__(
        self,
        state: MeshState | None = None,
        push_timeout: float = PUSH_TIMEOUT,
        *,
        auth: SubscriberAuth,
        recheck_period: float = RECHECK_PERIOD,
    ) -> None:
        # `auth` has no default: how subscribers prove themselves is always stated.
        self.auth = auth
        self.refused = 0  # streams refused before anything was sent
        self.denied = 0  # authenticated, but refused as the node they claimed
        self.revoked = 0  # open streams ended because their token no longer holds
        self.recheck_period = recheck_period
        # Open token streams by the pod their token is bound to: each one's "check again".
        self._by_pod: dict[str, dict[asyncio.Event, Callable[[], None]]] = {}
        auth.pod_listeners.append(self._pod_deleted)
        self._refusal_log = RateLog()
        self.push_timeout = push_timeout
        self.stalled = 0  # streams closed because a push was not taken in time
        self._cache: EncodeCache = {}
        self._snapshot: Snapshot = snapshot_of(state or MeshState.empty(), self._cache)
        self._generation = itertools.count(1)
        self._version = str(next(self._generation))
        self._wakers: set[asyncio.Event] = set()
        self.nacks: collections.deque[Nack] = collections.deque(maxlen=MAX_NACKS)
        self.streams_served = 0

    @property
    def version(self) -> str:
        return self._version

    def _pod_deleted(self, uid: str) -> None:
        for check_again in list(self._by_pod.get(uid, {}).values()):
            check_again()

    @property
    def open_streams(self) -> int:
        return len(self._wakers)

    def update(self, state: MeshState) -> None:
        """Make `state` the one every stream converges to (each is woken; none is awaited)."""
        self.publish(snapshot_of(state, self._cache))

    def publish(self, snapshot: Snapshot) -> None:
        """`update` for a source that already holds encoded, versioned resources."""
        self._snapshot = snapshot
        self._version = str(next(self._generation))
        for wake in self._wakers:
            wake.set()

    def add_to_server(self, server: Any) -> None:
        """Register the ADS method on a `grpc.aio.Server` (which may serve others too)."""
        handler = grpc.stream_stream_rpc_method_handler(
            self._stream, request_deserializer=_identity, response_serializer=_identity
        )
        generic = grpc.method_handlers_generic_handler(SERVICE, {METHOD: handler})
        server.add_generic_rpc_handlers((generic,))

    async def _stream(self, requests: AsyncIterator[bytes], context: Any) -> None:
        subscriber = await self.auth.authenticate(
            context.invocation_metadata() or (), context.auth_context() or {}, context.peer()
        )
        if isinstance(subscriber, Refusal):
            self.refused += 1
            suppressed = self._refusal_log.due(asyncio.get_running_loop().time())
            if suppressed is not None:
                log.warning(
                    "xds_subscriber_refused",
                    code=subscriber.code.value,
                    reason=subscriber.reason,
                    peer=context.peer(),
                    refused=self.refused,
                    not_logged=suppressed,
                )
            await context.abort(getattr(grpc.StatusCode, subscriber.code.value), subscriber.reason)
            return  # (abort raises; grpc's stubs do not say so)
        log.info("xds_subscriber", subscriber=str(subscriber), peer=context.peer())
        session = DeltaSession(frozenset(convert.RESOURCE_TYPES))
        requested = asyncio.Event()  # a request has arrived: its node can be judged
        authorized = False
        wake = asyncio.Event()
        failure: list[str] = []
        ended = asyncio.Event()
        loop = asyncio.get_running_loop()
        recheck_due = False
        timer: asyncio.TimerHandle | None = None

        def check_again() -> None:
            nonlocal recheck_due
            recheck_due = True
            wake.set()

        if subscriber.via is Via.SERVICE_ACCOUNT_TOKEN:
            timer = loop.call_later(self.recheck_period, check_again)
            if subscriber.pod_uid:
                self._by_pod.setdefault(subscriber.pod_uid, {})[wake] = check_again

        async def read() -> None:
            try:
                async for raw in requests:
                    req = m.decode(m.DeltaDiscoveryRequest, raw)
                    requested.set()
                    nack = session.on_request(req)
                    if nack is not None:
                        self.nacks.append(nack)
                        log.warning(
                            "xds_nack",
                            node=nack.node,
                            type_url=nack.type_url,
                            nonce=nack.nonce,
                            code=nack.code,
                            error=nack.message,
                        )
                    wake.set()
            except (WireError, ProtocolError) as exc:
                failure.append(str(exc))
            finally:
                ended.set()
                wake.set()

        self._wakers.add(wake)
        self.streams_served += 1
        reader = asyncio.create_task(read(), name="xds-stream-reader")
        try:
            while True:
                await wake.wait()
                wake.clear()
                if failure:
                    log.warning("xds_bad_request", node=session.node, error=failure[0])
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, failure[0])
                if ended.is_set():
                    return
                if recheck_due:
                    recheck_due = False
                    await self._recheck(subscriber, context)
                    timer = loop.call_later(self.recheck_period, check_again)
                if not authorized and requested.is_set():
                    # Judged once, on the node the first request names, before any push.
                    denied = authorize(subscriber, session.node, self.auth.tunnel_accounts)
                    if denied is not None:
                        self.denied += 1
                        log.warning(
                            "xds_subscriber_denied", reason=denied.reason, peer=context.peer()
                        )
                        await context.abort(grpc.StatusCode.PERMISSION_DENIED, denied.reason)
                    authorized = True
                if not authorized:
                    continue
                for resp in session.responses(self._snapshot, self._version):
                    try:
                        async with asyncio.timeout(self.push_timeout):
                            await context.write(m.encode(resp))
                    except TimeoutError:
                        self.stalled += 1
                        log.warning(
                            "xds_push_not_taken", node=session.node, seconds=self.push_timeout
                        )
                        # Not abort(): its status cannot go out behind the stuck push
                        # (it waits, or fails). Returning frees this stream's state now;
                        # grpc sends the status once the push goes, and the connection's
                        # maximum age (GrpcLimits) closes it if it never does.
                        context.set_code(grpc.StatusCode.UNAVAILABLE)
                        context.set_details(f"a push was not taken in {self.push_timeout:g} s")
                        return
        finally:
            self._wakers.discard(wake)
            reader.cancel()
            if timer is not None:
                timer.cancel()
            streams = self._by_pod.get(subscriber.pod_uid)
            if streams is not None:
                streams.pop(wake, None)
                if not streams:
                    del self._by_pod[subscriber.pod_uid]

    async def _recheck(self, subscriber: Subscriber, context: Any) -> None:
        """End the stream UNAUTHENTICATED if its token no longer holds."""
        revoked = await self.auth.recheck(
            context.invocation_metadata() or (), context.peer(), subscriber.pod_uid
        )
        if revoked is None:
            return
        self.revoked += 1
        log.warning(
            "xds_subscriber_revoked",
            subscriber=str(subscriber),
            reason=revoked.reason,
            peer=context.peer(),
        )
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, revoked.reason)
