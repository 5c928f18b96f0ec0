"""scripts/programs.txt is the one list of the programs the tree runs: setup installs them,
each is on PATH after setup, and nothing in the tree runs a program that is not on it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.scripts.programs import (
    INTERPRETER,
    LIST_PATH,
    ROOT,
    ProgramGuard,
    Site,
    makefile_sites,
    read_list,
    read_packages,
    scan,
    unlisted,
)

UNDER_CI = os.environ.get("CI", "").lower() == "true"

# Where the tree starts a program it cannot name, and why that is right.
DYNAMIC = {
    ("ambientctl/cli.py", "_cmd_exec"): "`ambientctl exec` runs the user's command in a pod",
    ("localcluster/apps.py", "start_app"): "pods' commands, from cluster files (scanned below)",
    ("meshcore/identity/certworker_client.py", "CertWorkerClient._spawn"): (
        "`python -m meshcore.identity.certworker`; a test may pass its own command"
    ),
    ("localcluster/kube/apiserver.py", "KubeControlPlane._spawn"): (
        "etcd and the kube-* servers, found by find_binaries() (PATH, else the build's cache)"
    ),
    ("localcluster/kube/container.py", "launch"): (
        "a container's own command, run inside its image's root filesystem (the image's "
        "programs, not the machine's)"
    ),
    ("benchmarks/chaosbench/targets.py", "restart"): (
        "a killed mesh process again, with the argv its record kept from when the cluster "
        "started it"
    ),
    ("tests/e2e/test_interrupted_runs.py", "start.go"): (
        "the fixture's runner: each test passes the venv's ambientctl or python and a benchmark"
    ),
}
# A test that a command which cannot start is reported: nothing runs.
DELIBERATELY_MISSING = {"/nonexistent/bin"}


@pytest.fixture(scope="module")
def sites() -> list[Site]:
    return scan()  # about 2 s: once for the module


def _setup_ran() -> bool:
    """scripts/setup-system.sh found every program of the current list on PATH."""
    stamp = ROOT / ".setup-stamp"
    return stamp.exists() and stamp.stat().st_mtime >= LIST_PATH.stat().st_mtime


def test_every_listed_program_is_on_path():
    missing = [f"{p} ({pkg})" for p, pkg in read_list().items() if shutil.which(p) is None]
    if missing and not UNDER_CI and not _setup_ran():
        pytest.skip(f"setup's system part has not run as root; missing: {', '.join(missing)}")
    assert missing == [], "run scripts/setup.sh as root; PATH is " + os.environ.get("PATH", "")


def test_every_program_the_tree_runs_is_listed(sites):
    problems = unlisted([s for s in sites if not s.programs() <= DELIBERATELY_MISSING], read_list())
    assert problems == []


def test_every_program_the_makefile_runs_is_listed():
    sites = makefile_sites(ROOT / "Makefile")
    assert {"bash", "rm"} <= {p for s in sites for p in s.programs()}
    assert unlisted(sites, read_list()) == []
    # The seeded case: a recipe that runs an unlisted program is reported.
    listed = {p: pkg for p, pkg in read_list().items() if p != "rm"}
    assert [line.split(": ")[1] for line in unlisted(sites, listed)] == [
        "runs 'rm', not in scripts/programs.txt"
    ]


def test_every_site_names_its_program_or_is_known_to_be_dynamic(sites):
    unnamed = {(s.path, s.function): s.unresolved() for s in sites if s.unresolved()}
    assert set(unnamed) == set(DYNAMIC), unnamed


def test_the_scan_sees_the_known_launchers(sites):
    # A scan that found nothing would pass the tests above: it must see what is known to be
    # there, through each kind of call it follows.
    found = {(s.path, p) for s in sites for p in s.programs()}
    for expected in [
        ("redirect/iptables.py", "nft"),  # _run(netns, ["nft", ...]): a wrapper's caller
        ("redirect/probes.py", "ipset"),
        ("localcluster/network.py", "iptables-restore"),  # subprocess.run([...])
        ("localcluster/capture.py", "ip"),
        ("localcluster/capture.py", "tcpdump"),  # `ip netns exec NS tcpdump`, via which()
        ("tests/redirect/test_ebpf.py", "tc"),  # nsutil.run_in(path, *argv)
        ("tests/e2e/test_l4_datapath.py", "ss"),
        ("benchmarks/meshbench/sidecar_cluster.py", "sleep"),  # a pod command in code
        ("benchmarks/bench-cluster.yaml", "sleep"),  # a pod command in a cluster file
    ]:
        assert expected in found


def test_the_list_is_well_formed_and_names_its_packages():
    listed = read_list()
    assert "nft" in listed and listed["nft"] == "nftables"
    assert {"iptables", "iproute2", "python3-venv"} <= read_packages()


SEEDED = {
    "tool/run.py": """
        import asyncio, os, shutil, subprocess, sys
        import nsutil

        TOOL = "frobnicate"

        def wrapper(path, argv, step):
            return subprocess.run(list(argv), check=False)

        async def main(opts):
            subprocess.run(["definitely-not-listed", "-x"])
            subprocess.Popen([TOOL])
            exe = shutil.which("whatsit") or "/usr/bin/whatsit"
            subprocess.run([exe, "--now"])
            wrapper("/x", ["wrapped-prog", "a"], "a step")
            nsutil.run_in("/x", "run-in-prog", "-n")
            os.execvp("execd", ["execd"])
            await asyncio.create_subprocess_exec("asyncprog", "x")
            subprocess.run(["ip", "netns", "exec", "ns1", "inside-netns"])
            subprocess.run(["iptables-save"])  # listed: not reported
            subprocess.run([sys.executable, "-c", "pass"])  # the interpreter: not reported
            subprocess.run(opts.argv)
    """,
    "nsutil/__init__.py": """
        import subprocess

        def run_in(path, *argv):
            return subprocess.run(argv, check=True)
    """,
    "cluster.yaml": """
        pods:
          - {name: a, command: ["netcat", "-l"]}
          - {name: b, command: ["{python}", "app.py"]}
    """,
}


def test_the_scan_reports_seeded_unlisted_programs(tmp_path: Path):
    for path, text in SEEDED.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(textwrap.dedent(text))
    sites = scan(tmp_path)
    reported = {
        line.split("runs ")[1].split(",")[0].strip("'") for line in unlisted(sites, read_list())
    }
    assert reported == {
        "definitely-not-listed",
        "frobnicate",
        "whatsit",
        "/usr/bin/whatsit",
        "wrapped-prog",
        "run-in-prog",
        "execd",
        "asyncprog",
        "inside-netns",
        "netcat",
    }
    assert [(s.path, s.function) for s in sites if s.unresolved()] == [("tool/run.py", "main")]
    assert any(INTERPRETER in s.outcomes for s in sites if s.path == "cluster.yaml")


def test_the_guard_records_an_unlisted_program_and_follows_ip_netns_exec():
    guard = ProgramGuard({"ip": "iproute2", "iptables-save": "iptables"})
    guard.current = "a test"
    guard.check(["/usr/sbin/iptables-save"])
    guard.check([sys.executable, "-c", "pass"])
    guard.check(["/nonexistent/bin"])  # cannot start: nothing runs
    guard.check(["ip", "netns", "exec", "ns1", "nc", "-l"])
    guard.check(["sh", "-c", "true"])
    assert guard.violations == [("a test", "nc"), ("a test", "sh")]


GUARDED = """
import json, subprocess, sys
from tests.scripts.programs import ProgramGuard
guard = ProgramGuard({"sleep": "coreutils"})
guard.install()
subprocess.run(["sleep", "0"], check=True)
subprocess.run(["env", "true"], check=True)
print(json.dumps(guard.violations))
"""


def test_the_installed_guard_sees_real_subprocesses():
    # In a process of its own: an audit hook cannot be removed again.
    done = subprocess.run(
        [sys.executable, "-c", GUARDED], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [["collection", "env"]]
