"""The tunnel's ZDS client.

- Against an agent driven by hand over a real socket (RawAgent): everything a real agent
  would never send, the agent going away and coming back. The pod manager there is the
  recording stand-in `tests.support.zds.RecordingPods` (named in each test).
- With the real NodeProxy and the real agent: pending pods, failed starts (nack), fd
  ownership; and, in a real network namespace (netns tier), a pod served from the fd.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

import nsutil
from meshcore.identity.certs import CertificateManager
from meshcore.identity.certworker_client import CertWorkerClient
from meshcore.state import MeshState
from tests.support.aio import Loop, wait_until
from tests.support.certs import InProcessCA
from tests.support.fds import new_fds, open_fds, opened
from tests.support.mesh import ips, mesh_state, workload
from tests.support.netns import throwaway_netns
from tests.support.zds import INFO, HandAgent, RecordingPods
from zds.messages import (
    AddWorkload,
    DelWorkload,
    KeepWorkload,
    SnapshotSent,
    Version,
    WorkloadRequest,
    ZdsHello,
    encode,
)
from zds.server import ZdsNack, ZdsServer
from ztunnel.config import EnvConfigError, parse_config
from ztunnel.inpod import PodState
from ztunnel.node import NodeProxy
from ztunnel.zds_client import MAX_ERROR_BYTES, ZdsClient

NODE = "node1"


def synced(pods: RecordingPods) -> bool:
    return pods.enrolment_synced  # read through a call: it changes behind awaits


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "ztunnel.sock"


async def client_for(aio: Loop, path: Path, pods: object) -> ZdsClient:
    client = aio.closing(ZdsClient(path, pods, backoff_initial=0.002, backoff_max=0.01))  # type: ignore[arg-type]
    await client.start()
    return client


# ---- against a hand-driven agent, with the recording pod manager ---------------------------


def test_hello_then_snapshot_makes_the_tunnel_synced__recording_pods(aio, sock_path):
    async def main():
        agent = aio.closing(HandAgent(sock_path))
        pods = aio.closing(RecordingPods())
        client = await client_for(aio, sock_path, pods)
        assert await agent.accept() == ZdsHello(Version.V1)
        assert not synced(pods) and pods.enrolment_source == "zds"
        assert await agent.add("a") == ""
        assert await agent.exchange(SnapshotSent()) == ""
        assert synced(pods) and pods.calls == [("add", "a"), ("keep_only", {"a"})]
        await client.close()
        assert await agent.closed_by_tunnel()

    aio.run(main)


@pytest.mark.parametrize(
    ("packet", "with_fd", "says"),
    [
        (b"\xff\xff", False, "failure to read message: truncated varint"),
        (b"\x0a\x00", False, "failure to read message: AddWorkload without a netns fd"),
        (encode(WorkloadRequest(DelWorkload("a"))), True, "DelWorkload must not carry an fd"),
        (encode(WorkloadRequest(SnapshotSent())), True, "SnapshotSent must not carry an fd"),
        (b"", False, "has no payload"),  # via a valid-but-empty payload below
        (b"x" * (70 * 1024), True, "failure to read message: packet truncated"),
        (encode(WorkloadRequest(AddWorkload("a"))), True, "workload_info is required"),
        (encode(WorkloadRequest(AddWorkload("", INFO))), True, "AddWorkload without a uid"),
    ],
)
def test_bad_requests_get_a_nack_then_the_connection_closes__recording_pods(
    aio, sock_path, packet, with_fd, says
):
    if packet == b"":
        packet = b"\x3a\x00"  # only an unknown field: a request without a payload

    async def main():
        before = open_fds()
        agent = aio.closing(HandAgent(sock_path))
        pods = aio.closing(RecordingPods())
        client = await client_for(aio, sock_path, pods)
        await agent.accept()
        with capture_logs() as logs:
            if with_fd:
                with opened("/dev/null") as fd:
                    await agent.send_raw(packet, fd)
            else:
                await agent.send_raw(packet)
            assert says in await agent.answer()
            assert await agent.closed_by_tunnel()
        assert any(e["log_level"] == "error" for e in logs)
        assert pods.calls == []
        # The tunnel is still alive: it reconnects and says hello again.
        assert await agent.accept() == ZdsHello(Version.V1)
        assert client.sessions == 2
        await client.close()
        agent.close()
        assert open_fds() == before  # the fd that came with the bad packet was closed

    aio.run(main)


def test_keep_and_a_second_snapshot_after_the_snapshot_break_the_protocol__recording_pods(
    aio,
    sock_path,
):
    async def main():
        agent = aio.closing(HandAgent(sock_path))
        pods = aio.closing(RecordingPods())
        await client_for(aio, sock_path, pods)
        await agent.accept()
        assert await agent.exchange(SnapshotSent()) == ""
        assert "pod keep received after snapshot" in await agent.exchange(KeepWorkload("a"))
        assert await agent.closed_by_tunnel()
        await agent.accept()
        assert await agent.exchange(SnapshotSent()) == ""
        assert "pod snapshot received already" in await agent.exchange(SnapshotSent())
        assert await agent.closed_by_tunnel()
        assert not synced(pods)

    aio.run(main)


def test_keep_and_delete_before_the_snapshot_shape_what_it_drains__recording_pods(
    aio, sock_path, tmp_path
):
    async def main():
        agent = aio.closing(HandAgent(sock_path))
        pods = aio.closing(RecordingPods())
        await client_for(aio, sock_path, pods)
        await agent.accept()
        for uid in "abc":
            stand_in = tmp_path / f"netns-{uid}"
            stand_in.write_text(uid)
            assert await agent.add(uid, str(stand_in)) == ""
        assert await agent.exchange(SnapshotSent()) == ""
        assert set(pods.serving) == {"a", "b", "c"}
        # The agent restarts. It cannot open a's netns any more (Keep), c was deleted
        # while it was down, and it re-adds then deletes b before the snapshot ends.
        await agent.accept()
        assert await agent.exchange(KeepWorkload("a")) == ""
        assert await agent.add("b", str(tmp_path / "netns-b")) == ""
        assert await agent.exchange(DelWorkload("b")) == ""
        assert await agent.exchange(SnapshotSent()) == ""
        assert set(pods.serving) == {"a"}
        assert pods.calls[-1] == ("keep_only", {"a"})

    aio.run(main)


def test_a_long_failure_reason_is_cut_to_fit_upstreams_buffer__recording_pods(aio, sock_path):
    async def main():
        agent = aio.closing(HandAgent(sock_path))
        pods = aio.closing(RecordingPods())
        pods.fail["a"] = "é" * 5000
        await client_for(aio, sock_path, pods)
        await agent.accept()
        error = await agent.add("a")
        assert error.startswith("failure to start proxy: é") and error.endswith("...")
        assert len(error.encode()) <= MAX_ERROR_BYTES

    aio.run(main)


def test_a_pod_manager_failure_is_a_nack_not_a_crash__recording_pods(aio, sock_path):
    class Broken(RecordingPods):
        async def remove_pod(self, uid: str) -> None:
            raise OSError(errno.EIO, "disk on fire")

    async def main():
        agent = aio.closing(HandAgent(sock_path))
        pods = aio.closing(Broken())
        await client_for(aio, sock_path, pods)
        await agent.accept()
        assert "failure to remove proxy: OSError" in await agent.exchange(DelWorkload("a"))
        assert await agent.exchange(SnapshotSent()) == ""  # same connection, still fine

    aio.run(main)


def test_the_agent_away_is_logged_once_per_outage__recording_pods(aio, sock_path):
    def count(logs: list[MutableMapping[str, Any]], event: str) -> int:
        return sum(1 for e in logs if e["event"] == event)

    async def main():
        pods = aio.closing(RecordingPods())
        with capture_logs() as logs:
            await client_for(aio, sock_path, pods)
            await wait_until(lambda: "unreachable" in pods.enrolment_detail, "a failed attempt")
            await asyncio.sleep(0.1)  # many more attempts at a 10 ms ceiling
            assert count(logs, "node agent unreachable; retrying") == 1
            agent = aio.closing(HandAgent(sock_path))
            await agent.accept()
            assert count(logs, "node agent reachable again") == 1
            assert await agent.exchange(SnapshotSent()) == ""
            agent.close()  # a second outage, logged once more
            sock_path.unlink()
            await wait_until(lambda: "unreachable" in pods.enrolment_detail, "the second outage")
            await asyncio.sleep(0.05)
            assert count(logs, "node agent unreachable; retrying") == 2
        assert not synced(pods)

    aio.run(main)


# ---- configuration -----------------------------------------------------------------------

BASE = {
    "NODE_NAME": "n1",
    "LOCAL_XDS_PATH": "/x.yaml",
    "CA_ADDRESS": "/ca.sock",
    "CA_TOKEN_PATH": "/token",
}


def test_config_zds_socket_replaces_the_enrolment_file():
    cfg = parse_config({**BASE, "ZDS_SOCKET": "/var/run/ztunnel/ztunnel.sock"})
    assert cfg.zds_socket == Path("/var/run/ztunnel/ztunnel.sock")
    assert cfg.enrolment_path is None
    cfg = parse_config({**BASE, "ENROLMENT_PATH": "/e.yaml"})
    assert cfg.enrolment_path == Path("/e.yaml") and cfg.zds_socket is None


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ({}, "ZDS_SOCKET or ENROLMENT_PATH must be set"),
        ({"ZDS_SOCKET": "/z.sock", "ENROLMENT_PATH": "/e.yaml"}, "not both"),
        ({"ZDS_SOCKET": "/" + "z" * 200}, "ZDS_SOCKET=.* longer than a unix socket path"),
    ],
)
def test_config_enrolment_source_errors_name_the_variable(extra, says):
    with pytest.raises(EnvConfigError, match=says):
        parse_config({**BASE, **extra})


# ---- the real NodeProxy ------------------------------------------------------------------


def mesh(*pods: tuple[str, str]) -> MeshState:
    """Workloads (uid, name) on this node, uids as the control plane writes them."""
    return mesh_state(
        workload(
            uid=uid,
            name=name,
            service_account=name,
            node=NODE,
            ips=ips(f"10.250.0.{i + 2}"),
        )
        for i, (uid, name) in enumerate(pods)
    )


class Stack:
    """The agent's ZdsServer and a tunnel: ZdsClient driving a real NodeProxy."""

    def __init__(self, sock_path: Path, state: MeshState) -> None:
        # A worker that leaves as soon as it is idle, so fd checks can wait for it to go.
        self.cert_worker = CertWorkerClient(idle_exit=0.01)
        self.certs = CertificateManager(InProcessCA(), crypto=self.cert_worker)
        self.node = NodeProxy(NODE, self.certs, "cluster.local", workload_wait=0.2)
        self.node.on_state(state)
        self.agent = ZdsServer(sock_path)
        self.client = ZdsClient(sock_path, self.node, backoff_initial=0.002, backoff_max=0.01)

    async def start(self) -> None:
        self.node.start()
        await self.agent.start()
        await self.client.start()
        await wait_until(lambda: self.agent.tunnels == 1, "the tunnel to connect")

    async def close(self) -> None:
        await self.client.close()
        await self.agent.close()
        await self.node.close()
        await self.certs.close()


