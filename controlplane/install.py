"""Installs the CustomResourceDefinitions the mesh reads, and the `istio-waypoint` GatewayClass.

The CRDs are YAML under `controlplane/crds/` (Istio security and networking, Gateway API), each
served at the versions users apply today, with a structural schema that keeps `spec` and
`status` verbatim (the mesh checks specs with its own parsers) and the status subresource on.
`install_crds` applies them server-side (idempotent: a second run changes nothing), waits until
the API server reports every one Established (only then can objects of the kind be created),
then applies the GatewayClass.
"""

from __future__ import annotations

import asyncio
from importlib import resources
from typing import Any

import yaml

from controlplane import status
from kube.client import KubeClient
from kube.kinds import CRD, GATEWAY_CLASS

FIELD_MANAGER = "ambient-mesh-controlplane"
WAYPOINT_CLASS = "istio-waypoint"
WAYPOINT_CONTROLLER = "istio.io/waypoint-controller"
CRD_FILES = ("istio-security.yaml", "istio-networking.yaml", "gateway-api.yaml")


class InstallError(RuntimeError):
    """The CRDs could not be installed or did not become Established in time."""


def load_crds() -> list[dict[str, Any]]:
    """Every CRD the mesh installs, as decoded documents (in file order)."""
    out: list[dict[str, Any]] = []
    folder = resources.files("controlplane").joinpath("crds")
    for name in CRD_FILES:
        for doc in yaml.safe_load_all(folder.joinpath(name).read_text(encoding="utf-8")):
            if isinstance(doc, dict):
                out.append(doc)
    return out


def cluster_role() -> dict[str, Any]:
    """The ClusterRole `python -m controlplane` runs with (`controlplane/rbac/`)."""
    text = resources.files("controlplane").joinpath("rbac", "clusterrole.yaml").read_text()
    doc: dict[str, Any] = yaml.safe_load(text)
    return doc


def waypoint_gateway_class() -> dict[str, Any]:
    return {
        "apiVersion": GATEWAY_CLASS.api_version,
        "kind": "GatewayClass",
        "metadata": {"name": WAYPOINT_CLASS},
        "spec": {
            "controllerName": WAYPOINT_CONTROLLER,
            "description": "The mesh's waypoints (L7 proxies)",
        },
    }


def established(crd: dict[str, Any]) -> bool:
    conditions = (crd.get("status") or {}).get("conditions") or ()
    return any(
        isinstance(c, dict) and c.get("type") == "Established" and c.get("status") == "True"
        for c in conditions
    )


async def install_crds(client: KubeClient, within: float = 30.0) -> list[str]:
    """Apply every CRD and the waypoint GatewayClass; return the CRD names once all are
    Established. Raises `InstallError` naming the ones that are not, after `within` seconds."""
    crds = load_crds()
    names = [str(c["metadata"]["name"]) for c in crds]
    for crd in crds:
        await client.apply(CRD, crd, manager=FIELD_MANAGER)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    waiting = set(names)
    while waiting:
        for name in sorted(waiting):
            if established(await client.get(CRD, name)):
                waiting.discard(name)
        if not waiting:
            break
        if loop.time() > deadline:
            raise InstallError(
                f"CRDs not Established after {within:g} s: {', '.join(sorted(waiting))}; "
                "check the API server's log"
            )
        await asyncio.sleep(0.1)
    gc = await client.apply(GATEWAY_CLASS, waypoint_gateway_class(), manager=FIELD_MANAGER)
    await _accept_class(client, gc)
    return names


async def accept_waypoint_class(client: KubeClient) -> bool:
    """Where the class was installed by someone else (the base chart): report it Accepted,
    as its controller. False when it is not there (yet)."""
    gc = await client.find(GATEWAY_CLASS, WAYPOINT_CLASS)
    if gc is None:
        return False
    await _accept_class(client, gc)
    return True


async def _accept_class(client: KubeClient, gc: dict[str, Any]) -> None:
    """The class's Accepted condition, as the controller that owns it reports it."""
    old = gc.get("status") or {}
    generation = (gc.get("metadata") or {}).get("generation") or 0
    new = [status.condition("Accepted", True, "Accepted", "Handled by the mesh", generation)]
    conditions = status.merged(old.get("conditions"), new, status.now_text())
    if not status.same(old.get("conditions"), conditions):
        await client.patch(
            GATEWAY_CLASS,
            WAYPOINT_CLASS,
            {"status": {"conditions": conditions}},
            subresource="status",
        )
