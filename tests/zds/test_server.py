"""The agent's ZdsServer against tunnels driven by hand over a real socket: what a real
tunnel would never send (garbage, no hello, unsolicited or malformed answers, fds),
answers that come late or never, and tunnels that vanish mid-request."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from tests.zds.common import open_fds, opened, run, until
from zds import server as zds_server
from zds import wire
from zds.messages import (
    Ack,
    AddWorkload,
    DelWorkload,
    SnapshotSent,
    WorkloadInfo,
    WorkloadRequest,
    WorkloadResponse,
    ZdsError,
    ZdsHello,
    encode,
)
from zds.server import ZdsNack, ZdsServer, ZdsUnavailable

INFO = WorkloadInfo("pod", "ns", "sa")


class RawTunnel:
    """A tunnel spoken by hand: every packet is chosen by the test."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @classmethod
    async def connect(cls, path: Path, hello: bytes | None = encode(ZdsHello())) -> RawTunnel:
        tunnel = cls(await wire.connect(path))
        if hello is not None:
            await wire.send_packet(tunnel.sock, hello)
        return tunnel

    async def request(self) -> WorkloadRequest:
        got = await wire.recv_request(self.sock)
        assert got is not None, "the agent closed the connection"
        request, fd = got
        wire.close_fd(fd)
        return request

    async def request_uid(self) -> str:
        payload = (await self.request()).payload
        assert not isinstance(payload, SnapshotSent), "expected a request naming a pod"
        return payload.uid

    async def ack(self, error: str = "") -> None:
        await wire.send_message(self.sock, WorkloadResponse(Ack(error)))

    async def snapshot(self) -> list[WorkloadRequest]:
        """Take and ack the whole snapshot."""
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


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "ztunnel.sock"


@pytest.fixture
def netns(tmp_path: Path) -> str:
    p = tmp_path / "netns-stand-in"
    p.write_text("")
    return str(p)


async def agent_at(path: Path) -> ZdsServer:
    server = ZdsServer(path)
    await server.start()
    return server


async def ready_tunnel(agent: ZdsServer, path: Path) -> RawTunnel:
    want = agent.tunnels + 1
    tunnel = await RawTunnel.connect(path)
    await tunnel.snapshot()
    await until(lambda: agent.tunnels == want, "the tunnel to be ready")
    return tunnel


@pytest.mark.parametrize(
    ("hello", "logged"),
    [
        (b"\xff\xff", "zds connection failed"),  # undecodable
        (b"\x08\x00", "zds hello without a version"),  # version NOT_USED
        (encode(WorkloadResponse(Ack())), "zds connection failed"),  # not a hello
    ],
)
def test_a_bad_hello_closes_that_connection_only(path, netns, hello, logged):
    async def main():
        agent = await agent_at(path)
        with capture_logs() as logs:
            bad = await RawTunnel.connect(path, hello)
            assert await bad.closed_by_agent()
        assert any(e["event"].startswith(logged) for e in logs), logs
        good = await ready_tunnel(agent, path)
        adding = asyncio.ensure_future(agent.add("p", INFO, netns))
        assert (await good.request()).payload == AddWorkload("p", INFO)
        await good.ack()
        await adding
        bad.close()
        good.close()
        await agent.close()

    run(main)


def test_an_unknown_hello_version_is_accepted_as_upstream_does(path):
    async def main():
        agent = await agent_at(path)
        tunnel = await RawTunnel.connect(path, encode(ZdsHello(2)))
        await tunnel.snapshot()
        await until(lambda: agent.tunnels == 1, "the tunnel")
        tunnel.close()
        await agent.close()

    run(main)


def test_a_tunnel_that_never_says_hello_is_dropped(path, monkeypatch):
    monkeypatch.setattr(zds_server, "HELLO_TIMEOUT", 0.05)

    async def main():
        agent = await agent_at(path)
        silent = await RawTunnel.connect(path, hello=None)
        assert await silent.closed_by_agent()
        assert agent.tunnels == 0
        silent.close()
        await agent.close()

    run(main)


def test_an_unsolicited_message_closes_the_connection(path):
    async def main():
        agent = await agent_at(path)
        tunnel = await ready_tunnel(agent, path)
        with capture_logs() as logs:
            await tunnel.ack()  # nobody asked
            assert await tunnel.closed_by_agent()
        await until(lambda: agent.tunnels == 0, "the agent to drop it")
        assert any(e["event"] == "unexpected message from the tunnel; closing" for e in logs)
        tunnel.close()
        await agent.close()

    run(main)


def test_a_malformed_answer_closes_the_connection_and_the_add_fails_over(path, netns):
    async def main():
        before = open_fds()
        agent = await agent_at(path)
        old = await ready_tunnel(agent, path)
        new = await ready_tunnel(agent, path)
        adding = asyncio.ensure_future(agent.add("p", INFO, netns))
        await new.request()
        await wire.send_packet(new.sock, b"\x0a\x09garbage")  # truncated
        assert await new.closed_by_agent()
        # The add was not lost: the remaining (now newest) tunnel gets it.
        assert (await old.request()).payload == AddWorkload("p", INFO)
        await old.ack()
        await adding
        assert agent.acked("p") and agent.tunnels == 1
        old.close()
        new.close()
        await agent.close()
        assert open_fds() == before

    run(main)


