"""The tunnel's end of ZDS: connect to the node agent, say hello, serve its requests.

As upstream ztunnel's in-pod workload manager (src/inpod/linux/workloadmanager.rs and
statemanager.rs):
- Connecting retries with exponential backoff (10 ms doubling to 15 s, +-20 % jitter)
  while the agent is away; the outage is logged once, and its end once.
- Requests are handled one at a time, in order, each answered with one Ack:
  Add: the pod is started (listeners in its netns, certificate) and only then acked; a
  failure is a nack with the reason (the pod stays enrolled, pending, and is retried).
  Del: the pod is stopped, acked. Keep (only before SnapshotSent): the pod is named in the
  snapshot without a new netns, so it is not drained, acked. SnapshotSent: every pod not
  named on this connection is drained, acked, and the tunnel counts as in sync.
- A packet that cannot be read (truncated, undecodable, an fd where none belongs or none
  where one must be) and a request that breaks the protocol (Keep after the snapshot, a
  second SnapshotSent, an Add without workload info) are answered with a nack and the
  connection is closed; the tunnel reconnects after a backoff and gets a fresh snapshot.
  Upstream stops its workload manager for good on the second kind; we keep retrying,
  since a tunnel that stops listening to its agent helps nobody.
- While disconnected, and until a new connection's snapshot is in, the tunnel is not
  ready (it keeps serving the pods it has: draining waits for the agent's snapshot).
- Beyond upstream: the agent's uid (SO_PEERCRED) must be an allowed one (by default the
  tunnel's own); another user's socket at the path is treated as an unreachable agent.
"""

from __future__ import annotations

import asyncio
import random
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import structlog

from meshcore.localtrust import default_uids, peer_cred, refusal
from zds import wire
from zds.messages import (
    Ack,
    AddWorkload,
    DelWorkload,
    KeepWorkload,
    SnapshotSent,
    Version,
    WorkloadResponse,
    ZdsError,
    ZdsHello,
    describe,
)
from ztunnel.inpod import Enrolment

log = structlog.get_logger(__name__)

BACKOFF_INITIAL = 0.01
BACKOFF_MAX = 15.0
# Upstream's agent reads each response into a 1 KiB buffer: longer nacks would arrive
# truncated and be rejected, so error texts are cut to fit.
MAX_ERROR_BYTES = 900


class PodManager(Protocol):
    """What ZDS drives: `ztunnel.node.NodeProxy`."""

    enrolment_source: str
    enrolment_synced: bool
    enrolment_detail: str

    async def add_pod(self, enrolment: Enrolment) -> None: ...

    async def remove_pod(self, uid: str) -> None: ...

    async def keep_only(self, uids: set[str]) -> None: ...


class _ProtocolError(Exception):
    """The agent broke the protocol: nack, then close the connection."""


@dataclass(slots=True)
class _Session:
    names: set[str] = field(default_factory=set)  # pods named before SnapshotSent
    snapshot_received: bool = False


def _short(text: str) -> str:
    raw = text.encode("utf-8")
    if len(raw) <= MAX_ERROR_BYTES:
        return text
    return raw[: MAX_ERROR_BYTES - 3].decode("utf-8", "ignore") + "..."


