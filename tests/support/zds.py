"""Both ends of ZDS spoken by hand, and a recording pod manager.

- `HandTunnel`: the tunnel's side, one packet at a time (hello, then each answer chosen by
  the test): for tests of what the agent sends and when.
- `HandAgent`: the agent's side, listening; the test chooses every request: for tests of
  the tunnel's ZDS client.
- `RecordingPods`: stands in for the tunnel's NodeProxy where real listeners would need a
  network namespace per pod; it keeps NodeProxy's ZDS contract (the same Add is
  idempotent, a new netns replaces, fds are released when a pod goes) and records every
  call, so tests can compare transcripts.

The handshake: the tunnel connects and says `ZdsHello`; the agent sends its snapshot (one
`AddWorkload` per pod with the pod's netns fd, each acked) and `SnapshotSent`.
"""

from __future__ import annotations

import asyncio
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.aio import wait_until
from tests.support.fds import opened
from zds import wire
from zds.messages import (
    Ack,
    AddWorkload,
    SnapshotSent,
    WorkloadInfo,
    WorkloadRequest,
    WorkloadResponse,
    ZdsHello,
    encode,
)
from zds.server import ZdsServer
from ztunnel.inpod import Enrolment

HELLO = encode(ZdsHello())
INFO = WorkloadInfo("web", "default", "web")
# A netns every process may open: the test's own.
OWN_NETNS = "/proc/self/ns/net"
ANSWER_LIMIT = 10.0


class HandTunnel:
    """The tunnel's side of ZDS, driven by the test."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @classmethod
    async def connect(cls, path: Path, hello: bytes | None = HELLO) -> HandTunnel:
        """Connect and say `hello` (None: say nothing; other bytes: a bad hello)."""
        tunnel = cls(await wire.connect(path))
        if hello is not None:
            await wire.send_packet(tunnel.sock, hello)
        return tunnel

    async def next(self, limit: float = ANSWER_LIMIT) -> tuple[WorkloadRequest, int | None]:
        """The next request and its fd (the caller closes it)."""
        got = await asyncio.wait_for(wire.recv_request(self.sock), limit)
        assert got is not None, "the agent closed the connection"
        return got

    async def request(self) -> WorkloadRequest:
        """The next request; an fd that came with it is closed."""
        request, fd = await self.next()
        wire.close_fd(fd)
        return request

    async def request_uid(self) -> str:
        payload = (await self.request()).payload
        assert not isinstance(payload, SnapshotSent), "expected a request naming a pod"
        return payload.uid

    async def expect(self, kind: type) -> WorkloadRequest:
        request = await self.request()
        assert isinstance(request.payload, kind), request
        return request

    async def expect_add(self, uid: str) -> int:
        """The next request is AddWorkload(uid) with a netns fd; returns the fd's inode."""
        request, fd = await self.next()
        try:
            assert isinstance(request.payload, AddWorkload), request
            assert request.payload.uid == uid
            assert fd is not None, "AddWorkload without a netns fd"
            return os.fstat(fd).st_ino
        finally:
            wire.close_fd(fd)

    async def ack(self, error: str = "") -> None:
        await wire.send_message(self.sock, WorkloadResponse(Ack(error)))

    async def snapshot(self) -> list[WorkloadRequest]:
        """Take and ack the whole snapshot, up to and including `SnapshotSent`."""
        seen = []
        while True:
            request = await self.request()
            seen.append(request)
            await self.ack()
            if isinstance(request.payload, SnapshotSent):
                return seen

    async def closed_by_agent(self) -> bool:
        try:
            return await wire.recv_packet(self.sock) is None
        except wire.ZdsClosed:
            return True

    def close(self) -> None:
        self.sock.close()


class HandAgent:
    """The agent's side of ZDS: it listens, and the test chooses every packet."""

    def __init__(self, path: Path) -> None:
        self.listener = wire.listen(path)
        self.conn: socket.socket | None = None

    async def accept(self) -> ZdsHello:
        """Take the next tunnel connection (closing the previous one) and its hello."""
        if self.conn is not None:
            self.conn.close()
        self.conn = await asyncio.wait_for(wire.accept(self.listener), ANSWER_LIMIT)
        hello = await wire.recv_hello(self.conn)
        assert hello is not None
        return hello

    async def send(self, payload: object, fd: int | None = None) -> None:
        assert self.conn is not None
        await wire.send_message(self.conn, WorkloadRequest(payload), fd)  # type: ignore[arg-type]

    async def send_raw(self, data: bytes, fd: int | None = None) -> None:
        assert self.conn is not None
        if fd is None:
            self.conn.send(data)
        else:
            socket.send_fds(self.conn, [data], [fd])

    async def answer(self) -> str:
        """The tunnel's answer to the last request: "" for an ACK, else the error."""
        assert self.conn is not None
        response = await wire.recv_response(self.conn)
        assert response is not None, "the tunnel closed the connection"
        return response.payload.error

    async def exchange(self, payload: object, fd: int | None = None) -> str:
        await self.send(payload, fd)
        return await self.answer()

    async def add(self, uid: str, netns_path: str = OWN_NETNS, info: WorkloadInfo = INFO) -> str:
        with opened(netns_path) as fd:
            return await self.exchange(AddWorkload(uid, info), fd)

    async def closed_by_tunnel(self) -> bool:
        assert self.conn is not None
        try:
            return await wire.recv_packet(self.conn) is None
        except wire.ZdsClosed:
            return True

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.listener.close()


async def ready_tunnel(agent: ZdsServer, path: Path) -> HandTunnel:
    """A hand tunnel through the whole handshake: hello, snapshot acked, counted by the
    agent as ready."""
    want = agent.tunnels + 1
    tunnel = await HandTunnel.connect(path)
    await tunnel.snapshot()
    await wait_until(lambda: agent.tunnels == want, "the tunnel to be ready")
    return tunnel


@dataclass
class RecordingPods:
    enrolment_source: str = "file"
    enrolment_synced: bool = True
    enrolment_detail: str = ""
    serving: dict[str, Enrolment] = field(default_factory=dict)
    calls: list[tuple[str, object]] = field(default_factory=list)
    starts: list[str] = field(default_factory=list)  # uids whose proxy was (re)started
    fail: dict[str, str] = field(default_factory=dict)  # uid -> error raised by add_pod
    hold: dict[str, asyncio.Event] = field(default_factory=dict)  # uid -> add_pod waits

    async def add_pod(self, enrolment: Enrolment) -> None:
        uid = enrolment.uid
        self.calls.append(("add", uid))
        gate = self.hold.get(uid)
        if gate is not None:
            try:
                await gate.wait()
            except asyncio.CancelledError:
                enrolment.release()  # as NodeProxy: the fd is ours once add_pod is called
                raise
        current = self.serving.get(uid)
        if current is not None and current == enrolment:
            enrolment.release()
            return
        if uid in self.fail:
            enrolment.release()
            raise RuntimeError(self.fail[uid])
        if current is not None:
            current.release()
        self.serving[uid] = enrolment
        self.starts.append(uid)

    async def remove_pod(self, uid: str) -> None:
        self.calls.append(("remove", uid))
        current = self.serving.pop(uid, None)
        if current is not None:
            current.release()

    async def keep_only(self, uids: set[str]) -> None:
        self.calls.append(("keep_only", frozenset(uids)))
        for uid in [u for u in self.serving if u not in uids]:
            self.serving.pop(uid).release()

    def close(self) -> None:
        for enrolment in self.serving.values():
            enrolment.release()
        self.serving.clear()
