"""The agent's ZdsServer against tunnels driven by hand over a real socket: what a real
tunnel would never send (garbage, no hello, unsolicited or malformed answers, fds),
answers that come late or never, and tunnels that vanish mid-request."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from tests.support.aio import Loop, wait_until
from tests.support.fds import open_fds, opened
from tests.support.zds import HandTunnel, ready_tunnel
from zds import server as zds_server
from zds import wire
from zds.messages import (
    Ack,
    AddWorkload,
    DelWorkload,
    SnapshotSent,
    WorkloadInfo,
    WorkloadResponse,
    ZdsError,
    ZdsHello,
    encode,
)
from zds.server import ZdsNack, ZdsServer, ZdsUnavailable

INFO = WorkloadInfo("pod", "ns", "sa")


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "ztunnel.sock"


@pytest.fixture
def netns(tmp_path: Path) -> str:
    p = tmp_path / "netns-stand-in"
    p.write_text("")
    return str(p)


async def agent_at(aio: Loop, path: Path) -> ZdsServer:
    server = aio.closing(ZdsServer(path))
    await server.start()
    return server


@pytest.mark.parametrize(
    ("hello", "logged"),
    [
        (b"\xff\xff", "zds connection failed"),  # undecodable
        (b"\x08\x00", "zds hello without a version"),  # version NOT_USED
        (encode(WorkloadResponse(Ack())), "zds connection failed"),  # not a hello
    ],
)
def test_a_bad_hello_closes_that_connection_only(aio, path, netns, hello, logged):
    async def main():
        agent = await agent_at(aio, path)
        with capture_logs() as logs:
            bad = aio.closing(await HandTunnel.connect(path, hello))
            assert await bad.closed_by_agent()
        assert any(e["event"].startswith(logged) for e in logs), logs
        good = aio.closing(await ready_tunnel(agent, path))
        adding = asyncio.ensure_future(agent.add("p", INFO, netns))
        assert (await good.request()).payload == AddWorkload("p", INFO)
        await good.ack()
        await adding

    aio.run(main)


def test_an_unknown_hello_version_is_accepted_as_upstream_does(aio, path):
    async def main():
        agent = await agent_at(aio, path)
        tunnel = aio.closing(await HandTunnel.connect(path, encode(ZdsHello(2))))
        await tunnel.snapshot()
        await wait_until(lambda: agent.tunnels == 1, "the tunnel")

    aio.run(main)


def test_a_tunnel_that_never_says_hello_is_dropped(aio, path, monkeypatch):
    monkeypatch.setattr(zds_server, "HELLO_TIMEOUT", 0.05)

    async def main():
        agent = await agent_at(aio, path)
        silent = aio.closing(await HandTunnel.connect(path, hello=None))
        assert await silent.closed_by_agent()
        assert agent.tunnels == 0

    aio.run(main)


def test_an_unsolicited_message_closes_the_connection(aio, path):
    async def main():
        agent = await agent_at(aio, path)
        tunnel = aio.closing(await ready_tunnel(agent, path))
        with capture_logs() as logs:
            await tunnel.ack()  # nobody asked
            assert await tunnel.closed_by_agent()
        await wait_until(lambda: agent.tunnels == 0, "the agent to drop it")
        assert any(e["event"] == "unexpected message from the tunnel; closing" for e in logs)

    aio.run(main)


def test_a_malformed_answer_closes_the_connection_and_the_add_fails_over(aio, path, netns):
    async def main():
        before = open_fds()
        agent = await agent_at(aio, path)
        old = aio.closing(await ready_tunnel(agent, path))
        new = aio.closing(await ready_tunnel(agent, path))
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

    aio.run(main)


def test_an_answer_carrying_an_fd_closes_the_connection_without_leaking_it(aio, path, netns):
    async def main():
        before = open_fds()
        agent = await agent_at(aio, path)
        tunnel = aio.closing(await ready_tunnel(agent, path))
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

    aio.run(main)


def test_a_late_ack_is_matched_to_its_own_request(aio, path, netns):
    async def main():
        acked: list[str] = []
        agent = aio.closing(ZdsServer(path, on_acked=acked.append))
        await agent.start()
        tunnel = aio.closing(await ready_tunnel(agent, path))
        with pytest.raises(TimeoutError):
            await agent.add("slow", INFO, netns, timeout=0.05)
        assert await tunnel.request_uid() == "slow"
        second = asyncio.ensure_future(agent.add("next", INFO, netns))
        await asyncio.sleep(0.01)
        await tunnel.ack()  # the late answer to "slow"
        await wait_until(lambda: acked == ["slow"], "the late ack to land on 'slow'")
        assert agent.acked("slow") and not second.done()
        assert await tunnel.request_uid() == "next"
        await tunnel.ack("cannot")
        with pytest.raises(ZdsNack, match="cannot"):
            await second
        assert not agent.acked("next")

    aio.run(main)


def test_a_refused_snapshot_pod_does_not_stop_the_snapshot(aio, path, netns):
    async def main():
        agent = aio.closing(ZdsServer(path))
        for uid in ("a", "b"):
            with pytest.raises(ZdsUnavailable):
                await agent.add(uid, INFO, netns)
        await agent.start()
        tunnel = aio.closing(await HandTunnel.connect(path))
        assert await tunnel.request_uid() == "a"
        await tunnel.ack("no room")
        assert await tunnel.request_uid() == "b"
        await tunnel.ack()
        assert isinstance((await tunnel.request()).payload, SnapshotSent)
        await tunnel.ack()
        await wait_until(lambda: agent.tunnels == 1, "the snapshot to end")
        assert not agent.acked("a") and agent.acked("b")

    aio.run(main)


def test_a_tunnel_too_slow_with_its_snapshot_is_dropped(aio, path, netns, monkeypatch):
    monkeypatch.setattr(zds_server, "SNAPSHOT_ACK_TIMEOUT", 0.05)

    async def main():
        agent = aio.closing(ZdsServer(path))
        with pytest.raises(ZdsUnavailable):
            await agent.add("a", INFO, netns)
        await agent.start()
        tunnel = aio.closing(await HandTunnel.connect(path))
        await tunnel.request()  # and never answer
        assert await tunnel.closed_by_agent()
        assert agent.tunnels == 0 and agent.known() == ["a"]

    aio.run(main)


def test_delete_reaches_every_tunnel_and_reports_refusals(aio, path, netns):
    async def main():
        agent = await agent_at(aio, path)
        one = aio.closing(await ready_tunnel(agent, path))
        two = aio.closing(await ready_tunnel(agent, path))
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

    aio.run(main)


def test_add_refuses_bad_input_before_remembering_anything(aio, path, tmp_path):
    async def main():
        agent = await agent_at(aio, path)
        with pytest.raises(FileNotFoundError):
            await agent.add("p", INFO, str(tmp_path / "no-such-netns"))
        with pytest.raises(ZdsError, match="must not be empty"):
            await agent.add("", INFO, "/proc/self/ns/net")
        with pytest.raises(ZdsError, match="not valid text"):
            await agent.add("\ud800", INFO, "/proc/self/ns/net")
        assert agent.known() == []

    aio.run(main)


def test_close_tells_tunnels_and_removes_only_its_own_socket(aio, path):
    async def main():
        agent = await agent_at(aio, path)
        tunnel = aio.closing(await ready_tunnel(agent, path))
        await agent.close()
        assert await tunnel.closed_by_agent()
        assert not path.exists()
        tunnel.close()
        # A stale file is replaced on start, and a successor's socket survives our close.
        first = await agent_at(aio, path)
        second = await agent_at(aio, path)
        await first.close()
        assert path.exists()
        await second.close()
        assert not path.exists()

    aio.run(main)


def test_callbacks_that_raise_do_not_hurt_the_agent(aio, path, netns):
    def boom(_: object) -> None:
        raise RuntimeError("callback bug")

    async def main():
        agent = aio.closing(ZdsServer(path, on_acked=boom, on_tunnels_changed=boom))
        await agent.start()
        tunnel = aio.closing(await ready_tunnel(agent, path))
        adding = asyncio.ensure_future(agent.add("p", INFO, netns))
        await tunnel.request()
        await tunnel.ack()
        await adding
        assert agent.acked("p")

    aio.run(main)


def test_the_socket_is_private(aio, path):
    async def main():
        await agent_at(aio, path)
        assert os.stat(path).st_mode & 0o777 == 0o600

    aio.run(main)