def test_a_pod_whose_workload_is_not_known_yet_is_acked_and_pending(aio, sock_path):
    async def main():
        stack = aio.closing(Stack(sock_path, mesh()))
        await stack.start()
        node = stack.node
        assert node.status()["enrolment"] == "zds: connected" and node.ready
        before = open_fds()
        # Upstream acks once the proxy is set up, without waiting for the workload; ours
        # needs the workload to start, so the pod is acked and stays pending.
        await stack.agent.add("k8s-uid-1", INFO, "/proc/self/ns/net")
        assert stack.agent.acked("k8s-uid-1")
        assert node.status()["pods"] == {
            "k8s-uid-1": "pending: workload not in the mesh config yet"
        }
        assert not node.status()["ready"]
        assert len(open_fds() - before) == 1  # the node holds the pod's netns fd
        dump = node.config_dump()
        assert dump["pods"][0]["netns"].startswith("netns:[")
        await stack.agent.delete("k8s-uid-1")
        assert node.status()["pods"] == {} and node.ready
        assert open_fds() == before  # the tunnel closed the fd it owned

    aio.run(main)


def test_pods_without_workloads_wait_once_per_config_version_not_once_each(aio, sock_path):
    async def main():
        stack = aio.closing(Stack(sock_path, mesh()))
        await stack.start()
        await stack.agent.add("a", INFO, "/proc/self/ns/net")  # waits, in vain
        # Were the next adds to wait as well, a snapshot of many such pods would take
        # an hour each here; the config has not changed, so they do not wait at all.
        stack.node.workload_wait = 3600
        await stack.agent.add("b", INFO, "/proc/self/ns/net")
        await stack.agent.add("c", INFO, "/proc/self/ns/net")
        assert set(stack.node.pending) == {"a", "b", "c"}
        assert all(stack.agent.acked(uid) for uid in "abc")
        # (These netns fds are the test's own netns: the mesh never names the pods, so
        # nothing is ever bound there.)

    aio.run(main)


