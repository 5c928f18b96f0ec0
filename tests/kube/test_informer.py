"""The list-then-watch informer against the real API server: events, resume, relist on 410."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from pathlib import Path

import pytest

from kube.client import KubeApiError, KubeClient, load_kubeconfig
from kube.informer import Event, Informer
from kube.kinds import NAMESPACE, Kind
from localcluster.kube.apiserver import KubeControlPlane, running

pytestmark = pytest.mark.kube

CONFIGMAP = Kind("", "v1", "ConfigMap", "configmaps")


def cm(name: str, v: str = "1") -> dict[str, object]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"v": v}}


async def until(pred: Callable[[], bool], within: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not pred():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def _events_then_relist(cp: KubeControlPlane) -> None:
    ns = "inf-" + secrets.token_hex(3)
    async with KubeClient(load_kubeconfig(cp.kubeconfig)) as c:
        await c.create(NAMESPACE, {"metadata": {"name": ns}})
        await c.create(CONFIGMAP, cm("a"), ns)
        seen: list[tuple[Event, str]] = []
        inf = Informer(c, CONFIGMAP, namespace=ns)
        inf.add_handler(lambda ev, key, old, new: seen.append((ev, key)))
        inf.start()
        await asyncio.wait_for(inf.synced.wait(), 10)
        assert (Event.ADDED, f"{ns}/a") in seen
        await c.create(CONFIGMAP, cm("b"), ns)
        await c.patch(CONFIGMAP, "a", {"data": {"v": "2"}}, ns)
        await until(lambda: (Event.MODIFIED, f"{ns}/a") in seen and f"{ns}/b" in inf.cache)
        assert inf.cache[f"{ns}/a"]["data"]["v"] == "2"

        # Stop following, change things while nobody watches, and restart the API server:
        # its watch cache starts at the current version, so resuming from ours must fail with
        # 410, and the relist must report the deletion it never saw as an event.
        await inf.stop()
        stale = inf.version
        await c.delete(CONFIGMAP, "a", ns)
        await c.create(CONFIGMAP, cm("c"), ns)
        await c.close()
        await asyncio.to_thread(cp.restart_apiserver)
        with pytest.raises(KubeApiError) as gone:
            async for _ in c.watch(CONFIGMAP, stale, ns, timeout_s=2):
                pass
        assert gone.value.status == 410
        seen.clear()
        inf.start()
        await until(lambda: (Event.DELETED, f"{ns}/a") in seen)
        assert inf.relists == 1
        assert (Event.ADDED, f"{ns}/c") in seen
        assert f"{ns}/c" in inf.cache and f"{ns}/a" not in inf.cache
        await inf.stop()
        await c.delete(NAMESPACE, ns)


def test_informer_follows_changes_and_relists_after_410(tmp_path: Path) -> None:
    # A control plane of its own: the test restarts its API server.
    with running(tmp_path) as cp:
        asyncio.run(_events_then_relist(cp))


async def _bad_token(cp: KubeControlPlane) -> None:
    cfg = load_kubeconfig(cp.kubeconfig)
    from dataclasses import replace

    async with KubeClient(replace(cfg, token="not-a-token")) as c:
        with pytest.raises(KubeApiError) as e:
            await c.list(NAMESPACE)
        assert e.value.status == 401


def test_a_wrong_token_is_refused_with_its_status(kube_cp: KubeControlPlane) -> None:
    asyncio.run(_bad_token(kube_cp))
