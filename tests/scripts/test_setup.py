"""Setup's system part without root: it names what is missing and installs nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--no-new-privs"]


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
