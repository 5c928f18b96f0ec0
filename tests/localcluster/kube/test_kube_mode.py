"""`ambientctl up --kubernetes`: a control plane and kubelet that outlive the command, a
kubeconfig for kubectl, and `down` leaving nothing behind."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import netns as pr_netns

from ambientctl.cli import main
from kube.podnetns import netns_name
from localcluster.kube.apiserver import kubectl
from localcluster.processes import is_running, read_records
from localcluster.state import ClusterState, state_dir, teardown

from ..cluster_factory import random_cluster_name
from .conftest import pod_ready, wait_for

pytestmark = [pytest.mark.kube, pytest.mark.netns, pytest.mark.slow]


@pytest.fixture
def kube_cluster_file(tmp_path: Path) -> Iterator[tuple[Path, Path, str]]:
    name = random_cluster_name()
    f = tmp_path / "cluster.yaml"
    f.write_text(f"name: {name}\nnodes:\n  - name: node1\n  - name: node2\n", encoding="utf-8")
    root = tmp_path / "state"
    try:
        yield f, root, name
    finally:
        teardown(name, root)  # whatever the test did


def test_up_kubernetes_runs_pods_and_down_removes_everything(
    kube_cluster_file: tuple[Path, Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    f, root, name = kube_cluster_file
    assert main(["--state-root", str(root), "up", "--kubernetes", str(f)]) == 0
    out = capsys.readouterr().out
    assert main(["--state-root", str(root), "kubeconfig", name]) == 0
    kubeconfig = capsys.readouterr().out.strip()
    assert f"kubeconfig: {kubeconfig}" in out and Path(kubeconfig).is_file()

    def kc(*args: str, stdin: str | None = None) -> str:
        done = subprocess.run(
            [kubectl(), "--kubeconfig", kubeconfig, *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    nodes = json.loads(kc("get", "nodes", "-o", "json"))["items"]
    assert sorted(n["metadata"]["name"] for n in nodes) == ["node1", "node2"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "idle", "namespace": "default"},
        "spec": {
            "automountServiceAccountToken": False,
            "containers": [
                {
                    "name": "c",
                    "image": "x",
                    "command": ["python", "-c", "import time; time.sleep(600)"],
                }
            ],
        },
    }
    kc("apply", "-f", "-", stdin=json.dumps(pod))

    def running() -> dict[str, Any] | None:
        got = json.loads(kc("get", "pod", "idle", "-o", "json"))
        return got if pod_ready(got) else None

    got = wait_for(running, 60, "the pod Ready", lambda: kc("get", "pods", "-o", "wide"))
    uid = str(got["metadata"]["uid"])
    assert os.path.exists(f"/var/run/netns/{netns_name(uid)}")
    state = ClusterState.load(name, root)
    assert state is not None and netns_name(uid) in state.netns
    records = read_records(state.pidfile_dir)
    names = {r.name for r in records}
    assert {"kubelet", "kube-apiserver", "etcd", "kube-scheduler"} <= names

    assert main(["--state-root", str(root), "down", name]) == 0
    assert not any(is_running(r.pid, r.start_time) for r in records)
    assert not os.path.exists(f"/var/run/netns/{netns_name(uid)}")
    assert not [n for n in pr_netns.listnetns() if n.startswith(f"{name}-")]
    assert not state_dir(name, root).joinpath("kube").exists()


def test_up_kubernetes_refuses_a_file_with_pods(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name = random_cluster_name()
    f = tmp_path / "cluster.yaml"
    f.write_text(
        f"name: {name}\nnodes: [{{name: n1}}]\nnamespaces: [{{name: a}}]\npods:\n"
        '  - {name: p, namespace: a, node: n1, command: ["true"]}\n',
        encoding="utf-8",
    )
    assert main(["--state-root", str(tmp_path / "s"), "up", "--kubernetes", str(f)]) == 1
    assert "only its nodes are used" in capsys.readouterr().err
    assert not [n for n in pr_netns.listnetns() if n.startswith(f"{name}-")]
