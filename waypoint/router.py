"""One HTTP request through the waypoint: authenticate, authorize, route, then forward with
the route's faults, timeouts, retries, load balancing, outlier detection and circuit
breakers, and account for it (metrics, one access-log line, spans).

Every decision is a pure module's (`authn`, `authz`, `routes`, `lb`, `outlier`,
`routes.pool`, `routes.retry`, `routes.fault`); this is the shell that asks them in order
and does the I/O. The order follows Envoy's HTTP filter chain in a waypoint: JWT, RBAC,
fault, router.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from meshcore.hbone.stream import HboneStreamError
from meshcore.state import IPAddress, MeshState, Workload
from waypoint.authz.decide import authorize_request, denied_response
from waypoint.authz.facts import facts_for
from waypoint.clusters import Cluster, discard, discard_h2
from waypoint.endpoints import Endpoint, service_endpoints
from waypoint.http.h1client import Http1Client, UpstreamError
from waypoint.http.h2client import Http2Client, StreamError
from waypoint.http.message import (
    Body,
    BodyError,
    BufferedBody,
    Request,
    Response,
    Wire,
    text_response,
)
from waypoint.http.stream import ByteStream
from waypoint.l7config import L7Config
from waypoint.lb import PickContext, hash_key, pick
from waypoint.routes.facts import RequestFacts
from waypoint.routes.fault import fault_decision
from waypoint.routes.filters import apply_request, apply_response
from waypoint.routes.model import Backend, Direct, Forward, Redirect, RouteDecision
from waypoint.routes.pool import PoolVerdict, admit_request, admit_retry, connection_spent
from waypoint.routes.retry import Failure, GrpcStatus, Outcome, backoff, should_retry
from waypoint.routes.table import choose_backend
from waypoint.server import Inbound
from waypoint.telemetry.accesslog import RequestLog
from waypoint.telemetry.flags import ResponseFlag, join_flags
from waypoint.telemetry.grpcframes import MessageCounter
from waypoint.telemetry.metrics import RequestMetrics, RequestProtocol, request_labels
from waypoint.telemetry.tracing import Attempt, RequestTrace, start_request
from waypoint.upstream import Upstream

if TYPE_CHECKING:  # the exporter (and protobuf) load only when traces are exported
    from waypoint.destination import Destination
    from waypoint.routes.destinationrule import TrafficPolicy
    from waypoint.telemetry.export import OtlpExporter

log = structlog.get_logger("waypoint")

# A request body is held for retries and mirrors only up to this size (Envoy buffers a
# retriable request likewise); a larger or streamed one is sent once.
RETRY_BUFFER = 64 * 1024
# How long a request waits for a free connection when the circuit breaker queues it.
PENDING_WAIT = 1.0
# Destinations (service ports, subsets, pods dialled directly at a port) whose state the
# router keeps at once. Beyond it, the ones holding nothing (no request, no connection)
# are dropped before a new one is added: a client trying every port of a pod bound to
# this waypoint must not grow one for each.
MAX_CLUSTERS = 1024


class _NoEndpoint(Exception):
    pass


@dataclass(slots=True)
class _Try:
    """What one attempt to an endpoint ended with."""

    response: Response | None
    outcome: Outcome
    endpoint: Endpoint | None
    error: str | None = None
    flag: ResponseFlag | None = None


def _grpc(request: Request) -> bool:
    ctype = request.header("content-type") or ""
    return ctype.startswith("application/grpc")


def _grpc_status(response: Response) -> int | None:
    value = response.header("grpc-status")
    if value is None:
        for k, v in response.body.trailers:
            if k == "grpc-status":
                value = v
    return int(value) if value is not None and value.isdigit() else None


class Accounted:
    """The response body on its way to the client: counts bytes and, at its end (or its
    failure), closes the books of the request once; and gives the upstream connection back
    when the exchange completed cleanly."""

    __slots__ = ("_body", "_done", "_on_done", "messages", "sent")

    def __init__(
        self,
        body: Body,
        on_done: Callable[[int, str | None], None],
        messages: MessageCounter | None = None,
    ) -> None:
        self._body = body
        self._on_done: Callable[[int, str | None], None] | None = on_done
        self.sent = 0
        self.messages = messages  # gRPC: the messages that went by

    async def read(self) -> bytes:
        try:
            chunk = await self._body.read()
        except BaseException as e:
            self.finish(str(e) or type(e).__name__)
            raise
        if chunk:
            self.sent += len(chunk)
            if self.messages is not None:
                self.messages.feed(chunk)
        else:
            self.finish(None)
        return chunk

    def finish(self, error: str | None) -> None:
        done, self._on_done = self._on_done, None
        if done is not None:
            done(self.sent, error)

    @property
    def length(self) -> int | None:
        return self._body.length

    @property
    def trailers(self) -> list[tuple[str, str]]:
        return self._body.trailers


class Router:
    def __init__(
        self,
        state: Callable[[], MeshState],
        config: Callable[[], L7Config],
        upstream: Upstream,
        metrics: RequestMetrics,
        network: Callable[[], str],
        exporter: OtlpExporter | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._state = state
        self._config = config
        self._upstream = upstream
        self.metrics = metrics
        self._network = network
        self._exporter = exporter
        self._rng = rng or random.Random()
        self._clusters: dict[tuple[str, int, str | None], Cluster] = {}
        # The clusters refreshed from the state and config seen last (both immutable
        # snapshots, replaced on change): a request to one of them skips the endpoint
        # list's rebuild, whose cost grows with the service's pods.
        self._seen: tuple[MeshState | None, L7Config | None] = (None, None)
        self._fresh: set[tuple[str, int, str | None]] = set()
        self._mirrors: set[asyncio.Task[None]] = set()

    # ---- the request ------------------------------------------------------------------

    async def handle(
        self, request: Request, inbound: Inbound, open_: dict[Accounted, None] | None = None
    ) -> Response:
        """Serve one request. `open_`: the stream's books of requests still sending their
        response (`abandon` closes them when the client's stream ends first)."""
        books = open_ if open_ is not None else {}
        state = self._state()
        cfg = self._config()
        dest = inbound.destination
        trace = start_request(request, inbound.trace_parent, recording=self._exporter is not None)
        src_ip = inbound.source_ip
        src_addr = inbound.source_addr
        src_workload = (
            state.workload_by_ip(self._network(), src_addr) if src_addr is not None else None
        )
        record = RequestLog(
            method=request.method,
            authority=request.authority,
            path=request.path,
            src=src_ip,
            src_identity=inbound.peer,
            src_workload=src_workload,
            service=dest.service,
            request_id=trace.request_id,
            trace_id=trace.trace_id_hex,
        )
        started = time.monotonic()
        grpc = _grpc(request)
        request_bytes = request.body.length or 0
        request_messages = response_messages = None
        if grpc:
            request_messages, response_messages = MessageCounter(), MessageCounter()
            request.body = Accounted(request.body, lambda _n, _e: None, request_messages)
        try:
            response = await self._handle(request, inbound, state, cfg, record, trace, grpc)
        except Exception as e:  # a bug must cost one request, never the connection
            log.exception("request failed", error=str(e))
            record.flag(ResponseFlag.UPSTREAM_PROTOCOL_ERROR)
            response = text_response(500, "internal error in the waypoint")

        def done(sent: int, error: str | None) -> None:
            books.pop(accounted, None)
            flags = list(record.flags)
            if error is not None:
                flags.append(ResponseFlag.DOWNSTREAM_CONNECTION_TERMINATION)
            record.bytes_sent = sent
            record.bytes_received = request_bytes
            record.finish(response.status, (), error)
            labels = request_labels(
                source=src_workload,
                source_identity=inbound.peer,
                destination=record.dst_workload,
                service=dest.service,
                protocol=RequestProtocol.GRPC if grpc else RequestProtocol.HTTP,
                response_code=response.status,
                grpc_status=_grpc_status(response) if grpc else None,
                response_flags=join_flags(flags),
            )
            self.metrics.record(
                labels,
                duration_ms=(time.monotonic() - started) * 1000.0,
                request_bytes=request_bytes,
                response_bytes=sent,
                request_messages=request_messages.messages if request_messages else 0,
                response_messages=response_messages.messages if response_messages else 0,
            )
            if self._exporter is not None:
                trace.finish(
                    request, status=response.status, client=src_ip, route=record.route,
                    error=error,
                )  # fmt: skip
                self._exporter.submit_all(trace.spans)

        accounted = Accounted(response.body, done, response_messages)
        response.body = accounted
        if request.method == "HEAD" or response.status in (204, 304) or response.status < 200:
            accounted.finish(None)  # no body will be read
        else:
            books[accounted] = None
        return response

    @staticmethod
    def abandon(books: dict[Accounted, None]) -> None:
        """The client's stream ended: requests still sending their response are cut short."""
        for accounted in list(books):
            accounted.finish("downstream closed")

    async def _handle(
        self,
        request: Request,
        inbound: Inbound,
        state: MeshState,
        cfg: L7Config,
        record: RequestLog,
        trace: RequestTrace,
        grpc: bool,
    ) -> Response:
        dest = inbound.destination
        applies = cfg.for_destination(dest.service)
        # 1. JWT (RequestAuthentication): a bad token is refused; no token passes unnamed.
        principal: str | None = None
        claims = None
        if applies.verifier.active:
            result = applies.verifier.authenticate(request)
            if not result.ok:
                from waypoint.authn.verify import unauthorized_response  # loaded with the JWT check

                record.flag(ResponseFlag.DENY)
                record.error = result.reason
                return unauthorized_response(result)
            result.apply_to(request)
            principal, claims = result.principal, result.claims
        # 2. Authorization (L7 AuthorizationPolicy).
        if applies.policies:
            facts = facts_for(
                request,
                source_identity=inbound.peer,
                source_ip=_address(inbound),
                destination_ip=ipaddress.ip_address(dest.ip),
                destination_port=dest.port,
                destination_service=dest.service.hostname if dest.service else None,
                request_principal=principal,
                claims=claims,
            )
            verdict = authorize_request(applies.policies, facts)
            record.verdict = verdict
            if not verdict.allowed:
                record.flag(ResponseFlag.RBAC_DENIED)
                return denied_response()
        # 3. Route.
        facts_r = RequestFacts(
            method=request.method,
            path=request.path,
            headers=tuple(request.headers),
            authority=request.authority,
            is_grpc=grpc,
            source_namespace=inbound.peer.namespace,
            source_ip=inbound.source_ip,
        )
        decision = cfg.routes.select(
            dest.service.key if dest.service is not None else None, dest.port, facts_r
        )
        record.route = str(decision.route) if decision.route is not None else None
        action = decision.action
        if isinstance(action, Redirect):
            return Response(action.status, [("location", action.location), ("content-length", "0")])
        if isinstance(action, Direct):
            if action.status == 404 and decision.route is None:
                record.flag(ResponseFlag.NO_ROUTE)
            return text_response(action.status, action.body or _reason(action.status))
        return await self._forward(request, inbound, state, cfg, decision, action, facts_r,
                                   record, trace)  # fmt: skip

    async def _forward(
        self,
        request: Request,
        inbound: Inbound,
        state: MeshState,
        cfg: L7Config,
        decision: RouteDecision,
        forward: Forward,
        facts: RequestFacts,
        record: RequestLog,
        trace: RequestTrace,
    ) -> Response:
        # Fault injection (VirtualService): delay, then maybe abort.
        if forward.fault is not None:
            delay, abort = fault_decision(forward.fault, self._rng.random(), self._rng.random())
            if delay is not None:
                record.flag(ResponseFlag.FAULT_DELAY)
                await asyncio.sleep(delay)
            if abort is not None:
                record.flag(ResponseFlag.FAULT_ABORT)
                if abort.grpc_status is not None:
                    # gRPC: a trailers-only answer, 200 with the status in the headers.
                    return Response(
                        200,
                        [("content-type", "application/grpc"),
                         ("grpc-status", str(abort.grpc_status)),
                         ("grpc-message", "fault filter abort")],
                    )  # fmt: skip
                return text_response(abort.http_status or 503, "fault filter abort")
        backend = choose_backend(forward, self._rng.random())
        if backend.status is not None or (backend.service_key is None and not _direct(inbound)):
            record.flag(ResponseFlag.NO_ROUTE)
            return text_response(backend.status or 500, "no backend for this route")
        # The body: held whole (for retries and mirrors) when small and of known length.
        body = request.body
        replayable = body.length is not None and body.length <= RETRY_BUFFER
        if replayable:
            data = b""
            while chunk := await body.read():
                data += chunk
            request.body = BufferedBody(data, body.trailers)
        port = backend.port or inbound.destination.port
        path, authority, headers = apply_request(
            forward, backend, request.path, request.authority, request.headers
        )
        for mirror in forward.mirrors:
            if replayable and mirror.wanted(self._rng.random()):
                self._mirror(request, mirror.service_key, mirror.port or port, path, headers)
        timeouts = forward.timeouts
        try:
            async with asyncio.timeout(timeouts.request):
                response = await self._tries(
                    request, inbound, state, cfg, backend, port, path, authority, headers,
                    forward, facts, record, trace, replayable,
                )  # fmt: skip
        except TimeoutError:
            record.flag(ResponseFlag.UPSTREAM_REQUEST_TIMEOUT)
            return text_response(504, "upstream request timeout")
        response.headers = apply_response(forward, backend, response.headers)
        return response

    async def _tries(
        self,
        request: Request,
        inbound: Inbound,
        state: MeshState,
        cfg: L7Config,
        backend: Backend,
        port: int,
        path: str,
        authority: str,
        headers: list[tuple[str, str]],
        forward: Forward,
        facts: RequestFacts,
        record: RequestLog,
        trace: RequestTrace,
        replayable: bool,
    ) -> Response:
        cluster = self._cluster(state, cfg, inbound, backend, port)
        policy = forward.retry
        per_try = forward.timeouts.backend_request or policy.per_try_timeout
        tried: set[str] = set()
        attempt = 0
        while True:
            attempt += 1
            record.attempts = attempt
            outcome = await self._try(
                request, cluster, path, authority, headers, facts, tried, per_try, trace,
                record,
            )  # fmt: skip
            if outcome.endpoint is not None:
                record.upstream_host = outcome.endpoint.address
                record.dst_workload = outcome.endpoint.workload
                record.dst_identity = outcome.endpoint.workload.identity
                tried.add(outcome.endpoint.address)
            retry = (
                replayable
                and should_retry(policy, attempt, outcome.outcome)
                and admit_retry(cluster.policy.pool, cluster.active_retries)
            )
            if not retry:
                break
            if outcome.response is not None:
                _drop(outcome.response)
            cluster.active_retries += 1
            try:
                await asyncio.sleep(backoff(policy, attempt, self._rng.random()))
            finally:
                cluster.active_retries -= 1
            request.body = (
                request.body.replay() if isinstance(request.body, BufferedBody) else request.body
            )
        if outcome.response is not None:
            return outcome.response
        flags = [outcome.flag] if outcome.flag is not None else []
        if attempt > 1 and outcome.flag is not ResponseFlag.UPSTREAM_OVERFLOW:
            flags.append(ResponseFlag.UPSTREAM_RETRY_LIMIT_EXCEEDED)
        record.flag(*flags)
        record.error = outcome.error
        if outcome.outcome is Failure.TIMEOUT:
            return text_response(504, "upstream request timeout")
        return text_response(503, _failure_text(outcome))

    async def _try(
        self,
        request: Request,
        cluster: Cluster,
        path: str,
        authority: str,
        headers: list[tuple[str, str]],
        facts: RequestFacts,
        tried: set[str],
        per_try: float | None,
        trace: RequestTrace,
        record: RequestLog,
    ) -> _Try:
        now = time.monotonic()
        candidates: Sequence[str] = cluster.addresses
        if cluster.outlier is not None:
            cluster.outlier.sweep(now)
            healthy = cluster.outlier.healthy(candidates, now)
            candidates = healthy or candidates  # all ejected: panic mode, as Envoy
        if not candidates or cluster.balancer is None:
            return _Try(None, Failure.CONNECT_FAILURE, None, "no healthy upstream",
                        ResponseFlag.NO_HEALTHY_UPSTREAM)  # fmt: skip
        ctx = PickContext(
            (self._rng.random(), self._rng.random()),
            frozenset(tried),
            cluster.in_flight,
            hash_key(cluster.policy.lb, facts),
        )
        address = pick(cluster.balancer, candidates, ctx)
        endpoint = cluster.by_address(address) if address is not None else None
        if endpoint is None:
            return _Try(None, Failure.CONNECT_FAILURE, None, "no healthy upstream",
                        ResponseFlag.NO_HEALTHY_UPSTREAM)  # fmt: skip
        if request.wire is Wire.HTTP2:
            return await self._try_h2(
                request, cluster, endpoint, path, authority, headers, facts, per_try, trace,
                record,
            )  # fmt: skip
        client = cluster.take_idle(endpoint.address)
        verdict = admit_request(
            cluster.policy.pool,
            http2=False,
            active_requests=cluster.active_requests,
            pending=cluster.pending,
            connections=cluster.connections,
            idle_connections=1 if client is not None else 0,
        )
        if verdict is PoolVerdict.OVERFLOW:
            if client is not None:
                cluster.put_idle(endpoint.address, client)
            return _Try(None, 503, endpoint, "upstream overflow", ResponseFlag.UPSTREAM_OVERFLOW)
        if verdict is PoolVerdict.QUEUE:
            # Wait briefly for a connection to come free (http1MaxPendingRequests).
            cluster.pending += 1
            try:
                deadline = time.monotonic() + PENDING_WAIT
                while client is None and time.monotonic() < deadline:
                    await asyncio.sleep(0.005)
                    client = cluster.take_idle(endpoint.address)
                    if client is None and cluster.connections < cluster.policy.pool.max_connections:
                        break
            finally:
                cluster.pending -= 1
            if client is None and cluster.connections >= cluster.policy.pool.max_connections:
                return _Try(None, 503, endpoint, "upstream overflow",
                            ResponseFlag.UPSTREAM_OVERFLOW)  # fmt: skip
        if client is None:
            # A new connection counts from now, not from when its handshake ends: requests
            # arriving meanwhile must see it (maxConnections).
            cluster.connections += 1
        attempt = trace.attempt()
        upstream = _upstream_request(request, authority, path, headers, trace, attempt)
        _begin(cluster, endpoint)
        status: int | None = None
        error: str | None = None
        try:
            async with asyncio.timeout(per_try):
                if client is None:
                    client = await self._connect(cluster, endpoint, record)
                response = await client.send(upstream)
            status = response.status
            self._answered(cluster, endpoint, status)
            response.body = self._returning(cluster, endpoint, client, response.body)
            return _Try(response, _outcome(response, facts), endpoint)
        except _ConnectFailed as e:
            error = str(e)
            cluster.connections -= 1
            return self._failed(cluster, endpoint, Failure.CONNECT_FAILURE, error)
        except TimeoutError:
            error = PER_TRY_TIMEOUT
            _lose(cluster, client)
            return self._failed(cluster, endpoint, Failure.TIMEOUT, error)
        except (UpstreamError, BodyError, ConnectionError, OSError) as e:
            error = str(e) or type(e).__name__
            _lose(cluster, client)
            return self._failed(cluster, endpoint, Failure.RESET, error)
        except BaseException:
            # Cancelled (the request's own timeout, or the client went away) mid-exchange.
            error = "cancelled"
            _lose(cluster, client)
            raise
        finally:
            _end(cluster, endpoint, trace, attempt, upstream, status, error)

    async def _try_h2(
        self,
        request: Request,
        cluster: Cluster,
        endpoint: Endpoint,
        path: str,
        authority: str,
        headers: list[tuple[str, str]],
        facts: RequestFacts,
        per_try: float | None,
        trace: RequestTrace,
        record: RequestLog,
    ) -> _Try:
        """One try over HTTP/2 (gRPC, or a client that spoke HTTP/2): requests to an
        endpoint share one multiplexed connection, so only active requests are limited."""
        verdict = admit_request(
            cluster.policy.pool,
            http2=True,
            active_requests=cluster.active_requests,
            pending=0,
            connections=len(cluster.h2),
        )
        if verdict is PoolVerdict.OVERFLOW:
            return _Try(None, 503, endpoint, "upstream overflow", ResponseFlag.UPSTREAM_OVERFLOW)
        attempt = trace.attempt()
        upstream = _upstream_request(request, authority, path, headers, trace, attempt)
        address = endpoint.address
        _begin(cluster, endpoint)
        status: int | None = None
        error: str | None = None
        client: Http2Client | None = None
        try:
            async with asyncio.timeout(per_try):
                client = cluster.h2.get(address)
                if client is None or not client.available:
                    if client is not None and client.active == 0:
                        discard_h2(cluster.h2.pop(address))
                    stream = await self._open(endpoint, record)
                    client = Http2Client(stream)
                    cluster.h2[address] = client
                response = await client.send(upstream)
            status = response.status
            self._answered(cluster, endpoint, status)
            return _Try(response, _outcome(response, facts), endpoint)
        except _ConnectFailed as e:
            error = str(e)
            return self._failed(cluster, endpoint, Failure.CONNECT_FAILURE, error)
        except TimeoutError:
            error = PER_TRY_TIMEOUT
            return self._failed(cluster, endpoint, Failure.TIMEOUT, error)
        except (StreamError, BodyError, ConnectionError, OSError) as e:
            error = str(e) or type(e).__name__
            if client is not None and not client.available and cluster.h2.get(address) is client:
                discard_h2(cluster.h2.pop(address))
            return self._failed(cluster, endpoint, Failure.RESET, error)
        finally:
            _end(cluster, endpoint, trace, attempt, upstream, status, error)

    async def _open(self, endpoint: Endpoint, record: RequestLog) -> ByteStream:
        try:
            return await self._upstream.open(
                endpoint.workload, endpoint.ip, endpoint.port, _connect_headers(record)
            )
        except (OSError, ConnectionError, HboneStreamError) as e:
            raise _ConnectFailed(f"connecting to {endpoint.address}: {e}") from None

    def _answered(self, cluster: Cluster, endpoint: Endpoint, status: int | None) -> None:
        """Outlier detection hears of every try: a status, or None for no answer at all."""
        if cluster.outlier is not None:
            cluster.outlier.record(endpoint.address, status, time.monotonic())

    def _failed(self, cluster: Cluster, endpoint: Endpoint, failure: Failure, error: str) -> _Try:
        """A try that got no answer: counted against the endpoint, flagged as Envoy does."""
        self._answered(cluster, endpoint, None)
        return _Try(None, failure, endpoint, error, _FAILURE_FLAGS[failure])

    async def _connect(
        self, cluster: Cluster, endpoint: Endpoint, record: RequestLog
    ) -> Http1Client:
        return Http1Client(await self._open(endpoint, record))

    def _returning(
        self, cluster: Cluster, endpoint: Endpoint, client: Http1Client, body: Body
    ) -> Body:
        """The response body; once read to its end, the connection goes back to the idle
        list (if it may be reused), else it is closed."""
        served = cluster.served.get(id(client), 0) + 1
        cluster.served[id(client)] = served

        def done(_sent: int, error: str | None) -> None:
            spent = connection_spent(cluster.policy.pool, served)
            if error is None and not spent and cluster.put_idle(endpoint.address, client):
                return
            cluster.served.pop(id(client), None)
            discard(client)
            cluster.connections -= 1

        accounted = Accounted(body, done)
        if client.reusable:
            # Complete already (HEAD, 204, 304: no body): nobody will read one, so the
            # connection goes back now, not never.
            accounted.finish(None)
        return accounted

    def _cluster(
        self, state: MeshState, cfg: L7Config, inbound: Inbound, backend: Backend, port: int
    ) -> Cluster:
        dest = inbound.destination
        seen_state, seen_cfg = self._seen
        if state is not seen_state or cfg is not seen_cfg:
            # (A request that began before the change refreshes from its own snapshot, and
            # the next one from the new: each cluster always matches its caller's.)
            self._seen = (state, cfg)
            self._fresh.clear()
        key: tuple[str, int, str | None] = (
            (f"pod/{dest.ip}", dest.port, None)  # a pod dialled directly
            if backend.service_key is None
            else (backend.service_key, port, backend.subset)
        )
        cluster = self._clusters.get(key)
        if cluster is not None and key in self._fresh:
            return cluster
        endpoints, policy = _destination(state, cfg, dest, backend, port)
        if cluster is None:
            if len(self._clusters) >= MAX_CLUSTERS:
                self._drop_unused_clusters()
            cluster = self._clusters[key] = Cluster(policy)
        cluster.refresh(policy, endpoints)
        self._fresh.add(key)
        return cluster

    def _drop_unused_clusters(self) -> None:
        """Forget the destinations that hold nothing: no request in flight or waiting, no
        upstream connection (busy or idle). Their balancer and outlier state go with them,
        as Envoy's go with a removed cluster; a later request starts them afresh."""
        for key, c in list(self._clusters.items()):
            if not (c.active_requests or c.pending or c.active_retries or c.connections or c.h2):
                del self._clusters[key]
                self._fresh.discard(key)

    def _mirror(
        self,
        request: Request,
        service_key: str,
        port: int,
        path: str,
        headers: list[tuple[str, str]],
    ) -> None:
        """Send a copy and forget it (its answer and failure are ignored)."""
        if len(self._mirrors) >= 64:
            return  # mirroring must never cost the real traffic
        state = self._state()
        service = state.service_by_key(service_key)
        if service is None:
            return
        endpoints = service_endpoints(state, service, port)
        if not endpoints:
            return
        endpoint = endpoints[self._rng.randrange(len(endpoints))]
        body = request.body
        copy = Request(
            request.method,
            f"{request.authority.split(':')[0]}-shadow",
            path,
            list(headers),
            body.replay() if isinstance(body, BufferedBody) else BufferedBody(),
        )

        async def send() -> None:
            with contextlib.suppress(Exception):
                stream = await self._upstream.open(
                    endpoint.workload, endpoint.ip, endpoint.port, []
                )
                client = Http1Client(stream)
                try:
                    async with asyncio.timeout(10):
                        response = await client.send(copy)
                        while await response.body.read():
                            pass
                finally:
                    await client.aclose()

        task = asyncio.get_running_loop().create_task(send())
        self._mirrors.add(task)
        task.add_done_callback(self._mirrors.discard)


class _ConnectFailed(ConnectionError):
    pass


PER_TRY_TIMEOUT = "upstream per-try timeout"
_FAILURE_FLAGS = {
    Failure.CONNECT_FAILURE: ResponseFlag.UPSTREAM_CONNECTION_FAILURE,
    Failure.TIMEOUT: ResponseFlag.UPSTREAM_REQUEST_TIMEOUT,
    Failure.RESET: ResponseFlag.UPSTREAM_CONNECTION_TERMINATION,
}


def _upstream_request(
    request: Request,
    authority: str,
    path: str,
    headers: list[tuple[str, str]],
    trace: RequestTrace,
    attempt: Attempt,
) -> Request:
    """What one try sends: the routed request, with this attempt's trace context."""
    return Request(
        method=request.method,
        authority=authority,
        path=path,
        headers=[*_without_trace(headers), *trace.upstream_headers(attempt)],
        body=request.body,
        scheme=request.scheme,
        wire=request.wire,
        upgrade=request.upgrade,
    )


def _outcome(response: Response, facts: RequestFacts) -> Outcome:
    """What the retry policy judges: the status, or a gRPC status other than OK."""
    grpc_status = _grpc_status(response) if facts.is_grpc else None
    if grpc_status is not None and grpc_status != 0:
        return GrpcStatus(grpc_status)
    return response.status


def _begin(cluster: Cluster, endpoint: Endpoint) -> None:
    cluster.active_requests += 1
    cluster.in_flight[endpoint.address] = cluster.in_flight.get(endpoint.address, 0) + 1


def _end(
    cluster: Cluster,
    endpoint: Endpoint,
    trace: RequestTrace,
    attempt: Attempt,
    sent: Request,
    status: int | None,
    error: str | None,
) -> None:
    """A try is over, however it ended: the breaker's and balancer's counts, its span."""
    cluster.active_requests -= 1
    left = cluster.in_flight.get(endpoint.address, 1) - 1
    if left:
        cluster.in_flight[endpoint.address] = left
    else:
        cluster.in_flight.pop(endpoint.address, None)
    if not trace.recording:
        return
    trace.end_attempt(
        attempt,
        method=sent.method,
        url=f"{sent.scheme}://{sent.authority}{sent.path}",
        peer=endpoint.ip,
        peer_port=endpoint.port,
        status=status,
        error=error,
    )


def _lose(cluster: Cluster, client: Http1Client | None) -> None:
    """The exchange failed: its connection (or the one being opened) is gone."""
    if client is not None:
        discard(client)
    cluster.connections -= 1


def _drop(response: Response) -> None:
    """A response we will not send on (a retry follows): its connection is not reused."""
    body = response.body
    if isinstance(body, Accounted):
        body.finish("retried")


def _without_trace(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(k, v) for k, v in headers if k not in ("traceparent", "tracestate", "x-request-id")]


def _connect_headers(record: RequestLog) -> list[tuple[str, str]]:
    """The upstream CONNECT names the original client, as the tunnel's does."""
    return [("forwarded", f'for="{record.src}"')] if record.src else []


def _address(inbound: Inbound) -> IPAddress:
    """The client's address for policy facts (a source that is not an address raises
    ValueError, as parsing it here always did)."""
    addr = inbound.source_addr
    return addr if addr is not None else ipaddress.ip_address(inbound.source_ip)


def _destination(
    state: MeshState, cfg: L7Config, dest: Destination, backend: Backend, port: int
) -> tuple[tuple[Endpoint, ...], TrafficPolicy]:
    """A cluster's endpoints and traffic policy: the one pod dialled directly, or the
    service's (subset's) endpoints for `port`."""
    if backend.service_key is None:
        assert dest.workload is not None
        return (Endpoint(dest.workload, dest.ip, dest.port),), cfg.routes.traffic_policy("")
    service = state.service_by_key(backend.service_key)
    endpoints = service_endpoints(state, service, port) if service is not None else ()
    if backend.subset is not None:
        labels = cfg.routes.subset_labels(backend.service_key, backend.subset) or ()
        endpoints = tuple(e for e in endpoints if _has_labels(e.workload, labels))
    return endpoints, cfg.routes.traffic_policy(backend.service_key, port, backend.subset)


def _has_labels(workload: Workload, labels: tuple[tuple[str, str], ...]) -> bool:
    have = dict(workload.labels)
    return all(have.get(k) == v for k, v in labels)


def _direct(inbound: Inbound) -> bool:
    return inbound.destination.service is None


def _reason(status: int) -> str:
    return {404: "route not found", 500: "no backend", 503: "service unavailable"}.get(
        status, f"status {status}"
    )


def _failure_text(t: _Try) -> str:
    if t.flag is ResponseFlag.UPSTREAM_OVERFLOW:
        return "upstream connect error or disconnect/reset before headers. reset reason: overflow"
    if t.flag is ResponseFlag.NO_HEALTHY_UPSTREAM:
        return "no healthy upstream"
    return f"upstream connect error or disconnect/reset before headers. reset reason: {t.error}"
