"""What a failed test leaves for the reader: the tails of its cluster's logs.

A cluster's state directory (and its logs) goes with the fixture's teardown, and CI keeps
only what the test printed. A fixture calls `print_logs_if_failed` before tearing down: on a
failed test the tails land in the report's "Captured stdout teardown" section.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from localcluster.processes import is_running, read_records

# Set by tests/conftest.py's makereport hook: the report of each phase that has run.
PHASE_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()

TAIL_LINES = 80


def phase_failed(request: pytest.FixtureRequest) -> bool:
    """Whether the test's setup or call phase failed (known at the fixture's teardown)."""
    reports = request.node.stash.get(PHASE_REPORTS, {})
    return any(r.failed for r in reports.values())


def tail(path: Path, lines: int = TAIL_LINES) -> list[str]:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return [f"(unreadable: {e})"]
    return text.splitlines()[-lines:]


def dump_stacks(pidfile_dir: Path, *names: str) -> None:
    """Ask the recorded processes called `names` that are still the very processes recorded
    for every thread's stack (SIGUSR1, which they register with faulthandler): a stuck one
    explains itself in its log."""
    asked = False
    for rec in read_records(pidfile_dir):
        if rec.name in names and is_running(rec.pid, rec.start_time):
            try:
                os.kill(rec.pid, signal.SIGUSR1)
            except ProcessLookupError:
                continue
            asked = True
    if asked:
        time.sleep(0.5)  # faulthandler writes from a signal handler: at once, but not before


def print_logs_if_failed(
    request: pytest.FixtureRequest,
    log_dir: Path,
    *names: str,
    stacks_of: tuple[Path, tuple[str, ...]] | None = None,
) -> None:
    """The last lines of each log in `log_dir` (or only those whose file name starts with
    one of `names`), if the test failed. `stacks_of`: (pidfile directory, process names)
    whose thread stacks to ask for first (`dump_stacks`)."""
    if not phase_failed(request):
        return
    if stacks_of is not None:
        pidfile_dir, processes = stacks_of
        dump_stacks(pidfile_dir, *processes)
    logs = sorted(log_dir.glob("*.log")) if log_dir.is_dir() else []
    chosen = [p for p in logs if not names or p.name.startswith(names)]
    for path in chosen:
        print(f"----- {path.name} (last {TAIL_LINES} lines) -----")
        for line in tail(path):
            print(line)
