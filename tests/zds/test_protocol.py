"""ZDS end to end: the agent's real ZdsServer and the tunnel's real ZdsClient over a real
SEQPACKET socket, in one process. The tunnel's NodeProxy is replaced by a recording pod
manager (`tests.support.zds.RecordingPods`), because starting real listeners needs a
netns per pod; a plain file per pod stands in for its netns (every fd is still really
passed). The test with a real NodeProxy in a real netns is in
tests/ztunnel/test_zds_client.py."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.support.aio import Loop, wait_until
from tests.support.fds import open_fds
from tests.support.zds import RecordingPods
from zds.messages import WorkloadInfo
from zds.server import ZdsNack, ZdsServer, ZdsUnavailable
from ztunnel.zds_client import ZdsClient


def info(name: str) -> WorkloadInfo:
    return WorkloadInfo(name, "default", "sa-" + name)


class Node:
    """One node: an agent socket path, stand-in netns files, agents and tunnels. What it
    starts is closed when the test ends (the `aio` fixture), pass or fail."""

    def __init__(self, root: Path, aio: Loop) -> None:
        self.root = root
        self.aio = aio
        self.sock = root / "ztunnel.sock"
        self.acked: list[str] = []
        self.counts: list[int] = []

    def netns(self, pod: str) -> str:
        path = self.root / f"netns-{pod}"
        if not path.exists():
            path.write_text(pod)
        return str(path)

    def ino(self, pod: str) -> int:
        return Path(self.netns(pod)).stat().st_ino

    def lose_netns(self, pod: str) -> None:
        Path(self.netns(pod)).unlink()

    async def agent(self, *known: str) -> ZdsServer:
        """A started agent; it knew `known` before it listened (adds with no tunnel yet:
        refused, but remembered for the first snapshot)."""
        server = self.aio.closing(
            ZdsServer(self.sock, on_acked=self.acked.append, on_tunnels_changed=self.counts.append)
        )
        for pod in known:
            with pytest.raises(ZdsUnavailable):
                await server.add(pod, info(pod), self.netns(pod))
        await server.start()
        return server

    async def connected(self) -> tuple[ZdsServer, ZdsClient, RecordingPods]:
        """An agent and one tunnel through the whole handshake."""
        agent = await self.agent()
        client, pods = await self.tunnel()
        await wait_until(lambda: agent.tunnels == 1, "the tunnel")
        return agent, client, pods

    async def tunnel(self, pods: RecordingPods | None = None) -> tuple[ZdsClient, RecordingPods]:
        pods = self.aio.closing(pods if pods is not None else RecordingPods())
        client = self.aio.closing(
            ZdsClient(self.sock, pods, backoff_initial=0.005, backoff_max=0.05)
        )
        await client.start()
        return client, pods


@pytest.fixture
def node(tmp_path: Path, aio: Loop) -> Node:
    return Node(tmp_path, aio)


def test_snapshot_carries_pods_added_while_no_tunnel_was_there__recording_pods(aio, node):
    async def main():
        before = open_fds()
        agent = await node.agent("a", "b")
        assert agent.known() == ["a", "b"] and agent.tunnels == 0
        client, pods = await node.tunnel()
        await wait_until(lambda: agent.tunnels == 1, "the snapshot")
        assert pods.calls == [("add", "a"), ("add", "b"), ("keep_only", {"a", "b"})]
        assert sorted(node.acked) == ["a", "b"] and agent.acked("a") and agent.acked("b")
        assert pods.enrolment_source == "zds" and pods.enrolment_synced
        assert pods.serving["a"].info == info("a")
        # The netns arrived as an fd on the very file the agent named.
        assert pods.serving["a"].netns_fd is not None
        assert f"netns:[{node.ino('a')}]" in pods.serving["a"].netns
        await client.close()
        await agent.close()
        pods.close()
        assert open_fds() == before

    aio.run(main)


def test_add_is_acked_only_once_the_pod_started__recording_pods(aio, node):
    async def main():
        agent, _, pods = await node.connected()
        gate = pods.hold["c"] = asyncio.Event()
        adding = asyncio.ensure_future(agent.add("c", info("c"), node.netns("c")))
        await wait_until(lambda: ("add", "c") in pods.calls, "the add to arrive")
        await asyncio.sleep(0.02)
        assert not adding.done() and not agent.acked("c") and node.acked == []
        gate.set()
        await adding
        assert agent.acked("c") and node.acked == ["c"] and "c" in pods.serving

    aio.run(main)


def test_a_failed_start_is_a_nack_with_the_reason__recording_pods(aio, node):
    async def main():
        agent, _, pods = await node.connected()
        pods.fail["bad"] = "no certificate: CA unreachable"
        with pytest.raises(ZdsNack, match="failure to start proxy: no certificate") as e:
            await agent.add("bad", info("bad"), node.netns("bad"))
        assert "CA unreachable" in e.value.error
        assert not agent.acked("bad") and node.acked == []
        # The connection is fine: the next add works.
        await agent.add("good", info("good"), node.netns("good"))
        assert agent.acked("good")

    aio.run(main)


def test_delete_stops_the_pod_and_the_next_snapshot_omits_it__recording_pods(aio, node):
    async def main():
        agent, client, pods = await node.connected()
        await agent.add("a", info("a"), node.netns("a"))
        await agent.add("b", info("b"), node.netns("b"))
        await agent.delete("a")
        assert set(pods.serving) == {"b"} and not agent.acked("a")
        assert pods.calls[-1] == ("remove", "a")
        await client.close()
        await wait_until(lambda: agent.tunnels == 0, "the tunnel to leave")
        await agent.delete("b")  # no tunnel to tell: just forgotten
        assert agent.known() == []
        _, pods2 = await node.tunnel()
        await wait_until(lambda: agent.tunnels == 1, "the new tunnel")
        assert pods2.calls == [("keep_only", set())]

    aio.run(main)


def test_agent_restart_while_the_tunnel_runs__recording_pods(aio, node):
    async def main():
        before = open_fds()
        agent, client, pods = await node.connected()
        for pod in "abc":
            await agent.add(pod, info(pod), node.netns(pod))
        assert pods.starts == ["a", "b", "c"]
        await agent.close()
        await wait_until(lambda: "unreachable" in pods.enrolment_detail, "the tunnel to notice")
        assert not pods.enrolment_synced
        assert set(pods.serving) == {"a", "b", "c"}  # nothing drained while the agent is away

        # The new agent knows b and c (a was deleted meanwhile) and a new pod d.
        agent2 = await node.agent("b", "c", "d")
        await wait_until(lambda: agent2.tunnels == 1, "the tunnel to reconnect")
        assert client.sessions == 2 and pods.enrolment_synced
        assert pods.calls[-4:] == [
            ("add", "b"),
            ("add", "c"),
            ("add", "d"),
            ("keep_only", {"b", "c", "d"}),
        ]
        assert set(pods.serving) == {"b", "c", "d"}
        # b and c kept their proxies (same netns); only d started.
        assert pods.starts == ["a", "b", "c", "d"]
        assert agent2.acked("b") and agent2.acked("d")
        await client.close()
        await agent2.close()
        pods.close()
        assert open_fds() == before

    aio.run(main)


def test_a_pod_whose_netns_the_new_agent_cannot_open_is_kept__recording_pods(aio, node):
    async def main():
        agent, _, pods = await node.connected()
        await agent.add("a", info("a"), node.netns("a"))
        await agent.add("b", info("b"), node.netns("b"))
        await agent.close()
        agent2 = aio.closing(ZdsServer(node.sock))
        for pod in "ab":
            with pytest.raises(ZdsUnavailable):
                await agent2.add(pod, info(pod), node.netns(pod))
        node.lose_netns("a")  # by the time the tunnel is back, a's netns cannot be opened
        await agent2.start()
        await wait_until(lambda: agent2.tunnels == 1, "the tunnel to reconnect")
        # Upstream's answer is KeepWorkload (no fd, so nothing reaches the pod manager):
        # a is named in the snapshot and the tunnel does not drain what it serves.
        assert pods.calls == [
            ("keep_only", set()),
            ("add", "a"),
            ("add", "b"),
            ("add", "b"),
            ("keep_only", {"a", "b"}),
        ]
        assert set(pods.serving) == {"a", "b"}
        assert not agent2.acked("a") and agent2.acked("b")

    aio.run(main)


def test_tunnel_restart_while_the_agent_runs__recording_pods(aio, node):
    async def main():
        before = open_fds()
        agent, client, pods = await node.connected()
        await agent.add("a", info("a"), node.netns("a"))
        await agent.add("b", info("b"), node.netns("b"))
        await client.close()
        pods.close()  # the process is gone, and its fds with it
        await wait_until(lambda: agent.tunnels == 0, "the agent to notice")
        assert not agent.acked("a")
        client2, pods2 = await node.tunnel()
        await wait_until(lambda: agent.tunnels == 1, "the new tunnel")
        assert pods2.calls == [("add", "a"), ("add", "b"), ("keep_only", {"a", "b"})]
        assert agent.acked("a") and agent.acked("b")
        assert node.counts == [1, 0, 1]
        await client2.close()
        await agent.close()
        pods2.close()
        assert open_fds() == before

    aio.run(main)


def test_two_tunnels_adds_go_to_the_newest_deletes_to_both__recording_pods(aio, node):
    async def main():
        agent, _, old_pods = await node.connected()
        await agent.add("a", info("a"), node.netns("a"))
        new, new_pods = await node.tunnel()  # an upgrade: both connected
        await wait_until(lambda: agent.tunnels == 2, "the new tunnel")
        assert new_pods.calls == [("add", "a"), ("keep_only", {"a"})]
        await agent.add("b", info("b"), node.netns("b"))
        assert "b" in new_pods.serving and "b" not in old_pods.serving
        await agent.delete("a")
        assert ("remove", "a") in old_pods.calls and ("remove", "a") in new_pods.calls
        assert old_pods.serving == {} and set(new_pods.serving) == {"b"}
        # The newest leaves: the older one is the newest again and takes new pods.
        await new.close()
        new_pods.close()
        await wait_until(lambda: agent.tunnels == 1, "the new tunnel to leave")
        assert not agent.acked("b")  # the remaining tunnel never had it
        await agent.add("c", info("c"), node.netns("c"))
        assert "c" in old_pods.serving and agent.acked("c")
        assert node.counts == [1, 2, 1]

    aio.run(main)


def test_a_tunnel_leaving_mid_snapshot_breaks_nothing__recording_pods(aio, node):
    async def main():
        before = open_fds()
        agent = await node.agent("a", "b")
        pods = RecordingPods()
        pods.hold["b"] = asyncio.Event()  # the tunnel stalls on b and then dies
        client, _ = await node.tunnel(pods)
        await wait_until(lambda: ("add", "b") in pods.calls, "the snapshot to reach b")
        assert agent.tunnels == 0
        await client.close()
        pods.close()
        await wait_until(lambda: agent._tunnels == [], "the agent to notice")
        assert agent.tunnels == 0 and node.counts == []
        client2, pods2 = await node.tunnel()
        await wait_until(lambda: agent.tunnels == 1, "the next tunnel")
        assert set(pods2.serving) == {"a", "b"} and agent.acked("b")
        await client2.close()
        await agent.close()
        pods2.close()
        assert open_fds() == before

    aio.run(main)


def test_an_add_during_a_snapshot_joins_it_and_is_not_sent_twice__recording_pods(aio, node):
    async def main():
        agent = await node.agent("a")
        pods = RecordingPods()
        gate = pods.hold["a"] = asyncio.Event()
        _ = await node.tunnel(pods)
        await wait_until(lambda: ("add", "a") in pods.calls, "the snapshot to start")
        adding = asyncio.ensure_future(agent.add("late", info("late"), node.netns("late")))
        await asyncio.sleep(0.02)
        gate.set()
        await adding
        assert pods.calls == [("add", "a"), ("add", "late"), ("keep_only", {"a", "late"})]
        assert agent.acked("late") and agent.tunnels == 1

    aio.run(main)


def test_the_same_pod_added_again_with_a_new_netns_replaces_it__recording_pods(aio, node):
    async def main():
        agent, _, pods = await node.connected()
        await agent.add("a", info("a"), node.netns("a"))
        await agent.add("a", info("a"), node.netns("a"))  # same netns: nothing new
        assert pods.starts == ["a"]
        await agent.add("a", info("a"), node.netns("a-recreated"))  # a new sandbox
        assert pods.starts == ["a", "a"]
        assert f"netns:[{node.ino('a-recreated')}]" in pods.serving["a"].netns

    aio.run(main)
