"""The ZDS socket's local trust: only the allowed uid is served, new connections are
rate-limited, refusals are counted and never stop the agent, and the tunnel only talks to
an agent of the allowed uid. Plus accept under a real EMFILE, in a subprocess."""

from __future__ import annotations

import os
import socket
import textwrap
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from meshcore.localtrust import TokenBucket
from tests.support.aio import wait_until
from tests.support.child import FD_HOG, run_child
from tests.support.otheruser import as_nobody, reachable_dir
from tests.support.zds import HandTunnel, RecordingPods, ready_tunnel
from zds.messages import Version, ZdsHello, encode
from zds.server import ZdsServer
from ztunnel.zds_client import ZdsClient

OTHER_UID = os.geteuid() + 1


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "ztunnel.sock"


def test_a_peer_of_another_uid_is_closed_counted_and_logged(aio, path):
    async def main():
        agent = aio.closing(ZdsServer(path, allowed_uids=frozenset({OTHER_UID})))
        await agent.start()
        with capture_logs() as logs:
            for _ in range(3):
                refused = aio.closing(await HandTunnel.connect(path))
                assert await refused.closed_by_agent()
        assert agent.refused == {"uid": 3, "rate": 0}
        assert agent.tunnels == 0
        lines = [e for e in logs if e["event"] == "zds peer refused"]
        assert len(lines) == 1, "refusals are logged at most once per interval"
        assert f"peer uid {os.geteuid()}" in lines[0]["reason"]
        # The agent is unharmed: once its uid is allowed, the same peer is served.
        agent.allowed_uids = frozenset({os.geteuid()})
        aio.closing(await ready_tunnel(agent, path))

    aio.run(main)


def test_new_connections_past_the_rate_are_closed(aio, path):
    async def main():
        # A clock that never moves: the burst is all there is.
        agent = aio.closing(ZdsServer(path, accept_rate=TokenBucket(1.0, 2), clock=lambda: 0.0))
        await agent.start()
        first = aio.closing(await ready_tunnel(agent, path))
        second = aio.closing(await ready_tunnel(agent, path))
        third = aio.closing(await HandTunnel.connect(path))
        assert await third.closed_by_agent()
        assert agent.refused == {"uid": 0, "rate": 1}
        assert agent.tunnels == 2
        del first, second

    aio.run(main)


def test_the_tunnel_refuses_an_agent_of_another_uid(aio, path):
    async def main():
        agent = aio.closing(ZdsServer(path))
        await agent.start()
        pods = RecordingPods()
        client = aio.closing(
            ZdsClient(path, pods, backoff_initial=0.01, agent_uids=frozenset({OTHER_UID}))
        )
        with capture_logs() as logs:
            await client.start()
            await wait_until(
                lambda: "not the node agent" in pods.enrolment_detail, "the tunnel to refuse"
            )
        assert client.sessions == 0 and agent.tunnels == 0
        assert any(
            e["event"] == "node agent unreachable; retrying" and "uid" in e["error"] for e in logs
        )

    aio.run(main)


CLOSED, SERVED = 10, 11


def _hello_as_other_user(path: Path) -> int:
    """In the child: connect, say hello, and report whether the agent answered."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(20)
    s.connect(str(path))
    try:
        s.send(encode(ZdsHello(Version.V1)))
        got = s.recv(65536)
    except (ConnectionResetError, BrokenPipeError):
        got = b""
    return CLOSED if got == b"" else SERVED


@pytest.mark.netns  # needs root to run a client as another user
def test_a_real_process_of_another_user_is_refused(aio):
    async def main(sock: Path):
        agent = aio.closing(ZdsServer(sock))
        await agent.start()
        # A loosened mode (a mistake, a volume shared with another container): the file
        # no longer keeps nobody out; the uid check still does.
        os.chmod(sock, 0o666)
        assert await as_nobody(lambda: _hello_as_other_user(sock)) == CLOSED
        assert agent.refused["uid"] == 1
        aio.closing(await ready_tunnel(agent, sock))  # and the agent serves on

    with reachable_dir() as d:
        aio.run(main(d / "ztunnel.sock"))


_EMFILE_CHILD = FD_HOG + textwrap.dedent(
    """
    import asyncio, json, os, resource, socket, sys
    from zds import wire
    from zds.server import ZdsServer

    attempts = [0]
    real_accept = socket.socket.accept

    def counting_accept(self):
        attempts[0] += 1
        return real_accept(self)

    socket.socket.accept = counting_accept

    async def main(path):
        agent = ZdsServer(path)
        await agent.start()
        client = await wire.connect(path)  # its fd exists before the table is full
        hog = fill_fd_table()
        attempts[0] = 0
        await wire.send_packet(client, bytes([8, 1]))  # hello: the listener is readable
        # Out of fds for 1.5 s of loop time: a spinning loop makes thousands of attempts.
        await asyncio.sleep(1.5)
        starved = attempts[0]
        free(hog)
        got = await asyncio.wait_for(wire.recv_request(client), 30)
        print("RESULT", json.dumps({"starved": starved, "served": got is not None}))
        client.close()
        await agent.close()

    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    asyncio.run(main(sys.argv[1]))
    """
)


def test_the_accept_loop_survives_emfile_without_spinning(tmp_path):
    result, done = run_child(_EMFILE_CHILD, str(tmp_path / "z.sock"))
    assert result["served"], "the connection is taken once fds are free again"
    assert 1 <= result["starved"] < 50, result
    assert "cannot accept: out of resources" in done.stdout + done.stderr
