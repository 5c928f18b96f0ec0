"""The node agent with the Kubernetes pod source, against the real API server, real capture
rules in real pod namespaces and a real ZDS socket.

There is no kubelet here, so the test plays it: it creates a Node, binds a Pod to it, creates
the pod's netns under the name the kubelet contract gives (`kube.podnetns.netns_name(uid)`)
with a veth and the pod's IP, and patches the Pod's status. The tunnel end of ZDS is either
scripted (`AckingTunnel`, a stand-in that acks every request and records it) or the tunnel's
real node, ZDS client and certificates in process (`RealTunnel`), whose listeners are then
reached inside the pod's netns.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns

import nsutil
from kube.client import KubeApiError, KubeClient, load_kubeconfig
from kube.kinds import NAMESPACE, NODE, POD
from kube.podnetns import netns_name, netns_path
from localcluster.kube.apiserver import KubeControlPlane, running
from meshcore.defaults import REDIRECTION_ANNOTATION
from meshcore.identity.certs import CertificateManager
from meshcore.identity.certworker_client import CertWorkerClient
from redirect.agent import NodeAgent, NodeDataplane, zds_server_factory
from redirect.kubesource import KubePodSource
from tests.support.aio import Loop, wait_until
from tests.support.certs import InProcessCA
from tests.support.mesh import ips, mesh_state, workload
from tests.support.netns import throwaway_netns
from tests.support.zds import HandTunnel
from zds.messages import AddWorkload, DelWorkload, SnapshotSent
from ztunnel.inpod import PodState
from ztunnel.node import NodeProxy
from ztunnel.zds_client import ZdsClient

pytestmark = [pytest.mark.kube, pytest.mark.netns]

POD_IP = IPv4Address("10.251.0.10")
MODE = "istio.io/dataplane-mode"


class AckingTunnel:
    """The tunnel's side of ZDS that takes everything: acks each request, records it."""

    def __init__(self, hand: HandTunnel) -> None:
        self.hand = hand
        self.seen: list[tuple[str, str]] = []  # (request kind, uid)
        self._task = asyncio.get_running_loop().create_task(self._serve())

    @classmethod
    async def connect(cls, path: Path) -> AckingTunnel:
        return cls(await HandTunnel.connect(path))

    async def _serve(self) -> None:
        while True:
            payload = (await self.hand.next(limit=3600))[0].payload
            if isinstance(payload, AddWorkload):
                self.seen.append(("add", payload.uid))
            elif isinstance(payload, DelWorkload):
                self.seen.append(("del", payload.uid))
            elif isinstance(payload, SnapshotSent):
                self.seen.append(("snapshot", ""))
            await self.hand.ack()

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self.hand.close()


class RealTunnel:
    """The tunnel's node proxy and ZDS client, in process, with an in-process CA."""

    def __init__(self, sock_path: Path, node: str, ns: str, name: str) -> None:
        self.cert_worker = CertWorkerClient()
        self.certs = CertificateManager(InProcessCA(), crypto=self.cert_worker)
        self.node = NodeProxy(node, self.certs, "cluster.local", workload_wait=0.2)
        # The control plane's view of the pod (the tunnel matches it by name and namespace).
        pod = workload(
            uid=f"Kubernetes//Pod/{ns}/{name}",
            name=name,
            namespace=ns,
            node=node,
            ips=ips(str(POD_IP)),
        )
        self.node.on_state(mesh_state([pod]))
        self.client = ZdsClient(sock_path, self.node, backoff_initial=0.01, backoff_max=0.1)

    async def start(self) -> None:
        self.node.start()
        await self.client.start()

    async def close(self) -> None:
        await self.client.close()
        await self.node.close()
        await self.certs.close()


