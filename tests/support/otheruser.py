"""Run a small client as another user (nobody), for the peer-credential checks.

The client is a forked child that drops to nobody (setgroups, setgid, setuid) before it
connects, so the kernel records nobody's uid on the connection as for any other user's
process. The child runs only plain socket calls and leaves with `os._exit`, so nothing of
the parent (its event loop, its cleanups) runs twice. Its directory and socket must be
reachable by that user: `reachable_dir` makes one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def reachable_dir() -> Iterator[Path]:
    """A fresh directory any user may traverse (a pytest tmp_path is root-only)."""
    d = Path(tempfile.mkdtemp(prefix="localtrust-"))
    try:
        d.chmod(0o755)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


async def as_nobody(client: Callable[[], int]) -> int:
    """Fork, become nobody, run `client`; its return value is the child's exit status
    (99 when it raised, 98 when it could not drop privileges)."""
    if os.geteuid() != 0:
        raise RuntimeError("running as another user needs root")
    nobody = pwd.getpwnam("nobody")  # here, not at import: collection never needs it
    pid = os.fork()
    if pid == 0:  # the child
        code = 98
        try:
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            code = 99
            code = client()
        finally:
            os._exit(code)
    _, status = await asyncio.to_thread(os.waitpid, pid, 0)
    return os.waitstatus_to_exitcode(status)
