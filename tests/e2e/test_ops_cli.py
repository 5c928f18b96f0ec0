"""Day-2 commands on a real cluster (ops.yaml), each run as its own process as a user runs
it: `ambientctl up` in a pseudo-terminal (its steps and spinner appear while it runs),
`logs` (with `--since`, `--tail`, `-f`), `access-log` (filtered by pod and identity),
`metrics` (filtered by name), `apply --wait` (its steps as plain lines in a pipe),
`explain` for a client outside the mesh, and `ambientctl down` in a pseudo-terminal.

The tests run in file order on the module's one cluster: the first is `up`, the last `down`
(the fixture takes the cluster down whatever happened).
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pyroute2 import netns as pr_netns

from localcluster import mesh

from .common import echo, logged, pod_ip, vip

pytestmark = pytest.mark.netns

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
CLUSTER_FILE = HERE / "ops.yaml"
NAME = "opsx"
CLIENT_ID = "spiffe://cluster.local/ns/mesh/sa/client"
RUN_TIMEOUT = 240.0  # the whole `up` on a loaded machine; a hang fails, not a slow run


def _argv(state_root: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "ambientctl.cli", "--state-root", str(state_root), *args]


def _env() -> dict[str, str]:
    # This tree's code, in the command and in every process it starts.
    return {**os.environ, "PYTHONPATH": str(ROOT), "TERM": "xterm", "COLUMNS": "120"}


@dataclass
class Transcript:
    """What a command wrote to its terminal, chunk by chunk, each with whether the command
    was still running when the chunk was read."""

    chunks: list[tuple[str, bool]] = field(default_factory=list)
    returncode: int | None = None

    @property
    def text(self) -> str:
        return "".join(c for c, _ in self.chunks)

    def seen_while_running(self, needle: str) -> bool:
        text = ""
        for chunk, running in self.chunks:
            text += chunk
            if needle in text:
                return running
        return False


def run_in_pty(argv: list[str], timeout: float = RUN_TIMEOUT) -> Transcript:
    """Run `argv` with a pseudo-terminal (120 columns) as stdin, stdout and stderr."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(
        argv, stdin=slave, stdout=slave, stderr=slave, env=_env(), cwd=ROOT,
        start_new_session=True,
    )  # fmt: skip
    os.close(slave)
    out = Transcript()
    deadline = time.monotonic() + timeout
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the command closed the terminal (it exited)
                    break
                if not data:
                    break
                out.chunks.append((data.decode(errors="replace"), proc.poll() is None))
            elif proc.poll() is not None:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"{argv} still running after {timeout} s:\n{out.text}")
    finally:
        if proc.poll() is None:
            proc.kill()
        out.returncode = proc.wait()
        os.close(master)
    return out


def ctl(state_root: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        _argv(state_root, *args), capture_output=True, text=True, env=_env(), cwd=ROOT,
        timeout=timeout,
    )  # fmt: skip
    assert "Traceback" not in done.stderr, done.stderr
    return done


@dataclass
class Session:
    state_root: Path
    up: Transcript


@pytest.fixture(scope="module")
def session() -> Iterator[Session]:
    state_root = Path(tempfile.mkdtemp(prefix="e2e-ops-"))
    try:
        up = run_in_pty(_argv(state_root, "up", str(CLUSTER_FILE)))
        yield Session(state_root, up)
    finally:
        mesh.down(NAME, state_root)
        left = [n for n in pr_netns.listnetns() if n.startswith(f"{NAME}-")]
        shutil.rmtree(state_root, ignore_errors=True)
        assert not left, f"namespaces left behind: {left}"


@pytest.fixture
def cluster(session: Session) -> mesh.Cluster:
    assert session.up.returncode == 0, session.up.text
    return mesh.attach(CLUSTER_FILE, session.state_root)


# ---- up, in a terminal ------------------------------------------------------------------------


