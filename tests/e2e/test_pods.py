"""Pods as users see them, on a real cluster (pods.yaml): an app's death is noticed and
taken out of its Service, `get pods` says so, a restarted app comes back, and `exec` (like
the apps `up` starts) runs with the pod's environment and resolver.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from ambientctl import cli, pods, views
from localcluster import appstatus, mesh
from localcluster.apps import process_name

from .common import HERE, echo, vip

pytestmark = pytest.mark.netns

CLUSTER_FILE = HERE / "pods.yaml"
REPO = HERE.parent.parent
WAIT_S = 30.0


def wait_until(cond: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def get_pods(c: mesh.Cluster, capsys: pytest.CaptureFixture[str], output: str = "table") -> str:
    args = argparse.Namespace(
        cluster_file=str(CLUSTER_FILE),
        state_root=str(c.state.dir.parent),
        namespace="mesh",
        all_namespaces=False,
        name=None,
        output=output,
        show_labels=False,
        kubeconfig=None,
        context=None,
    )
    capsys.readouterr()
    assert pods.run_get_pods(args) == 0
    return capsys.readouterr().out


def row(table: str, name: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith(name + " "))
    return line.split()


def services(c: mesh.Cluster) -> str:
    def get(node: str, path: str) -> tuple[int, bytes]:
        return mesh.node_http(c.layout, node, 15000, path)

    return views.show("services", get, ["n1"], "table")


def endpoints(c: mesh.Cluster, name: str) -> str:
    line = next(x.split() for x in services(c).splitlines() if x.split()[:2] == ["mesh", name])
    return line[-1]  # ENDPOINTS: healthy/total


def workload_status(c: mesh.Cluster, name: str) -> str:
    doc = yaml.safe_load(c.paths.xds.read_text())
    return str(next(w["status"] for w in doc["workloads"] if w["name"] == name))


def app_pid(c: mesh.Cluster, ns: str, name: str) -> int:
    rec = mesh.process_record(c, process_name(ns, name))
    assert rec is not None, f"the app of {ns}/{name} is not running"
    return rec.pid


def outbound_lines(c: mesh.Cluster, node: str) -> list[dict[str, object]]:
    out = []
    for line in c.tunnel_log(node).read_text().splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict) and doc.get("direction") == "outbound" and "dst.workload" in doc:
            out.append(doc)
    return out


def test_a_killed_replica_leaves_its_service(
    cluster: mesh.Cluster, capsys: pytest.CaptureFixture[str]
):
    c = cluster
    table = get_pods(c, capsys)
    assert row(table, "server-0")[1:4] == ["1/1", "Running", "enrolled"]
    wait_until(lambda: endpoints(c, "server") == "2/2", "both replicas as endpoints")

    os.kill(app_pid(c, "mesh", "server-0"), signal.SIGKILL)

    wait_until(lambda: workload_status(c, "server-0") == "Unhealthy", "the workload Unhealthy")
    wait_until(lambda: endpoints(c, "server") == "1/2", "services to show 1/2")
    table = get_pods(c, capsys)
    assert row(table, "server-0")[1:5] == ["0/1", "Killed", "(exit", "137)"]
    assert row(table, "server-1")[1:3] == ["1/1", "Running"]
    doc = json.loads(get_pods(c, capsys, "json"))
    dead = next(i for i in doc["items"] if i["metadata"]["name"] == "server-0")
    assert dead["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 137
    # describe, through the command line: the pod named NAMESPACE/NAME.
    capsys.readouterr()
    argv = ["--state-root", str(c.state.dir.parent), "describe", "pod", "mesh/server-0"]
    assert cli.main([*argv, "--cluster", str(CLUSTER_FILE)]) == 0
    described = dict(
        line.split(":", 1) for line in capsys.readouterr().out.splitlines() if ":" in line
    )
    assert described["Ready"].strip() == "False"
    assert described["Last Exit Code"].strip() == "137"
    assert described["Mesh"].strip() == "enrolled"

    # Every connection to the Service now reaches the live replica (a connection sent to
    # the dead one would fail: nothing listens there).
    seen = len(outbound_lines(c, "n1"))
    for i in range(12):
        _, data = echo(c, "mesh", "client", vip(c, "mesh", "server"), 80, b"ping %d" % i)
        assert data == b"ping %d" % i
    wait_until(lambda: len(outbound_lines(c, "n1")) >= seen + 12, "the access-log lines")
    targets = {str(d["dst.workload"]) for d in outbound_lines(c, "n1")[seen:]}
    assert targets == {"server-1"}


def test_a_restarted_app_is_healthy_again(
    cluster: mesh.Cluster, capsys: pytest.CaptureFixture[str]
):
    c = cluster
    first = app_pid(c, "mesh", "phoenix-0")
    os.kill(first, signal.SIGKILL)

    def back() -> bool:
        app = appstatus.read(c.state.dir).get("mesh/phoenix-0")
        return app is not None and app.running and app.restarts == 1

    wait_until(back, "the supervisor to restart phoenix-0")
    assert app_pid(c, "mesh", "phoenix-0") != first
    wait_until(lambda: workload_status(c, "phoenix-0") == "Healthy", "the workload Healthy")
    wait_until(lambda: endpoints(c, "phoenix") == "1/1", "services to show 1/1")
    assert row(get_pods(c, capsys), "phoenix-0")[1:5] == ["1/1", "Running", "enrolled", "1"]


def app_log(c: mesh.Cluster, name: str) -> str:
    path = c.state.log_dir / f"{process_name('mesh', name)}.log"
    return path.read_text() if path.exists() else ""


def exec_in(c: mesh.Cluster, pod: str, *argv: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "ambientctl.cli", "--state-root", str(c.state.dir.parent)]
    cmd += ["exec", str(CLUSTER_FILE), pod, "--", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=60)


def test_exec_and_the_app_get_the_pods_environment(cluster: mesh.Cluster):
    c = cluster
    done = exec_in(
        c,
        "mesh/client",
        sys.executable,
        "-c",
        "import json, os; print(json.dumps(dict(os.environ)))",
    )
    assert done.returncode == 0, done.stderr
    env = json.loads(done.stdout)
    server_vip = vip(c, "mesh", "server")
    want = {
        "POD_NAME": "client",
        "POD_NAMESPACE": "mesh",
        "POD_IP": str(c.layout.pod("mesh", "client").ip),
        "NODE_NAME": "n1",
        "SERVICE_ACCOUNT": "client",
        "GREETING": "hello",
        "SERVER_SERVICE_HOST": server_vip,
        "SERVER_SERVICE_PORT": "80",
        "SERVER_SERVICE_PORT_ECHO": "80",
        "SERVER_PORT": f"tcp://{server_vip}:80",
        "SERVER_PORT_80_TCP": f"tcp://{server_vip}:80",
        "SERVER_PORT_80_TCP_ADDR": server_vip,
        "PHOENIX_SERVICE_HOST": vip(c, "mesh", "phoenix"),
    }
    assert {k: env.get(k) for k in want} == want
    # The app `up` started has the very same pod variables.
    wait_until(lambda: "ENV " in app_log(c, "client"), "the client app's output")
    log = app_log(c, "client")
    app_env = json.loads(log.split("ENV ", 1)[1].splitlines()[0])
    assert {k: app_env.get(k) for k in want} == want


RESOLV = (
    "search mesh.svc.cluster.local svc.cluster.local cluster.local\n"
    "nameserver 10.244.2.53\n"
    "options ndots:5\n"
)


def test_exec_and_the_app_get_the_pods_resolver(cluster: mesh.Cluster):
    c = cluster
    done = exec_in(c, "mesh/client", "cat", "/etc/resolv.conf")
    assert done.returncode == 0, done.stderr
    assert done.stdout == RESOLV
    wait_until(lambda: "RESOLV " in app_log(c, "client"), "the client app's output")
    line = app_log(c, "client").split("RESOLV ", 1)[1].splitlines()[0]
    assert json.loads(line) == RESOLV
    # The machine's own file is untouched.
    assert Path("/etc/resolv.conf").read_text() != RESOLV
    # A short name resolves by the pod's search path, answered by the node's tunnel.
    done = exec_in(
        c,
        "mesh/client",
        sys.executable,
        "-c",
        "import socket; print(socket.gethostbyname('server'))",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == vip(c, "mesh", "server")
