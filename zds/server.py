"""The node agent's end of ZDS: it listens, tunnels connect, and it tells them which pods
to serve.

As upstream's istio-cni (nodeagent/ztunnelserver.go):
- Every connection starts with the tunnel's ZdsHello; the agent answers with its snapshot:
  one AddWorkload (with the pod's netns fd) per pod it knows, KeepWorkload for a pod whose
  netns it cannot open any more ("keep it if you have it"), then SnapshotSent. Each
  message waits for its ack before the next is sent: acks are correlated by order only.
- Later adds go to the newest connected tunnel, queued behind its snapshot if it is still
  receiving one (in an upgrade the new tunnel takes over new pods); deletes go to every
  connected tunnel, so the old one of an overlap also lets go.

Beyond upstream:
- The snapshot is taken live: a pod added while a snapshot is being sent is included, so a
  tunnel never finishes its snapshot missing a pod that was added meanwhile.
- A request whose ack does not come in time is not forgotten: its place in the ack queue
  is kept, so the late ack is matched to it and not to the next request.
- Every connection has a reader all the time, so a tunnel that goes away is noticed at once
  (upstream polls), and a message nobody asked for closes that connection.

Local trust (beyond upstream, which relies on the socket file's mode alone): a peer whose
uid (SO_PEERCRED, from the kernel) is not an allowed one (by default only the agent's own)
is closed before it is read from, and new connections are rate-limited (each one costs a
whole snapshot: a netns fd opened per pod), so a peer that reconnects in a loop cannot keep
the agent busy. Refusals are counted in `refused` and logged at most every few seconds;
nothing a peer does stops the accept loop.

The agent holds netns paths, not fds: a fd is opened for each send and closed right after
(the kernel has duplicated it into the packet by then), so the agent never leaks one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import stat
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from meshcore.localtrust import PeerCred, RateLog, TokenBucket, default_uids, peer_cred, refusal
from zds import wire
from zds.messages import (
    Ack,
    AddWorkload,
    DelWorkload,
    KeepWorkload,
    Payload,
    SnapshotSent,
    Version,
    WorkloadInfo,
    WorkloadRequest,
    ZdsError,
    encode,
)

log = structlog.get_logger(__name__)

HELLO_TIMEOUT = 5.0  # as upstream's read/write deadline
SNAPSHOT_ACK_TIMEOUT = 30.0  # per snapshot message; a tunnel slower than this is dropped
# New connections: a tunnel restart is one, an upgrade overlap two; 20 at once and then 2 a
# second is far above what a well-behaved tunnel does and bounds snapshots to 2 a second.
ACCEPT_RATE_PER_S = 2.0
ACCEPT_BURST = 20


class ZdsUnavailable(Exception):
    """No tunnel is connected (the pod stays remembered for the next one's snapshot)."""


class ZdsNack(Exception):
    """The tunnel answered with an error."""

    def __init__(self, error: str) -> None:
        super().__init__(f"the tunnel refused: {error}")
        self.error = error


class ZdsSuperseded(Exception):
    """The pod was deleted or added again before this add reached a tunnel."""


@dataclass(frozen=True, slots=True)
class _Pod:
    uid: str
    info: WorkloadInfo
    netns_path: str
    generation: int  # each add() is a new generation; acks name the one they answer


@dataclass(slots=True)
class _InFlight:
    payload: Payload
    pod: _Pod | None
    # The Ack, or None when the tunnel went away first.
    future: asyncio.Future[Ack | None]


class _Gone(Exception):
    """The tunnel disconnected before it answered."""


@dataclass(eq=False, slots=True)
class _Tunnel:
    serial: int
    sock: socket.socket
    ready: bool = False  # hello received and snapshot acked
    closed: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one request at a time
    inflight: deque[_InFlight] = field(default_factory=deque)
    acked: dict[str, int] = field(default_factory=dict)  # uid -> generation it acked

    def __str__(self) -> str:
        return f"tunnel#{self.serial}"


def _netns_fd(path: str) -> int:
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


class ZdsServer:
    """The agent's listener. All methods run on one event loop."""

    def __init__(
        self,
        path: str | Path,
        on_acked: Callable[[str], None] | None = None,
        on_tunnels_changed: Callable[[int], None] | None = None,
        allowed_uids: frozenset[int] | None = None,
        accept_rate: TokenBucket | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = Path(path)
        self.allowed_uids = default_uids() if allowed_uids is None else allowed_uids
        self._accept_rate = accept_rate or TokenBucket(ACCEPT_RATE_PER_S, ACCEPT_BURST)
        self._clock = clock
        self._refusal_log = RateLog()
        # Connections closed at accept, by reason ("uid", "rate"): what an operator checks
        # when a tunnel cannot connect, or to see that something else tries to.
        self.refused: dict[str, int] = {"uid": 0, "rate": 0}
        self._on_acked = on_acked
        self._on_tunnels_changed = on_tunnels_changed
        self._pods: dict[str, _Pod] = {}
        self._tunnels: list[_Tunnel] = []  # said hello, oldest first
        self._generations = itertools.count(1)
        self._serials = itertools.count(1)
        self._listener: socket.socket | None = None
        self._listener_ino: int | None = None
        self._tasks: set[asyncio.Task[Any]] = set()  # one per connection
        self._accept_task: asyncio.Task[None] | None = None
        self._ready_count = 0

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        self._listener = wire.listen(self.path)
        self._listener_ino = os.stat(self.path).st_ino
        self._accept_task = asyncio.get_running_loop().create_task(
            self._accept_loop(self._listener), name="zds-accept"
        )
        log.info("zds listening", path=str(self.path))

    async def close(self) -> None:
        # Stop accepting first, so no tunnel connects to an agent that is going away.
        if self._accept_task is not None:
            self._accept_task.cancel()
            await asyncio.gather(self._accept_task, return_exceptions=True)
            self._accept_task = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(OSError):
                st = os.lstat(self.path)
                # Only our own socket: a newer agent may already have bound the path.
                if stat.S_ISSOCK(st.st_mode) and st.st_ino == self._listener_ino:
                    self.path.unlink()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for tunnel in list(self._tunnels):
            self._drop(tunnel, "agent closing")

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            sock = await wire.accept(listener)
            try:
                why = self._admit(sock)
            except OSError as e:  # the peer is already gone
                why = f"cannot read the peer's credentials: {e}"
                self.refused["uid"] += 1
            if why is not None:
                sock.close()
                continue
            self._spawn(self._serve(sock), "zds-conn")

    def _admit(self, sock: socket.socket) -> str | None:
        """Why this new connection is closed at once, or None to serve it."""
        cred = peer_cred(sock)
        why = refusal(cred, self.allowed_uids)
        if why is not None:
            self._refused("uid", why, cred)
            return why
        if not self._accept_rate.allow(self._clock()):
            why = (
                f"more than {self._accept_rate.burst:g} connections at once "
                f"({self._accept_rate.rate:g}/s after that)"
            )
            self._refused("rate", why, cred)
            return why
        return None

    def _refused(self, reason: str, why: str, cred: PeerCred) -> None:
        self.refused[reason] += 1
        suppressed = self._refusal_log.due(self._clock())
        if suppressed is not None:
            log.warning(
                "zds peer refused",
                reason=why,
                peer=str(cred),
                refused=dict(self.refused),
                not_logged=suppressed,
            )

    # ---- state ---------------------------------------------------------------------------

    @property
    def tunnels(self) -> int:
        """Connected tunnels that completed hello and snapshot."""
        return sum(1 for t in self._tunnels if t.ready)

    def _newest(self) -> _Tunnel | None:
        return self._tunnels[-1] if self._tunnels else None

    def _newest_ready(self) -> _Tunnel | None:
        return next((t for t in reversed(self._tunnels) if t.ready), None)

    def acked(self, uid: str) -> bool:
        """Whether the newest ready tunnel acked this pod's current AddWorkload."""
        tunnel, pod = self._newest_ready(), self._pods.get(uid)
        return tunnel is not None and pod is not None and tunnel.acked.get(uid) == pod.generation

    def known(self) -> list[str]:
        """The uids the agent remembers (what the next snapshot carries)."""
        return list(self._pods)

    def _notify_acked(self, uid: str) -> None:
        if self._on_acked is None:
            return
        try:
            self._on_acked(uid)
        except Exception:
            log.exception("on_acked callback failed", uid=uid)

    def _notify_tunnels(self) -> None:
        count = self.tunnels
        if count == self._ready_count:
            return
        self._ready_count = count
        if self._on_tunnels_changed is None:
            return
        try:
            self._on_tunnels_changed(count)
        except Exception:
            log.exception("on_tunnels_changed callback failed", tunnels=count)

    # ---- one connection ------------------------------------------------------------------

    async def _serve(self, sock: socket.socket) -> None:
        tunnel = _Tunnel(next(self._serials), sock)
        reader: asyncio.Task[None] | None = None
        try:
            try:
                hello = await asyncio.wait_for(wire.recv_hello(sock), HELLO_TIMEOUT)
            except TimeoutError:
                log.warning("zds peer sent no hello; closing", conn=str(tunnel))
                return
            if hello is None:
                log.info("zds peer left before its hello", conn=str(tunnel))
                return
            if hello.version == Version.NOT_USED:
                log.error("zds hello without a version; closing", conn=str(tunnel))
                return
            if hello.version != Version.V1:
                # Upstream does not check either: the protocol is meant to stay compatible.
                log.warning("zds hello with an unknown version", version=hello.version)
            self._tunnels.append(tunnel)
            log.info("tunnel connected", conn=str(tunnel), connected=len(self._tunnels))
            reader = asyncio.get_running_loop().create_task(
                self._read_responses(tunnel), name=f"zds-read-{tunnel.serial}"
            )
            await self._send_snapshot(tunnel)
            await reader
        except _Gone:
            pass
        except (ZdsError, OSError, TimeoutError) as e:
            log.error("zds connection failed; closing it", conn=str(tunnel), error=str(e))
        finally:
            if reader is not None and not reader.done():
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)
            self._drop(tunnel, "connection ended")
            sock.close()

    async def _read_responses(self, tunnel: _Tunnel) -> None:
        try:
            while True:
                response = await wire.recv_response(tunnel.sock)
                if response is None:
                    log.info("tunnel disconnected", conn=str(tunnel))
                    return
                if not tunnel.inflight:
                    log.error("unexpected message from the tunnel; closing", conn=str(tunnel))
                    return
                self._answered(tunnel, tunnel.inflight.popleft(), response.payload)
        except ZdsError as e:
            log.error("bad message from the tunnel; closing", conn=str(tunnel), error=str(e))
        except OSError as e:
            log.warning("tunnel connection failed", conn=str(tunnel), error=str(e))
        finally:
            self._drop(tunnel, "reader stopped")

    def _answered(self, tunnel: _Tunnel, item: _InFlight, ack: Ack) -> None:
        pod = item.pod
        if isinstance(item.payload, AddWorkload) and pod is not None:
            if ack.error:
                if tunnel.acked.get(pod.uid) == pod.generation:
                    del tunnel.acked[pod.uid]
            elif self._pods.get(pod.uid) is pod:
                tunnel.acked[pod.uid] = pod.generation
                if tunnel.ready and tunnel is self._newest_ready():
                    self._notify_acked(pod.uid)
        if not item.future.done():
            item.future.set_result(ack)

    def _drop(self, tunnel: _Tunnel, why: str) -> None:
        if tunnel.closed:
            return
        tunnel.closed = True
        with contextlib.suppress(OSError):
            tunnel.sock.shutdown(socket.SHUT_RDWR)  # wakes the tunnel at once
        for item in tunnel.inflight:
            if not item.future.done():
                item.future.set_result(None)
        tunnel.inflight.clear()
        if tunnel in self._tunnels:
            self._tunnels.remove(tunnel)
            log.info("tunnel gone", conn=str(tunnel), why=why, connected=len(self._tunnels))
        self._notify_tunnels()

    async def _exchange(
        self, tunnel: _Tunnel, payload: Payload, fd: int | None, pod: _Pod | None
    ) -> Ack:
        """Send one request and wait for its ack. The caller holds `tunnel.lock`."""
        if tunnel.closed:
            raise _Gone()
        data = encode(WorkloadRequest(payload))
        item = _InFlight(payload, pod, asyncio.get_running_loop().create_future())
        tunnel.inflight.append(item)
        try:
            await wire.send_packet(tunnel.sock, data, fd)
        except BaseException as e:
            # Not sent (a send is whole or nothing), so no ack will come for it.
            with contextlib.suppress(ValueError):
                tunnel.inflight.remove(item)
            if isinstance(e, ZdsError | OSError):
                self._drop(tunnel, f"send failed: {e}")
                raise _Gone() from None
            raise
        # Shielded: if the caller gives up, the entry keeps its place in the ack queue.
        ack = await asyncio.shield(item.future)
        if ack is None:
            raise _Gone()
        return ack

    async def _send_snapshot(self, tunnel: _Tunnel) -> None:
        async with tunnel.lock:
            sent: dict[str, int] = {}
            # Live: pods added while this runs are sent too, until none is left.
            while todo := [p for p in self._pods.values() if sent.get(p.uid) != p.generation]:
                for pod in todo:
                    if self._pods.get(pod.uid) is not pod:
                        continue  # deleted or re-added meanwhile
                    sent[pod.uid] = pod.generation
                    await self._snapshot_pod(tunnel, pod)
            ack = await asyncio.wait_for(
                self._exchange(tunnel, SnapshotSent(), None, None), SNAPSHOT_ACK_TIMEOUT
            )
            if ack.error:
                log.error("tunnel refused the snapshot end", conn=str(tunnel), error=ack.error)
            tunnel.ready = True
        log.info("snapshot sent", conn=str(tunnel), pods=len(sent))
        self._notify_tunnels()
        if tunnel is self._newest_ready():
            for uid, generation in list(tunnel.acked.items()):
                known = self._pods.get(uid)
                if known is not None and known.generation == generation:
                    self._notify_acked(uid)

    async def _snapshot_pod(self, tunnel: _Tunnel, pod: _Pod) -> None:
        try:
            fd = _netns_fd(pod.netns_path)
        except OSError as e:
            # As upstream: without the netns the pod cannot be (re)added, but the tunnel
            # must not drop it either if it still serves it.
            log.warning("netns unavailable; sending keep", uid=pod.uid, error=str(e))
            payload: Payload = KeepWorkload(pod.uid)
            fd = None
        else:
            payload = AddWorkload(pod.uid, pod.info)
        try:
            ack = await asyncio.wait_for(
                self._exchange(tunnel, payload, fd, pod), SNAPSHOT_ACK_TIMEOUT
            )
        finally:
            wire.close_fd(fd)
        if ack.error:
            log.error("tunnel refused a snapshot pod", uid=pod.uid, error=ack.error)

    # ---- the node agent's API ------------------------------------------------------------

    # The deadline is part of the agent's API, hence the `timeout` parameters.
    async def add(
        self,
        uid: str,
        info: WorkloadInfo,
        netns_path: str,
        timeout: float = 10.0,  # noqa: ASYNC109
    ) -> None:
        """Remember the pod and have the newest tunnel serve it; returns once acked.

        Raises OSError if `netns_path` cannot be opened (nothing is remembered then),
        ZdsError for values that cannot be encoded, ZdsUnavailable when no tunnel is
        connected (the pod stays remembered: the next tunnel's snapshot carries it and
        `on_acked` fires then), ZdsNack, ZdsSuperseded, TimeoutError.
        """
        if not uid:
            raise ZdsError("a pod uid must not be empty")
        payload = AddWorkload(uid, info)
        encode(WorkloadRequest(payload))  # refuse bad values before anything changes
        fd = _netns_fd(netns_path)
        try:
            pod = _Pod(uid, info, str(netns_path), next(self._generations))
            self._pods[uid] = pod
            async with asyncio.timeout(timeout):
                while True:
                    tunnel = self._newest()
                    if tunnel is None:
                        raise ZdsUnavailable("no tunnel is connected")
                    try:
                        async with tunnel.lock:  # behind its snapshot, if one is running
                            if self._pods.get(uid) is not pod:
                                raise ZdsSuperseded(f"pod {uid} changed before it was sent")
                            if tunnel.acked.get(uid) == pod.generation:
                                return  # its snapshot carried this very add
                            ack = await self._exchange(tunnel, payload, fd, pod)
                    except _Gone:
                        continue  # that tunnel left; the next newest takes the pod
                    if ack.error:
                        raise ZdsNack(ack.error)
                    return
        finally:
            os.close(fd)

    async def delete(self, uid: str, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Forget the pod and tell every connected tunnel to stop serving it.

        With no tunnel connected there is no one to tell: the next snapshot omits the pod.
        Raises ZdsNack (every tunnel was still told) or TimeoutError.
        """
        self._pods.pop(uid, None)
        payload = DelWorkload(uid)
        encode(WorkloadRequest(payload))

        async def tell(tunnel: _Tunnel) -> str:
            try:
                async with tunnel.lock:
                    tunnel.acked.pop(uid, None)
                    ack = await self._exchange(tunnel, payload, None, None)
            except _Gone:
                return ""  # gone: it serves nothing any more
            return f"{tunnel}: {ack.error}" if ack.error else ""

        async with asyncio.timeout(timeout):
            errors = await asyncio.gather(*(tell(t) for t in list(self._tunnels)))
        refused = [e for e in errors if e]
        if refused:
            raise ZdsNack("; ".join(refused))