def listening(netns: str, port: int) -> bool:
    """Whether something accepts TCP on 127.0.0.1:`port` inside the pod's netns."""
    s = nsutil.socket_at(netns)
    try:
        s.settimeout(5)
        s.connect(("127.0.0.1", port))
        return True
    except ConnectionRefusedError:
        return False
    finally:
        s.close()


@dataclass
class Kubelet:
    """Plays the missing kubelet for one node: Pod objects become pod netns with an IP."""

    client: KubeClient
    node: str
    node_netns: str  # the node's netns path (the pods' veth host ends live there)
    namespaces: list[str] = field(default_factory=list)
    pod_netns: list[str] = field(default_factory=list)

    async def register_node(self) -> None:
        await self.client.create(NODE, {"metadata": {"name": self.node}})

    async def namespace(self, name: str, labels: dict[str, str] | None = None) -> None:
        await self.client.create(NAMESPACE, {"metadata": {"name": name, "labels": labels or {}}})
        self.namespaces.append(name)

    async def pod(self, ns: str, name: str, labels: dict[str, str] | None = None) -> str:
        """A Pod bound to this node (no IP yet); returns its UID."""
        obj = {
            "metadata": {"name": name, "labels": labels or {}},
            "spec": {
                "nodeName": self.node,
                "automountServiceAccountToken": False,
                "containers": [{"name": "app", "image": "app"}],
            },
        }
        # A namespace's default service account comes a moment after the namespace (the
        # controller-manager makes it): until then the API server refuses its pods.
        deadline = asyncio.get_running_loop().time() + 20
        while True:
            try:
                created = await self.client.create(POD, obj, ns)
                return str(created["metadata"]["uid"])
            except KubeApiError as e:
                if e.status not in (403, 500) or asyncio.get_running_loop().time() > deadline:
                    raise
            await asyncio.sleep(0.1)

    def sandbox(self, uid: str, ip: IPv4Address) -> str:
        """The pod's netns as the CNI plugin leaves it: veth eth0 with the pod IP."""
        name = netns_name(uid)
        pr_netns.create(name)
        self.pod_netns.append(name)
        path = nsutil.netns_path(name)
        host_if = "v" + name[-12:]
        with IPRoute(netns=self.node_netns, flags=0) as ipr:
            ipr.link("add", ifname=host_if, kind="veth", peer={"ifname": "eth0", "net_ns_fd": name})
            ipr.link("set", index=ipr.link_lookup(ifname=host_if)[0], state="up")
        with IPRoute(netns=path, flags=0) as ipr:
            for ifname in ("lo", "eth0"):
                ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0], state="up")
            eth = ipr.link_lookup(ifname="eth0")[0]
            ipr.addr("add", index=eth, address=str(ip), prefixlen=24)
        return path

    async def report_ip(self, ns: str, name: str, ip: IPv4Address) -> None:
        status = {"phase": "Running", "podIP": str(ip), "podIPs": [{"ip": str(ip)}]}
        await self.client.patch(POD, name, {"status": status}, ns, subresource="status")

    async def delete_pod(self, ns: str, name: str) -> None:
        # No kubelet confirms a graceful deletion: the object goes at once.
        await self.client.request("DELETE", POD.path(ns, name), body={"gracePeriodSeconds": 0})

    async def cleanup(self) -> None:
        for ns in self.namespaces:
            with contextlib.suppress(KubeApiError):
                for pod in (await self.client.list(POD, ns)).get("items") or []:
                    await self.delete_pod(ns, pod["metadata"]["name"])
                await self.client.delete(NAMESPACE, ns)
        with contextlib.suppress(KubeApiError):
            await self.client.delete(NODE, self.node)
        await self.client.close()

    def remove_netns(self) -> None:
        for name in self.pod_netns:
            with contextlib.suppress(FileNotFoundError, OSError):
                pr_netns.remove(name)