def test_an_answer_carrying_an_fd_closes_the_connection_without_leaking_it(path, netns):
    async def main():
        before = open_fds()
        agent = await agent_at(path)
        tunnel = await ready_tunnel(agent, path)
        adding = asyncio.ensure_future(agent.add("p", INFO, netns))
        await tunnel.request()
        with opened("/dev/null") as f:
            await wire.send_packet(tunnel.sock, encode(WorkloadResponse(Ack())), f)
        assert await tunnel.closed_by_agent()
        with pytest.raises(ZdsUnavailable):
            await adding
        tunnel.close()
        await agent.close()
        assert open_fds() == before

    run(main)


def test_a_late_ack_is_matched_to_its_own_request(path, netns):
    async def main():
        acked: list[str] = []
        agent = ZdsServer(path, on_acked=acked.append)
        await agent.start()
        tunnel = await ready_tunnel(agent, path)
        with pytest.raises(TimeoutError):
            await agent.add("slow", INFO, netns, timeout=0.05)
        assert await tunnel.request_uid() == "slow"
        second = asyncio.ensure_future(agent.add("next", INFO, netns))
        await asyncio.sleep(0.01)
        await tunnel.ack()  # the late answer to "slow"
        await until(lambda: acked == ["slow"], "the late ack to land on 'slow'")
        assert agent.acked("slow") and not second.done()
        assert await tunnel.request_uid() == "next"
        await tunnel.ack("cannot")
        with pytest.raises(ZdsNack, match="cannot"):
            await second
        assert not agent.acked("next")
        tunnel.close()
        await agent.close()

    run(main)


def test_a_refused_snapshot_pod_does_not_stop_the_snapshot(path, netns):
    async def main():
        agent = ZdsServer(path)
        for uid in ("a", "b"):
            with pytest.raises(ZdsUnavailable):
                await agent.add(uid, INFO, netns)
        await agent.start()
        tunnel = await RawTunnel.connect(path)
        assert await tunnel.request_uid() == "a"
        await tunnel.ack("no room")
        assert await tunnel.request_uid() == "b"
        await tunnel.ack()
        assert isinstance((await tunnel.request()).payload, SnapshotSent)
        await tunnel.ack()
        await until(lambda: agent.tunnels == 1, "the snapshot to end")
        assert not agent.acked("a") and agent.acked("b")
        tunnel.close()
        await agent.close()

    run(main)


def test_a_tunnel_too_slow_with_its_snapshot_is_dropped(path, netns, monkeypatch):
    monkeypatch.setattr(zds_server, "SNAPSHOT_ACK_TIMEOUT", 0.05)

    async def main():
        agent = ZdsServer(path)
        with pytest.raises(ZdsUnavailable):
            await agent.add("a", INFO, netns)
        await agent.start()
        tunnel = await RawTunnel.connect(path)
        await tunnel.request()  # and never answer
        assert await tunnel.closed_by_agent()
        assert agent.tunnels == 0 and agent.known() == ["a"]
        tunnel.close()
        await agent.close()

    run(main)


def test_delete_reaches_every_tunnel_and_reports_refusals(path, netns):
    async def main():
        agent = await agent_at(path)
        one = await ready_tunnel(agent, path)
        two = await ready_tunnel(agent, path)
        deleting = asyncio.ensure_future(agent.delete("p"))
        assert (await one.request()).payload == DelWorkload("p")
        assert (await two.request()).payload == DelWorkload("p")
        await one.ack()
        await two.ack("busy")
        with pytest.raises(ZdsNack, match="busy"):
            await deleting
        # A tunnel that leaves mid-delete has nothing left to stop: not an error.
        deleting = asyncio.ensure_future(agent.delete("q"))
        await one.request()
        await two.request()
        two.close()
        await one.ack()
        await deleting
        one.close()
        await agent.close()

    run(main)


def test_add_refuses_bad_input_before_remembering_anything(path, tmp_path):
    async def main():
        agent = await agent_at(path)
        with pytest.raises(FileNotFoundError):
            await agent.add("p", INFO, str(tmp_path / "no-such-netns"))
        with pytest.raises(ZdsError, match="must not be empty"):
            await agent.add("", INFO, "/proc/self/ns/net")
        with pytest.raises(ZdsError, match="not valid text"):
            await agent.add("\ud800", INFO, "/proc/self/ns/net")
        assert agent.known() == []
        await agent.close()

    run(main)


def test_close_tells_tunnels_and_removes_only_its_own_socket(path):
    async def main():
        agent = await agent_at(path)
        tunnel = await ready_tunnel(agent, path)
        await agent.close()
        assert await tunnel.closed_by_agent()
        assert not path.exists()
        tunnel.close()
        # A stale file is replaced on start, and a successor's socket survives our close.
        first = await agent_at(path)
        second = await agent_at(path)
        await first.close()
        assert path.exists()
        await second.close()
        assert not path.exists()

    run(main)


def test_callbacks_that_raise_do_not_hurt_the_agent(path, netns):
    def boom(_: object) -> None:
        raise RuntimeError("callback bug")

    async def main():
        agent = ZdsServer(path, on_acked=boom, on_tunnels_changed=boom)
        await agent.start()
        tunnel = await ready_tunnel(agent, path)
        adding = asyncio.ensure_future(agent.add("p", INFO, netns))
        await tunnel.request()
        await tunnel.ack()
        await adding
        assert agent.acked("p")
        tunnel.close()
        await agent.close()

    run(main)


def test_the_socket_is_private(path):
    async def main():
        agent = await agent_at(path)
        assert os.stat(path).st_mode & 0o777 == 0o600
        await agent.close()

    run(main)
