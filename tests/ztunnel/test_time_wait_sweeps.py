"""When a pod's leftover TIME-WAIT sockets are swept (ztunnel.inpod, meshcore.timewait): each
sweep walks the whole host's connection table, and only a pod whose captured connections
mirror the app's addresses (eBPF) can have a TIME-WAIT of ours that blocks a client. A real
pod proxy in a namespace of its own; its capture listener is reached directly, so its
connections arrive on the listener's own port, as under iptables' REDIRECT."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

import nsutil
from meshcore.identity.certs import CertificateManager
from meshcore.sockets import NetnsSocketFactory
from tests.support.aio import Loop, wait_until
from tests.support.certs import InProcessCA
from tests.support.mesh import ips, mesh_state, workload
from tests.support.netns import throwaway_netns
from ztunnel import inpod
from ztunnel.inpod import Enrolment, PodProxy

pytestmark = pytest.mark.netns

INTERVAL = 0.1  # the sweeps' interval here, instead of 5 s


@pytest.fixture
def netns_fd() -> Iterator[int]:
    """An open fd of a namespace of its own; the pod's socket factory owns (closes) it."""
    with throwaway_netns("sweep") as path:
        yield nsutil.open_netns(path)


def test_sweeps_stop_once_connections_arrive_redirected_and_resume_when_mirrored(
    netns_fd: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(inpod, "TIME_WAIT_SWEEP_INTERVAL", INTERVAL)
    pod = workload(name="web-0", namespace="shop", service_account="web", ips=ips("127.0.0.1"))
    state = mesh_state([pod], [], [])
    loop = Loop("uvloop")

    async def connect_to_outbound() -> None:
        (sock,) = nsutil.sockets_in(netns_fd, 1)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", inpod.OUTBOUND_PORT))
        finally:
            sock.close()

    async def main() -> tuple[int, int, int]:
        certs = CertificateManager(InProcessCA())
        factory = NetnsSocketFactory(netns_fd)
        proxy = PodProxy(
            Enrolment(pod.uid, "sweeps"),
            pod,
            lambda: state,
            certs,
            "cluster.local",
            factory=factory,
            listen_ip="127.0.0.1",
        )
        reaper = factory.time_waits
        try:
            await proxy.start()
            # How the pod is captured is not known yet: swept every interval.
            await wait_until(lambda: reaper.sweeps >= 3, "sweeps while the capture is unknown")
            await connect_to_outbound()  # arrives on 15001 itself: redirected
            await asyncio.sleep(3 * INTERVAL)
            stopped_at = reaper.sweeps
            await asyncio.sleep(5 * INTERVAL)
            still = reaper.sweeps
            # Now make the listener read its connections as mirrored (a port of its own
            # that no connection arrives on), as under eBPF: the sweeps start again.
            assert proxy.outbound is not None
            proxy.outbound._port = 1
            await connect_to_outbound()
            await wait_until(lambda: reaper.sweeps >= still + 3, "sweeps again once mirrored")
            return stopped_at, still, reaper.sweeps
        finally:
            await proxy.stop()
            await certs.close()

    try:
        stopped_at, still, resumed = loop.run(main)
    finally:
        loop.close()
    assert still == stopped_at  # no sweep in five intervals once redirected
    assert resumed >= still + 3
