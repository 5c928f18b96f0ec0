"""The tunnel of one node: mesh state, certificates, and the enrolled pods' proxies.

Reconciling is the only way pods start or stop: the desired set (enrolment) and the mesh
state (workloads) are both inputs, and a pod runs when it is enrolled AND its workload is
known. A pod whose workload is not yet in the config waits, marked pending.
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog

from ztunnel.certs import CertificateManager
from ztunnel.inpod import Enrolment, PodProxy
from ztunnel.proxy.inbound import Authorizer, allow_all
from ztunnel.state import MeshState
from ztunnel.tasks import TaskSet

log = structlog.get_logger(__name__)


class NodeProxy:
    def __init__(
        self,
        node_name: str,
        certs: CertificateManager,
        trust_domain: str,
        authorize: Authorizer = allow_all,
    ) -> None:
        self.node_name = node_name
        self.certs = certs
        self.trust_domain = trust_domain
        self.authorize = authorize
        self.state = MeshState.empty()
        self.state_loaded = False
        self.desired: dict[str, Enrolment] = {}
        self.pods: dict[str, PodProxy] = {}
        self.pending: dict[str, str] = {}  # uid -> why it is not running
        self.tasks = TaskSet("node")
        self._lock = asyncio.Lock()
        self._dirty = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._runner = self.tasks.spawn(self._run(), "reconcile")

    def on_state(self, state: MeshState) -> None:
        self.state = state
        self.state_loaded = True
        for pod in self.pods.values():
            w = state.workload_by_uid(pod.enrolment.uid)
            if w is not None:
                pod.workload = w
        self._dirty.set()

    def on_enrolment(self, desired: dict[str, Enrolment]) -> None:
        self.desired = desired
        self._dirty.set()

    async def _run(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            await self.reconcile()

    async def reconcile(self) -> None:
        async with self._lock:
            for uid in [u for u in self.pods if u not in self.desired]:
                await self._stop_pod(uid)
            for uid in [u for u in self.pending if u not in self.desired]:
                del self.pending[uid]
            for uid, enrolment in self.desired.items():
                running = self.pods.get(uid)
                if running is not None and running.enrolment == enrolment:
                    continue
                if running is not None:
                    await self._stop_pod(uid)
                await self._start_pod(enrolment)

    async def _start_pod(self, enrolment: Enrolment) -> None:
        workload = self.state.workload_by_uid(enrolment.uid)
        if workload is None:
            self.pending[enrolment.uid] = "workload not in the mesh config yet"
            return
        pod = PodProxy(
            enrolment,
            workload,
            lambda: self.state,
            self.certs,
            self.trust_domain,
            self.authorize,
        )
        try:
            await pod.start()
        except Exception as e:
            await pod.stop()
            self.pending[enrolment.uid] = f"{type(e).__name__}: {e}"
            log.error("pod start failed", uid=enrolment.uid, error=str(e))
            # Retry later: the cause (CA away, netns not yet there) is usually passing.
            asyncio.get_running_loop().call_later(1.0, self._dirty.set)
            return
        self.pending.pop(enrolment.uid, None)
        self.pods[enrolment.uid] = pod
        log.info("pod enrolled", uid=enrolment.uid, identity=str(pod.identity))

    async def _stop_pod(self, uid: str) -> None:
        pod = self.pods.pop(uid)
        await pod.stop()
        if not any(p.identity == pod.identity for p in self.pods.values()):
            self.certs.forget(pod.identity)
        log.info("pod removed", uid=uid)

    @property
    def ready(self) -> bool:
        return self.state_loaded and not self.pending and set(self.pods) == set(self.desired)

    def status(self) -> dict[str, Any]:
        pods: dict[str, str] = {uid: p.status for uid, p in self.pods.items()}
        pods.update({uid: f"pending: {why}" for uid, why in self.pending.items()})
        for uid in self.desired:
            pods.setdefault(uid, "pending: not reconciled yet")
        return {"node": self.node_name, "ready": self.ready, "pods": pods}

    async def close(self) -> None:
        await self.tasks.cancel_all()
        for uid in list(self.pods):
            await self._stop_pod(uid)
