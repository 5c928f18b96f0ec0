"""Run a test's Python code in a child process of its own and read back its result.

For what must not happen in the test process: a lowered descriptor limit, another network
namespace (`unshare`), another user (`scripts/unprivileged.sh`), a loop of another kind. The
child prints one line `RESULT <json>`; anything else it prints is kept for the failure
message.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULT = "RESULT "
Completed = subprocess.CompletedProcess[str]


def run_child(code: str, *args: str, timeout: float = 120) -> tuple[Any, Completed]:
    """Run `code` (`python -c`, this checkout importable) with `args`. Asserts the child
    succeeded and printed one result line; returns the decoded result and the finished
    process (its output, for further checks)."""
    return _run([sys.executable, "-c", code, *args], timeout)


def run_child_under(
    prefix: tuple[str, ...], code: str, *args: str, timeout: float = 120
) -> tuple[Any, Completed]:
    """`run_child` under the command `prefix` (`unshare --net`, `scripts/unprivileged.sh`)."""
    return _run([*prefix, sys.executable, "-c", code, *args], timeout)


def _run(argv: list[str], timeout: float) -> tuple[Any, Completed]:
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith(RESULT)]
    assert len(lines) == 1, f"one result line expected: {done.stdout}\n{done.stderr}"
    return json.loads(lines[0].removeprefix(RESULT)), done