@dataclass
class Env:
    cp: KubeControlPlane
    node_netns: str
    dir: Path
    node: str = field(default_factory=lambda: "node-" + secrets.token_hex(3))

    @property
    def status_file(self) -> Path:
        return self.dir / "agent.json"

    def client(self) -> KubeClient:
        return KubeClient(load_kubeconfig(self.cp.kubeconfig))

    def pod_state(self, uid: str) -> str | None:
        try:
            doc: dict[str, Any] = json.loads(self.status_file.read_text())
        except (OSError, ValueError):
            return None
        entry = (doc.get("pods") or {}).get(uid)
        return None if entry is None else str(entry["state"])

    def captured(self, path: str) -> bool:
        return "ISTIO_OUTPUT" in nsutil.run_in(path, "iptables-save")

    async def start_agent(self, aio: Loop) -> NodeAgent:
        client = self.client()
        source = KubePodSource(client, self.node, netns_poll=0.05)
        agent = NodeAgent(
            self.node,
            source,
            NodeDataplane(node_netns=self.node_netns),
            zds_server_factory(self.dir / "zds.sock"),
            self.status_file,
            marker=source,
        )
        aio.defer(client.close)
        aio.closing(agent)
        await agent.start()
        return agent


async def annotation(client: KubeClient, ns: str, name: str) -> str | None:
    pod = await client.get(POD, name, ns)
    value = (pod["metadata"].get("annotations") or {}).get(REDIRECTION_ANNOTATION)
    return None if value is None else str(value)


async def until_async(check: Callable[[], Awaitable[bool]], what: str, limit: float = 20) -> None:
    deadline = asyncio.get_running_loop().time() + limit
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


@contextlib.contextmanager
def environment(cp: KubeControlPlane, tmp_path: Path) -> Iterator[tuple[Env, Kubelet]]:
    with throwaway_netns("rdk-node") as node_netns:
        env = Env(cp, node_netns, tmp_path)
        kubelet = Kubelet(env.client(), env.node, node_netns)
        try:
            yield env, kubelet
        finally:
            kubelet.remove_netns()


def test_namespace_label_enrols_and_releases_running_pods(
    kube_cp: KubeControlPlane,
    tmp_path: Path,
) -> None:
    with environment(kube_cp, tmp_path) as (env, kubelet):
        aio = Loop()
        try:
            aio.run(_label_scenario(aio, env, kubelet), limit=120)
        finally:
            aio.defer(kubelet.cleanup)
            aio.close()


