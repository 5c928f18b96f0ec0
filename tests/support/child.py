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

# For a child that runs out of descriptors on purpose: prepend to its code, open what must
# exist first, then `hog = fill_fd_table()` ... `free(hog)`.
FD_HOG = """
import os as _os


def fill_fd_table():
    hog = []
    try:
        while True:
            hog.append(_os.open("/dev/null", _os.O_RDONLY))
    except OSError:
        pass
    return hog


def free(hog):
    for fd in hog:
        _os.close(fd)


async def connect_while_out_of_fds(port, seconds):
    # Connect to 127.0.0.1:port with the descriptor table full, wait `seconds`, free it;
    # the CPU time used meanwhile (a listener spinning on its ready socket uses it all) and
    # the connected socket.
    import asyncio, socket, time

    loop = asyncio.get_running_loop()
    waiting = socket.socket()  # its fd exists before the table is full
    waiting.setblocking(False)
    hog = fill_fd_table()
    cpu = time.process_time()
    await loop.sock_connect(waiting, ("127.0.0.1", port))
    await asyncio.sleep(seconds)
    cpu = time.process_time() - cpu
    free(hog)
    return cpu, waiting
"""


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
