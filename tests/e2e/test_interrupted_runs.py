"""SIGINT or SIGTERM while a program builds its cluster: it tears down what it built, says
so, and exits 128 + the signal (130, 143). One real run per program, signalled as soon as
its cluster exists (its bridge namespace and a first recorded process): the cheapest point
where there is something to leave behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pyroute2 import netns as pr_netns

from localcluster.processes import ProcessRecord, is_running, read_records
from tests.support.aio import wait_until_sync

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parent.parent.parent
BIN = Path(sys.executable).parent
START_LIMIT = 120.0  # the program must have built something by then


@dataclass
class Run:
    proc: subprocess.Popen[str]
    cluster: str
    tmp: Path

    def netns(self) -> list[str]:
        return [n for n in pr_netns.listnetns() if n.startswith(f"{self.cluster}-")]

    def records(self) -> list[ProcessRecord]:
        out: list[ProcessRecord] = []
        for pids in self.tmp.glob(f"**/{self.cluster}/pids"):
            out += read_records(pids)
        return out

    def built(self) -> bool:
        return f"{self.cluster}-c" in self.netns() and bool(self.records())

    def wait_built(self) -> list[ProcessRecord]:
        """Until the cluster's bridge netns and a first recorded process exist."""
        what = f"{self.cluster}'s namespaces and a first process"
        wait_until_sync(lambda: self.built() or self.proc.poll() is not None, what, START_LIMIT)
        assert self.proc.poll() is None, self.proc.communicate()
        return self.records()


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[[list[str], str], Run]]:
    runs: list[Run] = []

    def go(argv: list[str], cluster: str) -> Run:
        env = dict(os.environ, TMPDIR=str(tmp_path), PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(
            argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        run = Run(proc, cluster, tmp_path)
        runs.append(run)
        return run

    yield go
    for run in runs:  # a failed test must not leave its run building a cluster
        if run.proc.poll() is None:
            run.proc.send_signal(signal.SIGTERM)
            run.proc.communicate(timeout=120)


def _interrupt(run: Run, sig: signal.Signals) -> None:
    records = run.wait_built()
    run.proc.send_signal(sig)
    _, err = run.proc.communicate(timeout=180)
    assert run.proc.returncode == 128 + sig, err
    assert f"interrupted by {sig.name}: tore down cluster {run.cluster} (" in err, err
    assert "Traceback" not in err, err
    assert run.netns() == []
    assert [r.name for r in records if is_running(r.pid, r.start_time)] == []


CLUSTER = """
name: {name}
nodes: [{{name: n1}}]
namespaces: [{{name: mesh, labels: {{istio.io/dataplane-mode: ambient}}}}]
pods:
  - {{name: a, namespace: mesh, node: n1,
     command: ["{{python}}", "-c", "import signal; signal.pause()"]}}
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_ambientctl_up(start, tmp_path: Path, sig: signal.Signals) -> None:
    cfile = tmp_path / "c.yaml"
    cfile.write_text(CLUSTER.format(name="intr"))
    run = start([str(BIN / "ambientctl"), "--state-root", str(tmp_path), "up", str(cfile)], "intr")
    _interrupt(run, sig)


def test_ambientctl_demo(start, tmp_path: Path) -> None:
    run = start([str(BIN / "ambientctl"), "--state-root", str(tmp_path), "demo"], "travel")
    _interrupt(run, signal.SIGINT)


def test_mesh_bench(start, tmp_path: Path) -> None:
    argv = [
        sys.executable, "benchmarks/mesh_bench.py", "--quick", "--scenarios", "none",
        "--placements", "cross-node", "--no-earlier", "--cluster-name", "intrb",
        "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    _interrupt(start(argv, "intrb"), signal.SIGTERM)


def test_l4_datapath(start) -> None:
    run = start([sys.executable, "benchmarks/l4_datapath.py", "--rounds", "1"], "bench")
    _interrupt(run, signal.SIGINT)