class ZdsClient:
    def __init__(
        self,
        path: str | Path,
        pods: PodManager,
        backoff_initial: float = BACKOFF_INITIAL,
        backoff_max: float = BACKOFF_MAX,
        agent_uids: frozenset[int] | None = None,
    ) -> None:
        self.path = Path(path)
        self.agent_uids = default_uids() if agent_uids is None else agent_uids
        self._pods = pods
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._task: asyncio.Task[None] | None = None
        self.sessions = 0  # connections that got as far as sending the hello
        self.connected = False
        pods.enrolment_source = "zds"
        self._status(False, f"connecting to {self.path}")

    def _status(self, synced: bool, detail: str) -> None:
        self._pods.enrolment_synced = synced
        self._pods.enrolment_detail = detail

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="zds-client")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        backoff = self._backoff_initial
        away_since_logged = False
        while True:
            try:
                sock = await wire.connect(self.path)
                try:
                    # The agent hands us netns fds to serve: a socket bound by another
                    # user (a path it could reach) must not be able to enrol pods.
                    why = refusal(peer_cred(sock), self.agent_uids)
                except OSError:
                    sock.close()
                    raise
                if why is not None:
                    sock.close()
                    raise ZdsError(f"not the node agent: {why}")
            except (OSError, ZdsError) as e:
                if not away_since_logged:
                    log.warning(
                        "node agent unreachable; retrying", path=str(self.path), error=str(e)
                    )
                    away_since_logged = True
                self._status(False, f"node agent unreachable: {e}")
                await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
                backoff = min(backoff * 2, self._backoff_max)
                continue
            if away_since_logged:
                log.info("node agent reachable again", path=str(self.path))
                away_since_logged = False
            self.connected = True
            try:
                healthy = await self._session(sock)
            finally:
                self.connected = False
                sock.close()
                self._status(False, "node agent disconnected; reconnecting")
            if healthy:
                backoff = self._backoff_initial
            else:
                # Do not hammer an agent that keeps sending what we cannot take.
                await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
                backoff = min(backoff * 2, self._backoff_max)

    async def _session(self, sock: socket.socket) -> bool:
        """One connection; True if it ended normally (the agent closed it)."""
        try:
            await wire.send_message(sock, ZdsHello(Version.V1))
        except (OSError, ZdsError) as e:
            log.warning("could not greet the node agent", error=str(e))
            return False
        self.sessions += 1
        log.info("connected to the node agent", path=str(self.path))
        self._status(False, "connected; waiting for the agent's snapshot")
        session = _Session()
        while True:
            try:
                got = await wire.recv_request(sock)
            except wire.ZdsClosed:
                log.info("node agent closed the connection")
                return True
            except ZdsError as e:
                log.error("unreadable message from the node agent; closing", error=str(e))
                await self._answer(sock, f"failure to read message: {e}")
                return False
            except OSError as e:
                log.warning("node agent connection failed", error=str(e))
                return False
            if got is None:
                log.info("node agent closed the connection")
                return True
            request, fd = got
            log.debug("zds request", request=describe(request))
            try:
                error = await self._handle(session, request.payload, fd)
            except _ProtocolError as e:
                log.error("node agent broke the protocol; closing", error=str(e))
                await self._answer(sock, f"failure to process message: {e}")
                return False
            if not await self._answer(sock, error):
                return False

    async def _answer(self, sock: socket.socket, error: str) -> bool:
        try:
            await wire.send_message(sock, WorkloadResponse(Ack(_short(error))))
        except (OSError, ZdsError) as e:
            log.warning("could not answer the node agent", error=str(e))
            return False
        return True

    async def _handle(
        self,
        session: _Session,
        payload: AddWorkload | KeepWorkload | DelWorkload | SnapshotSent,
        fd: int | None,
    ) -> str:
        """Carry out one request; the error text for its Ack ("" for an ACK)."""
        if isinstance(payload, AddWorkload):
            return await self._add(session, payload, fd)
        if fd is not None:  # wire.recv_request already refuses this; never leak one
            wire.close_fd(fd)
        if isinstance(payload, KeepWorkload):
            if session.snapshot_received:
                raise _ProtocolError("pod keep received after snapshot")
            log.info("pod keep received; it survives the snapshot", uid=payload.uid)
            session.names.add(payload.uid)
            return ""
        if isinstance(payload, DelWorkload):
            log.info("pod delete received; stopping its proxy", uid=payload.uid)
            if not session.snapshot_received:
                session.names.discard(payload.uid)
            try:
                await self._pods.remove_pod(payload.uid)
            except Exception as e:
                log.exception("pod removal failed", uid=payload.uid)
                return f"failure to remove proxy: {type(e).__name__}: {e}"
            return ""
        if session.snapshot_received:
            raise _ProtocolError("pod snapshot received already")
        log.info("agent snapshot received; draining pods it did not name", kept=len(session.names))
        try:
            await self._pods.keep_only(set(session.names))
        except Exception as e:
            log.exception("snapshot reconcile failed")
            return f"failure to reconcile snapshot: {type(e).__name__}: {e}"
        session.snapshot_received = True
        session.names.clear()
        self._status(True, "connected")
        return ""

    async def _add(self, session: _Session, add: AddWorkload, fd: int | None) -> str:
        if fd is None:  # wire.recv_request refuses this already
            raise _ProtocolError("AddWorkload without a netns fd")
        if add.workload_info is None or not add.uid:
            wire.close_fd(fd)
            raise _ProtocolError(
                "workload_info is required but not present"
                if add.uid
                else "AddWorkload without a uid"
            )
        info = add.workload_info
        log.info(
            "pod received; starting its proxy",
            uid=add.uid,
            name=info.name,
            namespace=info.namespace,
        )
        if not session.snapshot_received:
            session.names.add(add.uid)
        try:
            enrolment = Enrolment.from_fd(add.uid, fd, info)
        except OSError as e:
            return f"failure to start proxy: unusable netns fd: {e}"
        try:
            await self._pods.add_pod(enrolment)
        except Exception as e:
            log.error("pod proxy failed to start", uid=add.uid, error=str(e))
            return f"failure to start proxy: {e}"
        return ""
