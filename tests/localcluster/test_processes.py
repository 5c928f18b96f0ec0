"""Processes spawned inside a netns, recorded by pid + start time, stopped from anywhere."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroute2 import netns as pr_netns

import nsutil
from localcluster.processes import (
    ProcessError,
    ProcessRecord,
    is_running,
    read_records,
    spawn_in_netns,
    stop_recorded,
)

pytestmark = pytest.mark.netns

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]
# Ignores SIGTERM, so only the SIGKILL escalation can stop it.
STUBBORN = [
    sys.executable,
    "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', "
    "flush=True); time.sleep(60)",
]


@pytest.fixture
def netns_path() -> Iterator[str]:
    name = f"lcp-{secrets.token_hex(4)}"
    pr_netns.create(name)
    try:
        yield nsutil.netns_path(name)
    finally:
        pr_netns.remove(name)


def _wait_for(path: Path, text: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} never appeared in {path}")


def test_spawn_runs_inside_netns_and_records_identity(netns_path, tmp_path):
    proc = spawn_in_netns(
        netns_path, SLEEPER, {}, tmp_path, tmp_path / "s.log", tmp_path / "pids", "sleeper"
    )
    try:
        assert os.stat(f"/proc/{proc.pid}/ns/net").st_ino == os.stat(netns_path).st_ino
        assert os.getpgid(proc.pid) == proc.pid  # own session and group
        [rec] = read_records(tmp_path / "pids")
        assert rec.pid == proc.pid
        assert is_running(rec.pid, rec.start_time)
        assert stop_recorded(tmp_path / "pids") == 1
        assert proc.popen.wait(timeout=5) is not None
        assert list((tmp_path / "pids").glob("*.pid")) == []
    finally:
        proc.stop()


def test_stop_escalates_to_sigkill(netns_path, tmp_path):
    log = tmp_path / "stubborn.log"
    proc = spawn_in_netns(netns_path, STUBBORN, {}, tmp_path, log, tmp_path / "pids", "stubborn")
    try:
        _wait_for(log, "ready")
        started = time.monotonic()
        assert stop_recorded(tmp_path / "pids", timeout=0.5) == 1
        assert proc.popen.wait(timeout=5) == -9
        assert time.monotonic() - started < 5
    finally:
        proc.stop()


def test_reused_pid_is_never_signalled(tmp_path):
    # A live process that is NOT the recorded one: same pid, different start time.
    bystander = subprocess.Popen(SLEEPER)
    try:
        pids = tmp_path / "pids"
        pids.mkdir()
        stat = Path(f"/proc/{bystander.pid}/stat").read_text()
        start = int(stat[stat.rindex(")") + 2 :].split()[19])
        fake = ProcessRecord("x", bystander.pid, start + 12345, (), "", "")
        (pids / "x.pid").write_text(fake.to_json())
        assert stop_recorded(pids) == 0
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_corrupt_and_missing_records_are_harmless(tmp_path):
    pids = tmp_path / "pids"
    assert stop_recorded(pids) == 0  # no directory at all
    pids.mkdir()
    (pids / "torn.pid").write_text('{"pid": 12')
    assert stop_recorded(pids) == 0
    assert not (pids / "torn.pid").exists()


def test_bad_spawn_inputs_raise_process_error(netns_path, tmp_path):
    with pytest.raises(ProcessError, match="does not exist"):
        spawn_in_netns(
            "/var/run/netns/nope-x", SLEEPER, {}, tmp_path, tmp_path / "l", tmp_path, "a"
        )
    with pytest.raises(ProcessError, match="used as filename"):
        spawn_in_netns(netns_path, SLEEPER, {}, tmp_path, tmp_path / "l", tmp_path, "../evil")
    with pytest.raises(ProcessError, match="cannot start"):
        spawn_in_netns(
            netns_path, ["/nonexistent/bin"], {}, tmp_path, tmp_path / "l", tmp_path, "a"
        )
