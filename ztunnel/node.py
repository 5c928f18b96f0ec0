"""The tunnel of one node: mesh state, certificates, and the enrolled pods' proxies.

Reconciling is the only way pods start or stop: the desired set (enrolment) and the mesh
state (workloads) are both inputs, and a pod runs when it is enrolled AND its workload is
known. A pod whose workload is not yet in the config waits, marked pending.
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog

from ztunnel import admin_view
from ztunnel.authz import authorize
from ztunnel.certs import CertificateManager
from ztunnel.config import DEFAULT_ROOT_NAMESPACE
from ztunnel.identity import SpiffeId
from ztunnel.inpod import Enrolment, PodProxy
from ztunnel.rbac import PolicyIndex
from ztunnel.sockets import SocketAddr
from ztunnel.state import MeshState, Workload
from ztunnel.tasks import TaskSet
from ztunnel.telemetry import Telemetry

log = structlog.get_logger(__name__)


class NodeProxy:
    def __init__(
        self,
        node_name: str,
        certs: CertificateManager,
        trust_domain: str,
        root_namespace: str = DEFAULT_ROOT_NAMESPACE,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.node_name = node_name
        self.certs = certs
        self.trust_domain = trust_domain
        self.root_namespace = root_namespace
        self.telemetry = telemetry if telemetry is not None else Telemetry()
        self.policies = PolicyIndex.build(MeshState.empty(), root_namespace)
        self.quit_requested = asyncio.Event()
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
        policies_changed = state.policies != self.state.policies or not self.state_loaded
        self.state = state
        self.state_loaded = True
        if policies_changed:
            self._load_policies(state)
        for pod in self.pods.values():
            w = state.workload_by_uid(pod.enrolment.uid)
            if w is not None:
                pod.workload = w
        # Workloads (labels, addresses) feed policy too: re-check after any change.
        closed = self.telemetry.recheck()
        if closed:
            log.info("policy re-check closed connections", count=closed)
        self._dirty.set()

    def _load_policies(self, state: MeshState) -> None:
        old_warnings = set(self.policies.warnings)
        self.policies = PolicyIndex.build(state, self.root_namespace)
        # Each warning once, when it first appears (not again on every config change).
        for w in self.policies.warnings:
            if w not in old_warnings:
                log.warning("policy warning", warning=w)
        for err in self.policies.errors:
            log.error("policy rejected; it denies every connection it could apply to", error=err)
        log.info("policies loaded", count=len(self.policies.policies))

    def authorize(
        self, workload: Workload, peer: SpiffeId | None, client: SocketAddr, target: SocketAddr
    ) -> str | None:
        """The proxies' authorizer: None to allow, else why not. Dry-run policies are logged
        here, never enforced."""
        result = authorize(self.policies, workload, peer, client.ip, target)
        if result.verdict is not None:
            for dry in result.verdict.dry_run:
                log.info(
                    "dry-run policy evaluated",
                    policy=dry.policy,
                    action=dry.action.value,
                    matched=dry.matched,
                    src=str(client),
                    src_identity=str(peer) if peer else None,
                    dst=str(target),
                )
        return None if result.allowed else result.reason

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
            telemetry=self.telemetry,
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

    # ---- AdminSource ---------------------------------------------------------------------

    def config_dump(self) -> dict[str, Any]:
        return admin_view.config_dump(self)

    def connections(self) -> list[dict[str, Any]]:
        return self.telemetry.connections()

    def explain(self, source: str, destination: str) -> dict[str, Any]:
        return admin_view.explain(self.state, self.policies, source, destination)

    def request_quit(self) -> None:
        log.info("quit requested through the admin port")
        self.quit_requested.set()

    async def close(self) -> None:
        await self.tasks.cancel_all()
        for uid in list(self.pods):
            await self._stop_pod(uid)
