"""The parts of setup that must work without root: the system part's check (it names what is
missing and installs nothing), and the unprivileged runner that `make unit` uses."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--no-new-privs"]
CAP_DAC_READ_SEARCH = 1 << 2


@pytest.fixture
def checkout() -> Iterator[Path]:
    """A directory with setup's system part in it, that nobody can write too."""
    d = Path(tempfile.mkdtemp(prefix="setup-system-"))
    try:
        # Throwaway directories that the user the script runs as (maybe nobody) writes.
        os.chmod(d, 0o777)
        (d / "scripts").mkdir()
        os.chmod(d / "scripts", 0o777)
        shutil.copy(ROOT / "scripts" / "setup-system.sh", d / "scripts")
        yield d
    finally:
        shutil.rmtree(d)


def _as_a_user(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    # As root this runs as nobody: setup must not install (or need) anything here.
    prefix = NOBODY if os.geteuid() == 0 else []
    return subprocess.run(
        [*prefix, *argv], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def test_the_system_part_as_a_user_names_what_is_missing_and_installs_nothing(checkout):
    (checkout / "scripts" / "programs.txt").write_text(
        "# program  package  why\n"
        "sh                 dash                present\n"
        "no-such-program-x  no-such-package-x   missing\n"
        "-                  no-such-package-y   a package with nothing to run\n"
    )
    done = _as_a_user(["bash", "scripts/setup-system.sh"], checkout)
    assert done.returncode == 0, done.stderr
    assert "no-such-program-x (no-such-package-x)" in done.stderr
    assert "no-such-package-y" in done.stderr
    assert "needs root" in done.stderr
    assert "(dash)" not in done.stderr
    assert not (checkout / ".setup-stamp").exists()


def test_the_system_part_as_a_user_stamps_a_complete_list(checkout):
    (checkout / "scripts" / "programs.txt").write_text("sh  dash  present\n")
    done = _as_a_user(["bash", "scripts/setup-system.sh"], checkout)
    assert done.returncode == 0, done.stderr
    assert "missing" not in done.stderr
    assert (checkout / ".setup-stamp").exists()


PROBE = """
import os
caps = [line for line in open("/proc/self/status") if line.startswith("CapEff:")]
print(os.geteuid(), os.getegid(), int(caps[0].split()[1], 16), os.environ["HOME"],
      os.environ.get("TMPDIR", "-"))
"""


def test_the_unprivileged_runner_drops_root():
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "unprivileged.sh"), sys.executable, "-c", PROBE],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    uid, gid, caps, home, tmp = done.stdout.split()
    assert int(uid) != 0 and int(gid) != 0
    # No capability, or when it says so only the one to read the checkout and interpreter.
    allowed = CAP_DAC_READ_SEARCH if "CAP_DAC_READ_SEARCH" in done.stderr else 0
    if os.geteuid() != 0:
        allowed = CAP_DAC_READ_SEARCH  # already unprivileged: it keeps what this run has
    assert int(caps) & ~allowed == 0
    if os.geteuid() == 0:
        assert (int(uid), int(gid)) == (65534, 65534)
        assert Path(home).stat().st_uid == 65534  # its own home, kept for its caches
        assert not Path(tmp).exists()  # its TMPDIR is removed afterwards


def _base_prefix(python: str) -> str:
    return subprocess.run(
        [python, "-c", "import sys; print(sys.base_prefix)"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout.strip()  # fmt: skip


@pytest.mark.skipif(not os.access("/usr/bin/python3", os.X_OK), reason="no Debian python3 here")
@pytest.mark.skipif("PYTHON" in os.environ, reason="PYTHON chose the interpreter")
def test_the_venv_is_built_from_debians_python3():
    # setup.sh builds .venv from /usr/bin/python3 (the optimised build the mesh's image runs),
    # not from the first python3 on PATH, and rebuilds a .venv made from another one: the
    # suite, the demo and the benchmarks then run on the interpreter the image ships.
    assert sys.prefix != sys.base_prefix, "not running in a venv"
    assert sys.base_prefix == _base_prefix("/usr/bin/python3")