def test_the_node_owns_exactly_one_fd_per_enrolled_pod(aio, sock_path):
    async def main():
        stack = aio.closing(Stack(sock_path, mesh()))  # no workloads: nothing is ever started
        await stack.start()
        node = stack.node
        before = open_fds()
        await stack.agent.add("a", INFO, "/proc/self/ns/net")
        first = node.desired["a"]
        await stack.agent.add("a", INFO, "/proc/self/ns/net")  # the same netns again
        assert node.desired["a"] is first and len(open_fds() - before) == 1
        await stack.agent.add("a", INFO, "/dev/null")  # a new "sandbox": replaces
        assert node.desired["a"] is not first and first.netns_fd is not None
        assert first.netns_fd.closed and len(open_fds() - before) == 1
        await stack.agent.add("b", INFO, "/proc/self/ns/net")
        assert len(open_fds() - before) == 2
        await node.keep_only({"b"})
        assert set(node.desired) == {"b"} and len(open_fds() - before) == 1
        await stack.close()  # closing the node releases the rest
        assert open_fds() <= before

    aio.run(main)


def warm_netns_home() -> None:
    """nsutil keeps one fd per thread on the thread's own netns, opened on first use and
    kept for good: open it before counting fds (entering /dev/null fails right after)."""
    with opened("/dev/null") as fd, contextlib.suppress(OSError):
        nsutil.socket_in(fd).close()


