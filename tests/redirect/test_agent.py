"""The node agent in-process, against real capture rules and a real probe set in throwaway
namespaces and a real ZDS socket. The tunnel end is scripted with the ZDS wire module (a
stand-in: these tests check what the agent sends and when, message by message); the real
tunnel is exercised in tests/e2e/test_node_agent.py."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

import nsutil
from redirect import probes
from redirect.agent import NodeAgent, NodeDataplane, zds_server_factory
from redirect.enrolment import FilePodSource, PodInfo, pod_doc
from redirect.probes import ProbeConfig
from tests.support.aio import Loop, wait_until
from tests.support.netns import throwaway_netns
from tests.support.zds import HandTunnel
from zds.messages import DelWorkload, SnapshotSent

pytestmark = pytest.mark.netns

POD_IP = IPv4Address("10.250.0.10")
UID = "t//Pod/mesh/app"


@dataclass
class Env:
    node: str  # netns path
    pod: str  # netns path
    dir: Path

    @property
    def pods_file(self) -> Path:
        return self.dir / "pods.json"

    @property
    def socket(self) -> Path:
        return self.dir / "zds.sock"

    @property
    def status_file(self) -> Path:
        return self.dir / "agent.json"

    def publish(self, ambient: bool = True, **pod_fields: Any) -> None:
        labels = {"istio.io/dataplane-mode": "ambient"} if ambient else {}
        pod = PodInfo(
            uid=UID,
            name="app",
            namespace="mesh",
            node="n1",
            service_account="app-sa",
            ip=POD_IP,
            netns=self.pod,
        )
        doc = {
            "version": 1,
            "namespaces": {"mesh": {"labels": labels}},
            "pods": [{**pod_doc(pod), **pod_fields}],
        }
        tmp = self.pods_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        tmp.replace(self.pods_file)

    def status(self) -> dict[str, Any]:
        try:
            doc: dict[str, Any] = json.loads(self.status_file.read_text())
        except (OSError, ValueError):
            return {}
        return doc

    def pod_state(self) -> str | None:
        entry = (self.status().get("pods") or {}).get(UID)
        return None if entry is None else str(entry["state"])

    def captured(self) -> bool:
        return "ISTIO_OUTPUT" in nsutil.run_in(self.pod, "iptables-save")

    def redirecting(self) -> bool:
        """Whether new connections are still redirected (the nat part of the capture)."""
        return "ISTIO_OUTPUT" in nsutil.run_in(self.pod, "iptables-save", "-t", "nat")

    def probe_entries(self) -> dict[IPv4Address, str]:
        return probes.entries(self.node, ProbeConfig())

    def agent(self) -> NodeAgent:
        return NodeAgent(
            "n1",
            FilePodSource(self.pods_file, "n1", interval=0.02),
            NodeDataplane(node_netns=self.node),
            zds_server_factory(self.socket),
            self.status_file,
        )


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    with throwaway_netns("rda-node") as node, throwaway_netns("rda-pod") as pod:
        yield Env(node, pod, tmp_path)


@pytest.fixture
def aio(env: Env, aio: Loop) -> Loop:
    """The test's loop (tests/conftest.py), set up after the namespaces, so the agents and
    tunnels on it are closed before the namespaces are removed."""
    return aio


async def enrolled_through_a_tunnel(aio: Loop, env: Env) -> HandTunnel:
    """A hand tunnel connects, acks the one pod and the snapshot: the pod is enrolled."""
    tunnel = aio.closing(await HandTunnel.connect(env.socket))
    await tunnel.expect_add(UID)
    await tunnel.ack()
    await tunnel.expect(SnapshotSent)
    await tunnel.ack()
    await wait_until(lambda: env.pod_state() == "enrolled", "enrolled")
    return tunnel


async def started_agent(aio: Loop, env: Env) -> NodeAgent:
    agent = aio.closing(env.agent())
    await agent.start()
    return agent


def test_enrol_without_tunnel_fails_closed_then_acks_in_order(env: Env, aio: Loop) -> None:
    env.publish(ambient=True)

    async def scenario() -> None:
        agent = await started_agent(aio, env)
        # No tunnel: captured (traffic blocked), pending, not in the probe set.
        await wait_until(lambda: env.pod_state() == "pending", "pending")
        assert "no tunnel" in env.status()["pods"][UID]["reason"]
        assert env.captured()
        assert env.probe_entries() == {}

        tunnel = aio.closing(await HandTunnel.connect(env.socket))
        inode = await tunnel.expect_add(UID)  # the snapshot carries the pending pod
        assert inode == os.stat(env.pod).st_ino
        assert env.probe_entries() == {}  # not before the ack
        await tunnel.ack()
        await tunnel.expect(SnapshotSent)
        await tunnel.ack()
        await wait_until(lambda: env.pod_state() == "enrolled", "enrolled")
        assert env.probe_entries() == {POD_IP: UID}
        assert env.status()["tunnels"] == 1

        # Un-label: the probe entry and the redirects go before the tunnel hears of it;
        # the return path of connections it still carries stays until it acks.
        env.publish(ambient=False)
        request = await tunnel.expect(DelWorkload)
        assert request.payload == DelWorkload(UID)
        assert env.probe_entries() == {}
        assert not env.redirecting()
        assert env.captured()
        await tunnel.ack()
        await wait_until(lambda: env.pod_state() is None, "the pod to leave the status")
        assert not env.captured()
        await agent.close()
        assert env.status()["running"] is False

    aio.run(scenario)


def test_pod_opt_out_label_is_never_captured(env: Env, aio: Loop) -> None:
    env.publish(ambient=True, labels={"istio.io/dataplane-mode": "none"})

    async def scenario() -> None:
        await started_agent(aio, env)
        tunnel = aio.closing(await HandTunnel.connect(env.socket))
        await tunnel.expect(SnapshotSent)  # an empty snapshot
        await tunnel.ack()
        await wait_until(lambda: env.status().get("tunnels") == 1, "the tunnel")
        assert env.pod_state() is None
        assert not env.captured()

    aio.run(scenario)


def test_refused_pod_stays_pending_and_is_retried(env: Env, aio: Loop) -> None:
    env.publish(ambient=True)

    async def scenario() -> None:
        await started_agent(aio, env)
        tunnel = aio.closing(await HandTunnel.connect(env.socket))
        await tunnel.expect_add(UID)
        await tunnel.ack("no certificate yet")  # refused in the snapshot
        await tunnel.expect(SnapshotSent)
        await tunnel.ack()
        await wait_until(lambda: env.pod_state() == "pending", "pending")
        assert env.captured()  # still failing closed
        await tunnel.expect_add(UID)  # sent again
        await tunnel.ack()
        await wait_until(lambda: env.pod_state() == "enrolled", "enrolled")

    aio.run(scenario)


def test_tunnel_loss_makes_enrolled_pods_pending_until_a_new_one_acks(env: Env, aio: Loop) -> None:
    env.publish(ambient=True)

    async def scenario() -> None:
        await started_agent(aio, env)
        tunnel = await enrolled_through_a_tunnel(aio, env)
        tunnel.close()
        await wait_until(lambda: env.pod_state() == "pending", "pending after the tunnel left")
        assert env.captured() and env.probe_entries() == {POD_IP: UID}
        await enrolled_through_a_tunnel(aio, env)  # enrolled again

    aio.run(scenario)


def test_restarted_agent_sends_a_complete_snapshot_and_keeps_rules(env: Env, aio: Loop) -> None:
    env.publish(ambient=True)

    async def scenario() -> None:
        first = await started_agent(aio, env)
        tunnel = await enrolled_through_a_tunnel(aio, env)
        await first.close()
        tunnel.close()
        # The pod keeps failing closed while no agent runs.
        assert env.captured() and env.probe_entries() == {POD_IP: UID}

        await started_agent(aio, env)
        # Already in the first snapshot: nothing is drained.
        await enrolled_through_a_tunnel(aio, env)
        assert env.probe_entries() == {POD_IP: UID}

    aio.run(scenario)


def test_malformed_source_keeps_the_last_good_view(env: Env, aio: Loop) -> None:
    env.publish(ambient=True)

    async def scenario() -> None:
        await started_agent(aio, env)
        await enrolled_through_a_tunnel(aio, env)
        env.pods_file.write_text('{"pods": [{"uid": 7}]}')
        await wait_until(lambda: bool(env.status().get("sourceError")), "the error reported")
        assert "pods[0].uid" in env.status()["sourceError"]
        assert env.pod_state() == "enrolled" and env.captured()

    aio.run(scenario)


def test_stale_probe_entries_are_pruned_at_start(env: Env, aio: Loop) -> None:
    cfg = ProbeConfig()
    probes.install(env.node, cfg)
    probes.add(env.node, cfg, IPv4Address("10.250.0.99"), "gone//Pod/x/y")
    env.publish(ambient=False)

    async def scenario() -> None:
        await started_agent(aio, env)

    aio.run(scenario)
    assert env.probe_entries() == {}


def test_agent_waits_for_a_readable_source_before_serving(env: Env, aio: Loop) -> None:
    env.pods_file.write_text("{ half a file")

    async def scenario() -> None:
        agent = aio.closing(env.agent())
        starting = asyncio.ensure_future(agent.start())
        await asyncio.sleep(0.2)
        # Nothing served yet: a tunnel connecting now would get an empty snapshot.
        assert not starting.done() and not env.socket.exists()
        env.publish(ambient=True)
        await asyncio.wait_for(starting, 15)
        await enrolled_through_a_tunnel(aio, env)

    aio.run(scenario)