async def _label_scenario(aio: Loop, env: Env, kubelet: Kubelet) -> None:
    ns = "travel-" + secrets.token_hex(3)
    await kubelet.register_node()
    await kubelet.namespace(ns)
    uid = await kubelet.pod(ns, "pricing")
    agent = await env.start_agent(aio)
    tunnel = aio.closing(await AckingTunnel.connect(env.dir / "zds.sock"))
    await wait_until(lambda: ("snapshot", "") in tunnel.seen, "the (empty) snapshot")
    kube = env.client()
    aio.defer(kube.close)

    # Labelled before the pod has a sandbox: known, not yet enrollable.
    await kube.patch(NAMESPACE, ns, {"metadata": {"labels": {MODE: "ambient"}}})
    await kubelet.report_ip(ns, "pricing", POD_IP)
    await asyncio.sleep(0.3)
    assert env.pod_state(uid) is None
    assert agent.view is not None and agent.view.pods[uid].ip == POD_IP

    # The netns appears (no API event says so): the pod is captured and handed to the tunnel.
    path = await asyncio.to_thread(kubelet.sandbox, uid, POD_IP)
    assert path == str(netns_path(uid))
    await wait_until(lambda: env.pod_state(uid) == "enrolled", "enrolled")
    assert ("add", uid) in tunnel.seen
    assert env.captured(path)
    await until_async(
        lambda: _is(annotation(kube, ns, "pricing"), "enabled"), "the redirection annotation"
    )

    # The pod-level opt-out wins over the namespace label: released, annotation removed.
    await kube.patch(POD, "pricing", {"metadata": {"labels": {MODE: "none"}}}, ns)
    await wait_until(lambda: env.pod_state(uid) is None, "released by the pod opt-out")
    assert ("del", uid) in tunnel.seen
    assert not env.captured(path)
    await until_async(lambda: _is(annotation(kube, ns, "pricing"), None), "annotation removed")

    # Opt-out gone: enrolled again, with no restart of anything.
    await kube.patch(POD, "pricing", {"metadata": {"labels": {MODE: None}}}, ns)
    await wait_until(lambda: env.pod_state(uid) == "enrolled", "enrolled again")
    assert env.captured(path)
    await until_async(lambda: _is(annotation(kube, ns, "pricing"), "enabled"), "annotated again")

    # The namespace label removed: released.
    tunnel.seen.clear()
    await kube.patch(NAMESPACE, ns, {"metadata": {"labels": {MODE: None}}})
    await wait_until(lambda: env.pod_state(uid) is None, "released by the namespace label")
    assert tunnel.seen == [("del", uid)]
    assert not env.captured(path)
    await until_async(lambda: _is(annotation(kube, ns, "pricing"), None), "annotation removed")

    # Labelled again, then the pod deleted: released (the mark of a gone pod is dropped).
    await kube.patch(NAMESPACE, ns, {"metadata": {"labels": {MODE: "ambient"}}})
    await wait_until(lambda: env.pod_state(uid) == "enrolled", "enrolled by the label")
    tunnel.seen.clear()
    await kubelet.delete_pod(ns, "pricing")
    await wait_until(lambda: env.pod_state(uid) is None, "released by the delete")
    assert tunnel.seen == [("del", uid)]
    assert not env.captured(path)


async def _is(value: Awaitable[str | None], expected: str | None) -> bool:
    return await value == expected


def test_api_server_restart_releases_nothing(tmp_path: Path) -> None:
    # A control plane of its own: the test restarts its API server.
    with running(tmp_path / "kube") as cp, environment(cp, tmp_path) as (env, kubelet):
        aio = Loop()
        try:
            aio.run(_restart_scenario(aio, env, kubelet, cp), limit=120)
        finally:
            aio.defer(kubelet.cleanup)
            aio.close()


async def _restart_scenario(aio: Loop, env: Env, kubelet: Kubelet, cp: KubeControlPlane) -> None:
    ns = "travel-" + secrets.token_hex(3)
    await kubelet.register_node()
    await kubelet.namespace(ns, {MODE: "ambient"})
    uid = await kubelet.pod(ns, "pricing")
    path = await asyncio.to_thread(kubelet.sandbox, uid, POD_IP)
    await kubelet.report_ip(ns, "pricing", POD_IP)
    agent = await env.start_agent(aio)
    tunnel = aio.closing(await AckingTunnel.connect(env.dir / "zds.sock"))
    await wait_until(lambda: env.pod_state(uid) == "enrolled", "enrolled")

    # The API server goes away and comes back (its watch cache starts anew, so the
    # informers' watches fail and they relist): nothing is released meanwhile or after.
    tunnel.seen.clear()
    await asyncio.to_thread(cp.restart_apiserver)
    kube = env.client()
    aio.defer(kube.close)
    # Something changes after the restart: once the agent's view has it, the informers
    # have reconnected.
    await kube.patch(POD, "pricing", {"metadata": {"labels": {"version": "v2"}}}, ns)
    await wait_until(
        lambda: agent.view is not None and agent.view.pods[uid].labels.get("version") == "v2",
        "the agent to see the post-restart change",
    )
    assert env.pod_state(uid) == "enrolled"
    assert env.captured(path)
    assert tunnel.seen == []

    # And it follows changes again: the label removed releases the pod.
    await kube.patch(NAMESPACE, ns, {"metadata": {"labels": {MODE: None}}})
    await wait_until(lambda: env.pod_state(uid) is None, "released after the restart")
    assert tunnel.seen == [("del", uid)]