def test_up_in_a_terminal_shows_each_step_and_a_spinner_while_it_runs(session: Session) -> None:
    up = session.up
    assert up.returncode == 0, up.text
    text = up.text
    for step in (
        "building the network: 1 nodes, 3 pods",
        "starting the certificate authority",
        "starting the node agent and tunnel on n1",
        "waiting for the tunnels to be ready",
        "waiting for the apps to listen",
    ):
        assert up.seen_while_running(step), f"{step!r} not shown while up ran:\n{text}"
        assert f"✓ {step}" in text, text  # left as a finished line once the next began
    # The spinner: one step redrawn in place with more than one frame.
    frames = set(re.findall(r"\r\x1b\[K(\S) waiting for the (?:tunnels|apps)", text))
    assert len(frames) >= 2, text
    last = text.rstrip().splitlines()[-1]
    assert last.startswith(f"cluster {NAME} is up: 1 nodes, 3 pods; state in "), text


# ---- logs ---------------------------------------------------------------------------------------


def _traffic(c: mesh.Cluster) -> None:
    """One connection from the mesh (client -> service) and one from outside it."""
    assert echo(c, "mesh", "client", vip(c, "mesh", "server"), 80, b"hi")[1] == b"hi"
    assert echo(c, "plain", "outsider", pod_ip(c, "mesh", "server"), 9000, b"yo")[1] == b"yo"
    outsider = pod_ip(c, "plain", "outsider")
    assert logged(c, f'"src.addr": "{outsider}')
    assert logged(c, f'"src.identity": "{CLIENT_ID}"')


def test_logs_of_the_tunnel_since_and_tail(cluster: mesh.Cluster, session: Session) -> None:
    root = session.state_root
    every = ctl(root, "logs", str(CLUSTER_FILE), "ztunnel")
    assert every.returncode == 0, every.stderr
    lines = every.stdout.splitlines()
    assert len(lines) > 3 and all(json.loads(line)["timestamp"] for line in lines[:3])
    assert ctl(root, "logs", str(CLUSTER_FILE), "ztunnel/n1", "--tail", "2").stdout.count("\n") == 2
    # Nothing is newer than the future: `--since` filters on the lines' own timestamps.
    recent = ctl(root, "logs", str(CLUSTER_FILE), "ztunnel", "--since", "1h")
    assert recent.stdout == every.stdout
    assert ctl(root, "logs", str(CLUSTER_FILE), "agent", "--since", "1h").stdout.strip()
    bad = ctl(root, "logs", str(CLUSTER_FILE), "ztunnel", "--since", "5")
    assert bad.returncode == 2 and "expected e.g. 30s" in bad.stderr
    missing = ctl(root, "logs", str(CLUSTER_FILE), "mesh/nope")
    assert missing.returncode == 1 and "no pod mesh/nope" in missing.stderr
    assert ctl(root, "logs", str(CLUSTER_FILE), "server", "-n", "mesh").returncode == 0


def test_logs_follow_prints_new_lines_until_interrupted(
    cluster: mesh.Cluster, session: Session
) -> None:
    proc = subprocess.Popen(
        _argv(session.state_root, "logs", str(CLUSTER_FILE), "ztunnel", "-f", "--tail", "0"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), cwd=ROOT,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        # Only lines written from now on: the follower may not have read the file yet when
        # a connection ends, so connect until one's line comes through while it runs.
        seen = b""
        for _ in range(30):
            echo(cluster, "mesh", "client", vip(cluster, "mesh", "server"), 80, b"f")
            ready, _, _ = select.select([fd], [], [], 2.0)
            if ready:
                chunk = os.read(fd, 65536)
                assert chunk, f"the follower ended: {proc.stderr.read() if proc.stderr else ''!r}"
                seen += chunk
            if b"connection complete" in seen:
                break
        assert b"connection complete" in seen, seen
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=30)
    assert rc == 0


# ---- the access log -----------------------------------------------------------------------------