def test_a_failed_start_is_nacked_with_its_reason_and_stays_pending(aio, sock_path):
    async def main():
        stack = aio.closing(Stack(sock_path, mesh(("cluster//Pod/default/web", "web"))))
        await stack.start()
        warm_netns_home()
        before = open_fds()
        # Not a network namespace: the listeners cannot be created in it.
        with pytest.raises(ZdsNack, match=r"failure to start proxy: .*setns") as e:
            await stack.agent.add("k8s-uid-1", INFO, "/dev/null")
        assert "k8s-uid-1" in stack.node.pending
        assert "setns" in stack.node.status()["pods"]["k8s-uid-1"]
        assert "setns" in e.value.error and not stack.agent.acked("k8s-uid-1")
        # The agent's next snapshot no longer names it: drained, fd released.
        await stack.agent.delete("k8s-uid-1")
        await wait_until(lambda: stack.cert_worker.running == 0, "the certificate worker to exit")
        assert stack.node.pending == {} and open_fds() == before

    aio.run(main)


def test_a_node_restart_of_the_agent_keeps_pending_pods_it_still_names(aio, sock_path):
    async def main():
        stack = aio.closing(Stack(sock_path, mesh()))
        await stack.start()
        await stack.agent.add("a", INFO, "/proc/self/ns/net")
        await stack.agent.add("b", INFO, "/proc/self/ns/net")
        await stack.agent.close()
        await wait_until(lambda: not stack.node.enrolment_synced, "the tunnel to notice")
        assert set(stack.node.desired) == {"a", "b"}
        agent2 = aio.closing(ZdsServer(sock_path))
        await agent2.start()
        await wait_until(lambda: agent2.tunnels == 1, "the reconnect")
        assert stack.node.desired == {}  # the new agent named nothing: both drained
        await agent2.add("c", INFO, "/proc/self/ns/net")
        assert set(stack.node.desired) == {"c"}

    aio.run(main)


# ---- netns tier: a pod really served from the fd the agent sent ----------------------------


@pytest.fixture
def pod_netns() -> Iterator[str]:
    with throwaway_netns("zds") as path:
        yield path


def _connects(netns_path: str, port: int) -> bool:
    """A TCP connect from inside the pod's netns. Run on the loop's own thread on purpose:
    the kernel completes it from the listen backlog, and no other thread gets a cached
    netns fd from nsutil that would spoil the fd count."""
    s = nsutil.socket_at(netns_path)
    try:
        s.settimeout(5)
        s.connect(("127.0.0.1", port))
        return True
    except ConnectionRefusedError:
        return False
    finally:
        s.close()


@pytest.mark.netns
def test_a_pod_is_served_in_the_netns_the_agent_sent(aio, sock_path, pod_netns):
    async def main():
        stack = aio.closing(Stack(sock_path, mesh(("cluster//Pod/default/late", "late"))))
        await stack.start()
        node = stack.node
        warm_netns_home()
        before = open_fds()
        # The workload arrives after the Add: acked pending, started when it is known.
        await stack.agent.add("k8s-uid-9", INFO, pod_netns)
        assert node.status()["pods"]["k8s-uid-9"].startswith("pending: workload not")
        assert not _connects(pod_netns, 15001)
        node.on_state(mesh(("cluster//Pod/default/late", "late"), ("c//Pod/default/web", "web")))
        await wait_until(lambda: "k8s-uid-9" in node.pods, "the pod to start")
        pod = node.pods["k8s-uid-9"]
        assert pod.state is PodState.READY and str(pod.identity).endswith("/ns/default/sa/web")
        assert node.ready and node.status()["pods"] == {"k8s-uid-9": "ready"}
        assert pod.listeners()["inbound"] == "0.0.0.0:15008"
        for port in (15001, 15006, 15008):
            assert _connects(pod_netns, port)
        dump = node.config_dump()
        assert [p["status"] for p in dump["pods"]] == ["ready"]
        # Delete: listeners gone from the pod's netns, the fd closed.
        await stack.agent.delete("k8s-uid-9")
        assert node.pods == {}
        assert not _connects(pod_netns, 15008)
        # Every fd of the pod is closed: its netns, listeners, and the connections above.
        # (New fds only: a thread pool may have started a thread that keeps an fd on this
        # process's own netns, which is not the pod's.)
        await wait_until(lambda: not new_fds(before), "every fd of the pod to be closed")
        assert not new_fds(before)

    aio.run(main)
