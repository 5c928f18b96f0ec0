"""The Kubernetes control plane's loop: informers -> compute (debounced) -> the mesh config
written atomically -> listeners; then the waypoints' objects and the statuses.

- Nothing is computed before every informer has its first list: a state without the
  policies would allow what they deny.
- Any change marks the mesh dirty; the loop waits `debounce` seconds more (a burst of
  changes becomes one push), computes, and writes the file only when its bytes changed
  (`--mesh-out`, which the tunnels read as LOCAL_XDS_PATH), then calls every listener
  registered with `on_state` with the new `MeshState`. That is the seam a discovery (xDS)
  server subscribes to.
- A computed document the parser refuses as a whole keeps the state in force (logged).
- Writes back (waypoint objects, statuses, Events) happen after the push, only when what
  they say changed, and one failing write never stops the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from controlplane import status as st
from controlplane import waypoints as wp
from controlplane.compute import Built, Computed, Inputs, build_written, compute, dump
from controlplane.endpoints import Problem, service_vips
from kube import kinds
from kube.client import KubeApiError, KubeClient, Obj
from kube.informer import Event, Informer
from kube.kinds import Kind
from meshcore.defaults import ROOT_NAMESPACE, TRUST_DOMAIN
from meshcore.state import MeshConfigError, MeshState

log = structlog.get_logger("controlplane")

FIELD_MANAGER = "ambient-mesh-controlplane"
EVENT_SOURCE = "ambient-mesh-controlplane"

# The informers, by the `Inputs` field they fill.
WATCHED: dict[str, Kind] = {
    "namespaces": kinds.NAMESPACE,
    "pods": kinds.POD,
    "services": kinds.SERVICE,
    "service_entries": kinds.SERVICE_ENTRY,
    "authorization_policies": kinds.AUTHORIZATION_POLICY,
    "peer_authentications": kinds.PEER_AUTHENTICATION,
    "request_authentications": kinds.REQUEST_AUTHENTICATION,
    "gateways": kinds.GATEWAY,
    "http_routes": kinds.HTTP_ROUTE,
    "grpc_routes": kinds.GRPC_ROUTE,
    "destination_rules": kinds.DESTINATION_RULE,
    "virtual_services": kinds.VIRTUAL_SERVICE,
}
# The Istio kinds whose status carries the mesh's verdict on them.
ISTIO_STATUS_KINDS = (
    "authorization_policies",
    "peer_authentications",
    "request_authentications",
    "destination_rules",
    "virtual_services",
)
STATE_LISTENER = Callable[[MeshState], None]


@dataclass(frozen=True, slots=True)
class ControllerOptions:
    # The mesh config file (the local cluster's tunnels read it); None in the cluster, where
    # the proxies take it over xDS only.
    mesh_out: Path | None
    debounce: float = 0.05
    cluster_id: str = "Kubernetes"
    trust_domain: str = TRUST_DOMAIN
    domain: str = "cluster.local"
    root_namespace: str = ROOT_NAMESPACE
    manage_waypoints: bool = True
    write_status: bool = True
    template: wp.WaypointTemplate = field(default_factory=wp.WaypointTemplate)


def write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.chmod(0o644)
    os.replace(tmp, path)  # a reader sees the old file or the new one, never half


class MeshController:
    def __init__(self, client: KubeClient, options: ControllerOptions) -> None:
        self.client = client
        self.options = options
        self.informers = {name: Informer(client, kind) for name, kind in WATCHED.items()}
        # The waypoints' Deployments, for Programmed.
        self.deployments = Informer(client, kinds.DEPLOYMENT, label_selector=wp.GATEWAY_NAME_LABEL)
        self._listeners: list[STATE_LISTENER] = []
        self._dirty = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.state: MeshState | None = None
        self.document: dict[str, Any] | None = None
        self.digest = ""
        self.pushes = 0
        self.pushed = asyncio.Event()  # set at each push (tests wait on it)
        self._applied: dict[str, str] = {}  # gateway key -> fingerprint of what was applied
        self._failed: dict[str, str] = {}  # gateway key -> the last error applying its objects
        self._reported: set[Problem] = set()
        for inf in (*self.informers.values(), self.deployments):
            inf.add_handler(self._changed)

    # ---- the seam for consumers of the mesh state ---------------------------------------

    def on_state(self, callback: STATE_LISTENER) -> None:
        """Call `callback` with every new MeshState (at once with the current one, if any).
        A failing callback is logged and never stops the others or the loop."""
        self._listeners.append(callback)
        if self.state is not None:
            self._notify(callback, self.state)

    def _notify(self, callback: STATE_LISTENER, state: MeshState) -> None:
        try:
            callback(state)
        except Exception:
            log.exception("state listener failed")

    # ---- lifecycle ----------------------------------------------------------------------

    def _changed(self, event: Event, key: str, old: Obj | None, new: Obj | None) -> None:
        self._dirty.set()

    async def start(self) -> None:
        for inf in (*self.informers.values(), self.deployments):
            inf.start()
        self._task = asyncio.create_task(self._loop(), name="controlplane-loop")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for inf in (*self.informers.values(), self.deployments):
            await inf.stop()

    async def _loop(self) -> None:
        await asyncio.gather(
            *(i.synced.wait() for i in (*self.informers.values(), self.deployments))
        )
        log.info("informers synced", kinds=len(self.informers) + 1)
        self._dirty.set()
        while True:
            await self._dirty.wait()
            await asyncio.sleep(self.options.debounce)
            self._dirty.clear()
            try:
                await self.sync_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # the loop must outlive any one bad round
                log.exception("control plane round failed")

    # ---- one round ----------------------------------------------------------------------

    def inputs(self) -> Inputs:
        o = self.options
        caches = {name: inf.items() for name, inf in self.informers.items()}
        return Inputs(
            **caches,
            cluster_id=o.cluster_id,
            trust_domain=o.trust_domain,
            domain=o.domain,
            root_namespace=o.root_namespace,
        )

    async def sync_once(self) -> None:
        started = time.perf_counter()
        inputs = self.inputs()
        computed = compute(inputs)
        problems = list(computed.problems)
        built: Built | None = None
        try:
            built = build_written(computed.document)
            problems += built.problems
        except MeshConfigError as exc:
            log.error("mesh config refused; the one in force stays", error=str(exc))
        if built is not None:
            await self._push(built, computed, started)
        await self._report(problems)
        if self.options.manage_waypoints:
            await self._reconcile_waypoints(computed)
        if self.options.write_status and self.state is not None:
            await self._write_statuses(inputs, computed, problems, self.state)

    async def _push(self, built: Built, computed: Computed, started: float) -> None:
        document, state = built.document, built.state
        data = built.text.encode()
        digest = hashlib.sha256(data).hexdigest()
        if digest == self.digest:
            return
        if self.options.mesh_out is not None:
            await asyncio.to_thread(write_atomically, self.options.mesh_out, data)
        self.digest, self.document, self.state = digest, document, state
        self.pushes += 1
        log.info(
            "mesh pushed",
            digest=digest[:12],
            workloads=len(state.workloads),
            services=len(state.services),
            policies=len(state.policies),
            resources=len(document.get("resources", ())),
            service_entries_pending=len(computed.service_entries),
            problems=len(computed.problems),
            ms=round((time.perf_counter() - started) * 1000, 1),
        )
        for callback in list(self._listeners):
            self._notify(callback, state)
        self.pushed.set()

    # ---- problems: log once, and an Event on the object ---------------------------------

    async def _report(self, problems: list[Problem]) -> None:
        current = set(problems)
        for p in sorted(current - self._reported, key=str):
            log.warning(
                "mesh problem", kind=p.kind, object=f"{p.namespace}/{p.name}", problem=p.message
            )
            await self._event(p)
        self._reported = current  # a problem that comes back is reported again

    async def _event(self, p: Problem) -> None:
        now = st.now_text()
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": "ambient-mesh-", "namespace": p.namespace or "default"},
            "involvedObject": {"kind": p.kind, "namespace": p.namespace, "name": p.name},
            "reason": "MeshConfig",
            "message": p.message[:1024],
            "type": "Warning",
            "source": {"component": EVENT_SOURCE},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            await self.client.create(kinds.EVENT, body, p.namespace or "default")
        except (KubeApiError, OSError, TimeoutError) as exc:
            log.warning("event not recorded", error=str(exc))

    # ---- waypoints ----------------------------------------------------------------------

    async def _reconcile_waypoints(self, computed: Computed) -> None:
        live = set()
        services = self.informers["services"].cache
        namespaces = self.informers["namespaces"].cache
        for gw in computed.waypoints:
            if gw.problem is not None or not gw.uid:
                continue
            ns_obj = namespaces.get(gw.namespace) or {}
            if (ns_obj.get("status") or {}).get("phase") == "Terminating":
                continue  # nothing can be created there any more; the Gateway goes too
            live.add(gw.key)
            objects = (
                (kinds.SERVICE_ACCOUNT, wp.service_account(gw)),
                (kinds.SERVICE, wp.service(gw)),
                (kinds.DEPLOYMENT, wp.deployment(gw, self.options.template)),
            )
            fingerprint = dump({"objects": [o for _, o in objects]})
            present = gw.key in services and gw.key in self.deployments.cache
            if self._applied.get(gw.key) == fingerprint and present:
                continue
            try:
                for kind, obj in objects:
                    await self.client.apply(kind, obj, gw.namespace, manager=FIELD_MANAGER)
            except (KubeApiError, OSError, TimeoutError) as exc:
                # Retried at the next round; said once per streak of the same error.
                if self._failed.get(gw.key) != str(exc):
                    log.warning("waypoint objects not applied", gateway=gw.key, error=str(exc))
                self._failed[gw.key] = str(exc)
                self._applied.pop(gw.key, None)
                continue
            self._failed.pop(gw.key, None)
            log.info("waypoint objects applied", gateway=gw.key)
            self._applied[gw.key] = fingerprint
        for key in set(self._applied) - live:
            # The Gateway is gone: the garbage collector removes what it owned.
            del self._applied[key]
        for key in set(self._failed) - live:
            del self._failed[key]

    # ---- statuses -----------------------------------------------------------------------

    async def _write_status(self, kind: Kind, obj: Obj, new: dict[str, Any]) -> None:
        old = obj.get("status") if isinstance(obj.get("status"), Mapping) else {}
        if st.same(old, new):
            return
        md = obj.get("metadata") or {}
        patch: dict[str, Any] = dict(new)
        for k in old or {}:
            patch.setdefault(k, None)  # a merge patch removes what is no longer said
        try:
            await self.client.patch(
                kind,
                str(md.get("name")),
                {"status": patch},
                md.get("namespace"),
                subresource="status",
            )
        except (KubeApiError, OSError, TimeoutError) as exc:
            log.warning(
                "status not written",
                kind=kind.kind,
                object=f"{md.get('namespace')}/{md.get('name')}",
                error=str(exc),
            )

    async def _write_statuses(
        self, inputs: Inputs, computed: Computed, problems: list[Problem], state: MeshState
    ) -> None:
        """Judge the objects this round computed from, not the informers' caches now: an
        object that arrived during the round has no problems yet and would be reported
        Accepted before the next round finds it broken."""
        now = st.now_text()
        gateways = self.informers["gateways"].cache
        services = self.informers["services"].cache
        for gw in computed.waypoints:
            obj = gateways.get(gw.key)
            if obj is None:
                continue
            svc = services.get(gw.key)
            vips = service_vips(svc) if svc is not None else []
            ready = wp.ready_replicas(self.deployments.cache.get(gw.key))
            hostname = f"{gw.name}.{gw.namespace}.svc.{self.options.domain}"
            new = st.gateway_status(
                gw, vips[0] if vips else None, hostname, ready, obj.get("status"), now
            )
            await self._write_status(kinds.GATEWAY, obj, new)
        waypoint_keys = [(g.namespace, g.name) for g in computed.waypoints]
        conditions = st.route_conditions(state, waypoint_keys)
        for name, kind in (("http_routes", kinds.HTTP_ROUTE), ("grpc_routes", kinds.GRPC_ROUTE)):
            for obj in getattr(inputs, name):
                md = obj.get("metadata") or {}
                at = (kind.kind, str(md.get("namespace")), str(md.get("name")))
                found = conditions.get(at, ())
                await self._write_status(
                    kind, obj, st.route_status(obj, found, obj.get("status"), now)
                )
        by_object: dict[tuple[str, str, str], list[Problem]] = {}
        for p in problems:
            by_object.setdefault((p.kind, p.namespace, p.name), []).append(p)
        for name in ISTIO_STATUS_KINDS:
            kind = WATCHED[name]
            for obj in getattr(inputs, name):
                md = obj.get("metadata") or {}
                mine = by_object.get((kind.kind, str(md.get("namespace")), str(md.get("name"))))
                await self._write_status(
                    kind, obj, st.istio_status(obj, mine or [], obj.get("status"), now)
                )