def test_access_log_by_pod_and_identity(cluster: mesh.Cluster, session: Session) -> None:
    _traffic(cluster)
    root = session.state_root
    table = ctl(root, "access-log", str(CLUSTER_FILE), "--pod", "mesh/server")
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split() == [
        "TIME", "NODE", "DIRECTION", "SOURCE", "DESTINATION", "IDENTITY", "SENT", "RECV",
        "DURATION", "RESULT",
    ]  # fmt: skip
    assert any("mesh/client" in r and CLIENT_ID in r and "outbound" in r for r in rows), rows
    outsider = pod_ip(cluster, "plain", "outsider")
    assert any(r.split()[3].startswith(outsider) for r in rows), rows
    by_id = ctl(root, "access-log", str(CLUSTER_FILE), "--identity", CLIENT_ID, "-o", "json")
    docs = json.loads(by_id.stdout)
    assert docs and all(CLIENT_ID in (d.get("src.identity"), d.get("dst.identity")) for d in docs)
    assert {d["node"] for d in docs} == {"n1"}
    none = ctl(root, "access-log", str(CLUSTER_FILE), "--pod", "plain/nobody")
    assert (none.returncode, none.stdout) == (0, "No connections found.\n")


# ---- metrics ------------------------------------------------------------------------------------


def test_metrics_filtered_by_name(cluster: mesh.Cluster, session: Session) -> None:
    _traffic(cluster)
    root = session.state_root
    text = ctl(root, "metrics", str(CLUSTER_FILE), "istio_tcp_connections_opened")
    assert text.returncode == 0, text.stderr
    assert text.stdout.startswith("# ==> ztunnel/n1 (node n1) <==\n")
    samples = [line for line in text.stdout.splitlines() if not line.startswith("#")]
    assert samples and all(s.startswith("istio_tcp_connections_opened_total{") for s in samples)
    doc = json.loads(ctl(root, "metrics", str(CLUSTER_FILE), "opened", "-o", "json").stdout)
    got = doc["ztunnel/n1"]["samples"]
    assert any(
        s["labels"].get("source_principal") in (CLIENT_ID, CLIENT_ID.removeprefix("spiffe://"))
        and s["value"] >= 1
        for s in got
    ), got
    nothing = ctl(root, "metrics", str(CLUSTER_FILE), "no_such_metric", "--node", "n1")
    assert nothing.stdout.endswith("# no metric matches\n")
    bad = ctl(root, "metrics", str(CLUSTER_FILE), "--node", "n9")
    assert bad.returncode == 1 and "no node 'n9'" in bad.stderr


# ---- apply --wait, explain -----------------------------------------------------------------------

ONLY_MESH = """apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: only-mesh, namespace: mesh}
spec:
  selector: {matchLabels: {app: server}}
  action: ALLOW
  rules: [{from: [{source: {namespaces: [mesh]}}]}]
"""


def test_apply_wait_reports_its_steps_and_explain_warns_for_a_plaintext_client(
    cluster: mesh.Cluster, session: Session, tmp_path: Path
) -> None:
    root = session.state_root
    policy = tmp_path / "only-mesh.yaml"
    policy.write_text(ONLY_MESH)
    done = ctl(root, "apply", str(CLUSTER_FILE), "-f", str(policy), "--wait")
    assert done.returncode == 0, done.stderr
    # Not a terminal: plain lines on stderr, the result on stdout.
    assert "waiting for every tunnel to run mesh config " in done.stderr
    assert "\r" not in done.stderr
    assert done.stdout.splitlines()[-1].startswith("every tunnel runs the new mesh config")
    why = ctl(root, "explain", str(CLUSTER_FILE), "plain/outsider", "server.mesh:80")
    assert why.returncode == 0, why.stderr
    assert "Route:        NOT_CAPTURED" in why.stdout
    assert "delivery:       plaintext" in why.stdout
    assert "authorization:  DENIED" in why.stdout
    assert "namespaces or principals" in why.stdout
    inside = ctl(root, "explain", str(CLUSTER_FILE), "mesh/client", "server.mesh:80")
    assert "delivery:       in-process" in inside.stdout, inside.stdout


# ---- down, in a terminal (last) ---------------------------------------------------------------


def test_down_in_a_terminal(session: Session) -> None:
    down = run_in_pty(_argv(session.state_root, "down", NAME))
    assert down.returncode == 0, down.text
    assert "stopping the processes of cluster opsx" in down.text
    assert re.search(r"✓ removing \d+ network namespaces", down.text), down.text
    assert down.text.rstrip().splitlines()[-1].startswith(f"cluster {NAME} is down ("), down.text
    assert not [n for n in pr_netns.listnetns() if n.startswith(f"{NAME}-")]
