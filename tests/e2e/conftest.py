"""Fixtures of the end-to-end tier: each module runs against one cluster of its own.

A module names its cluster file (`CLUSTER_FILE`, default cluster.yaml) and the capture
modes it must pass in (`REDIRECT_MODES`, default iptables only; a test marked
`redirect_modes(...)` runs in those of them only, on the same clusters); the `cluster` fixture
brings that cluster up once per mode for the whole module and always takes it down
afterwards, checking that nothing of it is left. Helpers the tests call are in common.py.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroute2 import netns as pr_netns

from localcluster import mesh

from .common import HERE, pod_socket, root_links

DEFAULT_MODES = ("iptables",)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    modes = getattr(metafunc.module, "REDIRECT_MODES", DEFAULT_MODES)
    if "redirect_mode" in metafunc.fixturenames and len(modes) > 1:
        only = metafunc.definition.get_closest_marker("redirect_modes")
        mine = [m for m in modes if only is None or m in only.args]
        assert mine, f"{metafunc.definition.nodeid}: none of {modes} in its redirect_modes"
        # Parametrized even with one mode left: the test then shares that mode's cluster.
        metafunc.parametrize("redirect_mode", mine, scope="module", indirect=True)


@pytest.fixture(scope="module")
def redirect_mode(request: pytest.FixtureRequest) -> str:
    """The capture mode the module's cluster runs in."""
    mode: str = getattr(request, "param", DEFAULT_MODES[0])
    return mode


@pytest.fixture(scope="module")
def root_links_before() -> set[str]:
    return root_links()


@pytest.fixture(scope="module")
def cluster(
    request: pytest.FixtureRequest, redirect_mode: str, root_links_before: set[str]
) -> Iterator[mesh.Cluster]:
    cluster_file: Path = getattr(request.module, "CLUSTER_FILE", HERE / "cluster.yaml")
    state_root = tempfile.mkdtemp(prefix="e2e-state-")
    try:
        c = mesh.up(cluster_file, state_root, redirect_mode=redirect_mode)
        try:
            wait_apps_listening(c)
            yield c
        finally:
            mesh.down(c.spec.name, state_root)
        # Everything went: namespaces (with their rules and ipsets), sockets, root links.
        left = [n for n in pr_netns.listnetns() if n.startswith(f"{c.spec.name}-")]
        assert not left, f"namespaces left behind: {left}"
        assert not list(Path(state_root).glob("**/*.sock")), "sockets left behind"
        assert root_links() == root_links_before, "links left in the root namespace"
    finally:
        shutil.rmtree(state_root, ignore_errors=True)


TESTAPP_PORTS = (9000, 9001)
APP_START_TIMEOUT = 30.0


def wait_apps_listening(c: mesh.Cluster) -> None:
    """Until every testapp pod accepts on its ports. `mesh.up` waits for the mesh, not for
    the apps (the cluster file has no readiness probes): on a loaded machine a test's first
    connection could otherwise be refused by an app still starting. Asked over the pod's
    own loopback, which no capture mode touches."""
    deadline = time.monotonic() + APP_START_TIMEOUT
    for pod in c.spec.pods:
        if not any(arg.endswith("testapp.py") for arg in pod.command):
            continue
        for port in TESTAPP_PORTS:
            while not _accepts(c, pod.namespace, pod.name, port):
                assert time.monotonic() < deadline, (
                    f"{pod.namespace}/{pod.name} never listened on {port}"
                )
                time.sleep(0.05)


def _accepts(c: mesh.Cluster, ns: str, pod: str, port: int) -> bool:
    with pod_socket(c, ns, pod) as s:
        s.settimeout(2)
        try:
            s.connect(("127.0.0.1", port))
        except OSError:
            return False
    return True
