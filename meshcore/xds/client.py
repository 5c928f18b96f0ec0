"""`XdsClient`: a proxy's delta-ADS subscription, kept up for the life of the process.

Connect (TLS, the server's identity checked), send one wildcard request per resource type
(with the versions held, on a reconnect), then for every response: ACK and publish the new
MeshState, or NACK and keep the last good one (`delta.DeltaClient`). A broken stream is
retried with backoff (0.5 s doubling to 30 s, back to the start after a good response).
`start()` waits for the first complete state, like the local file watcher's `start()`, and
raises `MeshConfigError` if none arrives in time: a proxy must not serve without its config.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import ssl
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from meshcore.discovery import ConfigStatus
from meshcore.identity.spiffe import SpiffeId
from meshcore.state import MeshConfigError, MeshState
from meshcore.tls import PeerVerificationError
from meshcore.xds import messages as m
from meshcore.xds.credentials import Credentials, XdsCredentialError
from meshcore.xds.delta import DeltaClient
from meshcore.xds.grpc import GrpcClosed, GrpcStream
from meshcore.xds.wire import WireError

log = structlog.get_logger("xds.client")

BACKOFF_START = 0.5
BACKOFF_MAX = 30.0


@dataclass(frozen=True, slots=True)
class Received:
    type_url: str
    names: tuple[str, ...]
    removed: tuple[str, ...]
    error: str | None


UNIX_PREFIX = "unix:"


@dataclass(frozen=True, slots=True)
class XdsTarget:
    host: str
    port: int
    ssl_context: ssl.SSLContext | None
    server_identity: SpiffeId | None

    @classmethod
    def parse(
        cls, address: str, ssl_context: ssl.SSLContext | None, identity: SpiffeId | None
    ) -> XdsTarget:
        if address.startswith(UNIX_PREFIX):
            # A unix socket (gRPC's `unix:/path`): how the local cluster's tunnels, in node
            # namespaces, reach a control plane on the machine's loopback.
            if len(address) == len(UNIX_PREFIX) or "\0" in address:
                raise MeshConfigError(f"xDS address {address!r} names no socket path")
            return cls(address, 0, ssl_context, identity)
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise MeshConfigError(f"xDS address {address!r} is not host:port")
        return cls(host.strip("[]"), int(port), ssl_context, identity)


class XdsClient:
    def __init__(
        self,
        target: XdsTarget,
        node: m.Node,
        on_update: Callable[[MeshState], None],
        types: tuple[str, ...],
        connect_timeout: float = 10.0,
        credentials: Credentials | None = None,
    ) -> None:
        self._target = target
        # What the server authenticates this proxy by (its token); None sends nothing,
        # which a server that authenticates subscribers refuses (UNAUTHENTICATED).
        self._credentials = credentials
        self._delta = DeltaClient(types, node)
        self._on_update = on_update
        self._connect_timeout = connect_timeout
        self._current = MeshState.empty()
        self._first = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.connects = 0  # streams opened (a resumed stream counts again)
        self.responses = 0
        # The newest responses as (type URL, names sent, names removed, refusal), for the
        # admin and for tests: what a resumed stream really carried.
        self.recent: collections.deque[Received] = collections.deque(maxlen=32)

    @property
    def current(self) -> MeshState:
        return self._current

    @property
    def versions(self) -> dict[str, dict[str, str]]:
        return self._delta.versions()

    @property
    def status(self) -> ConfigStatus:
        """The config in force, named by a digest of every resource version held (equal on
        every proxy with the same resources), and the last refusal while it stands."""
        digest = hashlib.sha256(
            repr(sorted((t, sorted(v.items())) for t, v in self._delta.versions().items())).encode()
        ).hexdigest()
        error = self._delta.last_error
        return ConfigStatus(digest, None if error is None else "xds", error)

    async def start(self, wait: float = 30.0) -> None:
        if self._task is not None:
            raise RuntimeError("XdsClient.start() called twice")
        self._task = asyncio.create_task(self._run(), name="xds-client")
        try:
            await asyncio.wait_for(self._first.wait(), wait)
        except TimeoutError:
            await self.close()
            raise MeshConfigError(
                f"no complete config from the xDS server {self._target.host}:"
                f"{self._target.port} within {wait:g} s; check XDS_ADDRESS and that "
                "the server is up"
            ) from None

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        delay = BACKOFF_START
        while True:
            try:
                if await self._session():
                    delay = BACKOFF_START
            except (
                OSError,
                TimeoutError,
                GrpcClosed,
                PeerVerificationError,
                WireError,
                XdsCredentialError,
            ) as exc:
                log.warning("xds_stream_failed", error=str(exc), retry_in=delay)
            except Exception:
                log.exception("xds_stream_error", retry_in=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    async def _session(self) -> bool:
        """One stream until it breaks; True if it delivered at least one response."""
        t = self._target
        metadata = self._credentials() if self._credentials is not None else ()
        stream = await GrpcStream.open(
            t.host,
            t.port,
            m.ADS_METHOD,
            ssl_context=t.ssl_context,
            expected=t.server_identity,
            connect_limit=self._connect_timeout,
            max_message=m.MAX_MESSAGE_SIZE,
            metadata=metadata,
        )
        self.connects += 1
        got_any = False
        try:
            for req in self._delta.initial_requests():
                await stream.send(m.encode(req))
            log.info("xds_connected", host=t.host, port=t.port)
            while True:
                try:
                    raw = await stream.recv()
                except GrpcClosed:
                    if got_any:
                        return True
                    raise
                resp = m.decode(m.DeltaDiscoveryResponse, raw)
                outcome = self._delta.on_response(resp)
                self.recent.append(
                    Received(
                        resp.type_url,
                        tuple(r.name for r in resp.resources),
                        resp.removed_resources,
                        outcome.error,
                    )
                )
                await stream.send(m.encode(outcome.reply))
                self.responses += 1
                got_any = True
                if outcome.error is not None:
                    log.error(
                        "xds_rejected",
                        type_url=resp.type_url,
                        nonce=resp.nonce,
                        error=outcome.error,
                    )
                if outcome.state is not None:
                    self._deliver(outcome.state)
        finally:
            await stream.close()

    def _deliver(self, state: MeshState) -> None:
        changed = state != self._current or not self._first.is_set()
        self._current = state
        self._first.set()
        if not changed:
            return
        log.info(
            "xds_config_applied",
            workloads=len(state.workloads),
            services=len(state.services),
            policies=len(state.policies),
            resources=len(state.l7_resources),
        )
        try:
            self._on_update(state)
        except Exception:
            log.exception("config_update_callback_failed")