def test_pod_unlabelled_while_no_agent_ran_is_released_at_start(
    kube_cp: KubeControlPlane,
    tmp_path: Path,
) -> None:
    with environment(kube_cp, tmp_path) as (env, kubelet):
        aio = Loop()
        try:
            aio.run(_stale_scenario(aio, env, kubelet), limit=120)
        finally:
            aio.defer(kubelet.cleanup)
            aio.close()


async def _stale_scenario(aio: Loop, env: Env, kubelet: Kubelet) -> None:
    ns = "travel-" + secrets.token_hex(3)
    await kubelet.register_node()
    await kubelet.namespace(ns, {MODE: "ambient"})
    uid = await kubelet.pod(ns, "pricing")
    path = await asyncio.to_thread(kubelet.sandbox, uid, POD_IP)
    await kubelet.report_ip(ns, "pricing", POD_IP)
    kube = env.client()
    aio.defer(kube.close)
    agent = await env.start_agent(aio)
    await wait_until(lambda: env.pod_state(uid) == "pending", "captured (no tunnel yet)")
    await until_async(lambda: _is(annotation(kube, ns, "pricing"), "enabled"), "the mark")

    # The agent stops (its capture stays: the pod keeps failing closed), the label goes
    # meanwhile, and a new agent starts: the mark says the pod was captured, so it is
    # released although nothing about it changed while this agent watched.
    await agent.close()
    assert env.captured(path)
    await kube.patch(NAMESPACE, ns, {"metadata": {"labels": {MODE: None}}})
    await env.start_agent(aio)
    await until_async(lambda: _is(annotation(kube, ns, "pricing"), None), "the mark removed")
    assert not env.captured(path)
    assert env.pod_state(uid) is None


def test_labelled_namespace_hands_its_pod_to_a_real_tunnel(
    kube_cp: KubeControlPlane,
    tmp_path: Path,
) -> None:
    with environment(kube_cp, tmp_path) as (env, kubelet):
        aio = Loop()
        try:
            aio.run(_real_tunnel_scenario(aio, env, kubelet), limit=120)
        finally:
            aio.defer(kubelet.cleanup)
            aio.close()


async def _real_tunnel_scenario(aio: Loop, env: Env, kubelet: Kubelet) -> None:
    ns = "travel-" + secrets.token_hex(3)
    await kubelet.register_node()
    await kubelet.namespace(ns)
    uid = await kubelet.pod(ns, "pricing")
    path = await asyncio.to_thread(kubelet.sandbox, uid, POD_IP)
    await kubelet.report_ip(ns, "pricing", POD_IP)
    await env.start_agent(aio)
    tunnel = aio.closing(RealTunnel(env.dir / "zds.sock", env.node, ns, "pricing"))
    await tunnel.start()
    await wait_until(lambda: tunnel.node.enrolment_synced, "the tunnel's first snapshot")
    assert tunnel.node.pods == {} and not listening(path, 15008)

    kube = env.client()
    aio.defer(kube.close)
    await kube.patch(NAMESPACE, ns, {"metadata": {"labels": {MODE: "ambient"}}})
    await wait_until(lambda: env.pod_state(uid) == "enrolled", "enrolled")
    proxy = tunnel.node.pods[uid]
    assert proxy.state is PodState.READY
    assert str(proxy.identity).endswith(f"/ns/{ns}/sa/default")
    for port in (15001, 15006, 15008):
        assert listening(path, port), port  # the tunnel serves inside the pod's netns
    assert env.captured(path)

    await kube.patch(NAMESPACE, ns, {"metadata": {"labels": {MODE: None}}})
    await wait_until(lambda: env.pod_state(uid) is None, "released")
    assert tunnel.node.pods == {}
    assert not listening(path, 15008)
    assert not env.captured(path)
