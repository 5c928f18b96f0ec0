"""`ambientctl` against a Kubernetes cluster: which cluster (kubeconfig and context, as
kubectl chooses them) and the thin layer that lists and writes its objects.

Every failure becomes a `ViewError` with the API server's own message, or `KubeUsage` when
the command line cannot say which cluster.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import yaml

from ambientctl.kubeviews import MESH_KINDS, Snapshot
from ambientctl.views import ViewError
from controlplane.controller import WATCHED
from kube import kinds
from kube.client import KubeApiError, KubeClient, KubeConfig, load_kubeconfig
from kube.kinds import Kind

FIELD_MANAGER = "ambientctl"
DEFAULT_KUBECONFIG = Path.home() / ".kube" / "config"
T = TypeVar("T")


class KubeUsage(Exception):
    """The command line names no cluster, or two (exit 2)."""


@dataclass(frozen=True, slots=True)
class KubeTarget:
    kubeconfig: Path
    context: str | None

    def describe(self) -> str:
        return f"{self.kubeconfig}" + (f" (context {self.context})" if self.context else "")


def choose(
    cluster_file: str | None,
    kubeconfig: str | None,
    context: str | None,
    env: Mapping[str, str],
    default: Path = DEFAULT_KUBECONFIG,
) -> KubeTarget | None:
    """The Kubernetes cluster a command is for, or None for a local cluster (its file).

    As kubectl: `--kubeconfig`, else the first `KUBECONFIG` file that has the context asked
    for (the first one at all without `--context`), else ~/.kube/config. A cluster file
    beside `--kubeconfig`/`--context` is an error; beside only `KUBECONFIG` the file wins
    (the variable is set for other tools too)."""
    if cluster_file is not None:
        if kubeconfig is not None or context is not None:
            raise KubeUsage(
                f"give either a cluster file ({cluster_file}, a local cluster) or "
                "--kubeconfig/--context (a Kubernetes cluster), not both"
            )
        return None
    if kubeconfig is not None:
        return KubeTarget(Path(kubeconfig), context)
    paths = [Path(p) for p in env.get("KUBECONFIG", "").split(os.pathsep) if p]
    if paths:
        if context is not None:
            for p in paths:
                if context in _contexts(p):
                    return KubeTarget(p, context)
        return KubeTarget(paths[0], context)
    if default.is_file():
        return KubeTarget(default, context)
    raise KubeUsage(
        "give a cluster file (a local cluster), or --kubeconfig PATH [--context NAME] "
        "(a Kubernetes cluster; KUBECONFIG and ~/.kube/config are read too)"
    )


def _contexts(path: Path) -> set[str]:
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return set()
    items = doc.get("contexts") if isinstance(doc, dict) else None
    return {str(c.get("name")) for c in items or () if isinstance(c, dict)}


def config(target: KubeTarget) -> KubeConfig:
    try:
        return load_kubeconfig(target.kubeconfig, target.context)
    except KubeApiError as e:
        raise ViewError(e.message) from None


def run(target: KubeTarget, work: Callable[[KubeClient], Awaitable[T]]) -> T:
    """`work` with a client for `target`; API and connection errors become a ViewError."""
    cfg = config(target)

    async def main() -> T:
        async with KubeClient(cfg, timeout=30.0) as client:
            return await work(client)

    try:
        return asyncio.run(main())
    except KubeApiError as e:
        raise ViewError(f"the API server at {cfg.server} answered {e}") from None
    except (aiohttp.ClientError, OSError, TimeoutError) as e:
        raise ViewError(
            f"cannot reach the API server at {cfg.server} ({target.describe()}): "
            f"{e or type(e).__name__}"
        ) from None


async def items(
    client: KubeClient, kind: Kind, namespace: str | None = None, *, missing_ok: bool = True
) -> list[dict[str, Any]]:
    """A list's items; a kind the server does not serve (its CRD not installed) is empty."""
    try:
        doc = await client.list(kind, namespace)
    except KubeApiError as e:
        if e.status == 404 and missing_ok:
            return []
        raise
    return [o for o in doc.get("items") or () if isinstance(o, dict)]


async def snapshot(client: KubeClient, istio_namespace: str, *, mesh: bool = True) -> Snapshot:
    """The objects the views need: with `mesh`, every input of the control plane's compute;
    always namespaces, pods, nodes and the mesh's own Deployments and DaemonSets."""
    wanted = MESH_KINDS if mesh else ("namespaces", "pods")
    lists = await asyncio.gather(
        *(items(client, WATCHED[k]) for k in wanted),
        items(client, kinds.NODE),
        items(client, kinds.DEPLOYMENT, istio_namespace),
        items(client, kinds.DAEMON_SET, istio_namespace),
    )
    objects = dict(zip(wanted, lists[: len(wanted)], strict=True))
    nodes, deployments, daemonsets = lists[len(wanted) :]
    return Snapshot(objects, nodes, deployments, daemonsets, istio_namespace)


async def namespace_exists(client: KubeClient, name: str) -> bool:
    try:
        await client.get(kinds.NAMESPACE, name)
    except KubeApiError as e:
        if e.status == 404:
            return False
        raise
    return True


async def waypoint_objects(
    client: KubeClient, namespace: str | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The Gateways and the Deployments of `namespace` (None: every namespace)."""
    try:
        gateways = await items(client, kinds.GATEWAY, namespace, missing_ok=False)
    except KubeApiError as e:
        if e.status == 404:
            raise ViewError(
                "the API server does not serve Gateways: the Gateway API CRDs are not "
                "installed (helm install the mesh's base chart)"
            ) from None
        raise
    return gateways, await items(client, kinds.DEPLOYMENT, namespace)


async def apply_gateway(client: KubeClient, doc: dict[str, Any]) -> dict[str, Any]:
    ns = str(doc["metadata"]["namespace"])
    return await client.apply(kinds.GATEWAY, doc, ns, manager=FIELD_MANAGER)


async def label_namespace(client: KubeClient, name: str, key: str, value: str | None) -> None:
    await client.patch(kinds.NAMESPACE, name, {"metadata": {"labels": {key: value}}})


async def delete_gateway(client: KubeClient, namespace: str, name: str) -> bool:
    """False when there was none."""
    try:
        await client.delete(kinds.GATEWAY, name, namespace)
    except KubeApiError as e:
        if e.status == 404:
            return False
        raise
    return True
