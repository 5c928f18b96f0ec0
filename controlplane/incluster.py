"""The control plane inside the cluster it serves (`--in-cluster`), as istiod runs there.

- The CA root lives in the Secret `istio-ca-secret` of the control plane's own namespace
  (keys `ca-cert.pem`, `ca-key.pem`, as istiod's self-signed CA keeps it). The first start
  creates it; every later start (a restart, a second replica, an upgrade) uses it. A Secret
  that does not hold a valid root is an error, never replaced: a new root would make every
  certificate in the mesh untrusted.
- The root certificate is published into every namespace as the ConfigMap
  `istio-ca-root-cert` (key `root-cert.pem`), which tunnels and waypoints mount to verify
  istiod (xDS and CA). A namespace gets it when it appears; an edited or deleted copy is
  put back at the next resync.
- The decisions (the objects, whether a copy is right) are pure; `load_or_create_ca` and
  `RootCertPublisher` do the I/O.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import Mapping
from typing import Any

import structlog

from controlplane.ca import CAError, CertificateAuthority
from kube import kinds
from kube.client import KubeApiError, KubeClient, Obj
from kube.informer import Event, Informer

log = structlog.get_logger("controlplane.incluster")

CA_SECRET = "istio-ca-secret"
CA_SECRET_TYPE = "istio.io/ca-root"
SECRET_CERT_KEY = "ca-cert.pem"
SECRET_KEY_KEY = "ca-key.pem"
ROOT_CONFIGMAP = "istio-ca-root-cert"
ROOT_CERT_KEY = "root-cert.pem"
MANAGED_BY = "ambient-mesh-controlplane"
# Every copy is checked again this often, so a hand-edited or deleted one heals.
RESYNC_S = 60.0


def ca_secret(ca: CertificateAuthority, namespace: str) -> Obj:
    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": CA_SECRET_TYPE,
        "metadata": {
            "name": CA_SECRET,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/managed-by": MANAGED_BY},
        },
        "data": {SECRET_CERT_KEY: b64(ca.roots_pem()), SECRET_KEY_KEY: b64(ca.key_pem())},
    }


def ca_from_secret(secret: Mapping[str, Any], trust_domain: str) -> CertificateAuthority:
    """The root a Secret holds; CAError naming the Secret and the key that is wrong."""
    md = secret.get("metadata") or {}
    where = f"Secret {md.get('namespace', '')}/{md.get('name', CA_SECRET)}"
    data = secret.get("data") or {}
    if not isinstance(data, Mapping):
        raise CAError(f"{where} has no data")

    def field(key: str) -> bytes:
        raw = data.get(key)
        if not isinstance(raw, str) or not raw:
            raise CAError(
                f"{where} has no {key}; restore it, or delete the Secret to make a new root"
            )
        try:
            return base64.b64decode(raw, validate=True)
        except ValueError as e:
            raise CAError(f"{where}: {key} is not base64 ({e})") from e

    return CertificateAuthority.from_pem(
        field(SECRET_KEY_KEY),
        field(SECRET_CERT_KEY),
        trust_domain,
        f"{where} key {SECRET_KEY_KEY}",
        f"{where} key {SECRET_CERT_KEY}",
    )


async def load_or_create_ca(
    client: KubeClient, namespace: str, trust_domain: str
) -> CertificateAuthority:
    """The root from `istio-ca-secret`, created if absent. Two replicas starting together:
    the one whose create loses (409) reads the winner's root."""
    for _ in range(3):
        secret = await client.find(kinds.SECRET, CA_SECRET, namespace)
        if secret is not None:
            return ca_from_secret(secret, trust_domain)
        ca = CertificateAuthority.create(trust_domain)
        try:
            await client.create(kinds.SECRET, ca_secret(ca, namespace), namespace)
        except KubeApiError as e:
            if e.status == 409:
                continue
            raise
        log.info("mesh CA root created", secret=f"{namespace}/{CA_SECRET}")
        return ca
    raise CAError(f"Secret {namespace}/{CA_SECRET} could not be read or created")


def root_configmap(namespace: str, root_pem: str) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": ROOT_CONFIGMAP,
            "namespace": namespace,
            "labels": {"istio.io/config": "true", "app.kubernetes.io/managed-by": MANAGED_BY},
        },
        "data": {ROOT_CERT_KEY: root_pem},
    }


def needs_update(existing: Mapping[str, Any] | None, root_pem: str) -> bool:
    if existing is None:
        return True
    data = existing.get("data") or {}
    return not isinstance(data, Mapping) or data.get(ROOT_CERT_KEY) != root_pem


def namespace_active(ns: Mapping[str, Any] | None) -> bool:
    if ns is None:
        return False
    md = ns.get("metadata") or {}
    phase = (ns.get("status") or {}).get("phase")
    return not md.get("deletionTimestamp") and phase != "Terminating"


class RootCertPublisher:
    """Keeps `istio-ca-root-cert` in every active namespace: follows the namespace informer
    the controller already runs, and its own informer on those ConfigMaps alone (a field
    selector), so a deleted or edited copy is rewritten at once and a resync costs no API
    call."""

    def __init__(self, client: KubeClient, namespaces: Informer, root_pem: str) -> None:
        self.client = client
        self.namespaces = namespaces
        self.configmaps = Informer(
            client, kinds.CONFIG_MAP, field_selector=f"metadata.name={ROOT_CONFIGMAP}"
        )
        self.root_pem = root_pem
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.written = 0  # ConfigMaps created or fixed (tests and logs)
        namespaces.add_handler(self._on_change)
        self.configmaps.add_handler(self._on_change)

    def _on_change(self, _event: Event, _key: str, _old: Obj | None, _new: Obj | None) -> None:
        self._wake.set()

    def start(self) -> None:
        self.configmaps.start()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="root-cert")

    async def stop(self) -> None:
        await self.configmaps.stop()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        await self.namespaces.synced.wait()
        await self.configmaps.synced.wait()
        while True:
            self._wake.clear()
            for ns in self.namespaces.items():
                if not namespace_active(ns):
                    continue
                name = str((ns.get("metadata") or {}).get("name", ""))
                try:
                    await self.ensure(name)
                except KubeApiError as e:
                    # A namespace being deleted refuses creates (403/409): the next pass
                    # sees it gone.
                    log.warning("root certificate not published", namespace=name, error=str(e))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RESYNC_S):
                    await self._wake.wait()

    async def ensure(self, namespace: str) -> None:
        existing = self.configmaps.get(f"{namespace}/{ROOT_CONFIGMAP}")
        if not needs_update(existing, self.root_pem):
            return
        want = root_configmap(namespace, self.root_pem)
        if existing is None:
            try:
                await self.client.create(kinds.CONFIG_MAP, want, namespace)
            except KubeApiError as e:
                if e.status != 409:  # created meanwhile: its informer event brings it
                    raise
        else:
            want["metadata"]["resourceVersion"] = existing["metadata"].get("resourceVersion")
            await self.client.replace(kinds.CONFIG_MAP, want, namespace)
        self.written += 1
        log.info("root certificate published", namespace=namespace)
