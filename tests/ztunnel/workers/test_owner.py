"""The owner's side with real worker processes, no root: they start and say hello, take
the mesh state, report, are restarted when killed, and stop with the owner. (Pods need
network namespaces: the netns tier covers them, tests/e2e/test_restart.py.)"""

from __future__ import annotations

import os
import signal
from typing import Any, cast

from meshcore.state import MeshState
from tests.support.aio import Loop, wait_until
from ztunnel.workers import owner as owner_module
from ztunnel.workers.owner import WorkerPool

ENV = {
    "NODE_NAME": "n1",
    "LOCAL_XDS_PATH": "/nonexistent/x.yaml",
    "ENROLMENT_PATH": "/nonexistent/e.yaml",
    "CA_ADDRESS": "/nonexistent/ca.sock",
    "CA_TOKEN_PATH": "/nonexistent/token",
    "LOG_LEVEL": "warning",
}


class NoCerts:
    """No pod starts here, so no certificate is ever asked for."""

    def on_update(self, _callback: Any) -> Any:
        return lambda: None


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_workers_start_report_restart_and_stop(aio: Loop, monkeypatch) -> None:
    monkeypatch.setattr(owner_module, "RESTART_DELAY", 0.05)

    async def main() -> None:
        pool = WorkerPool(3, cast(Any, NoCerts()), env={**os.environ, **ENV})
        aio.defer(pool.close)
        await pool.start()
        assert pool.all_up
        status = pool.status()
        assert sorted(status) == ["0", "1", "2"]
        assert all(v.startswith("ready") for v in status.values())
        pool.push_state(MeshState.empty())
        await pool.refresh()
        reports = pool.reports()
        assert [i for i, _ in reports] == [1, 2]
        assert all(r["connections"] == [] and r["pods"] == {} for _, r in reports)
        assert all(r["logLevel"] == "warning" for _, r in reports)
        pids = [int(r["pid"]) for _, r in reports]
        assert await pool.drain(0.1) == 0
        pool.set_log_level("debug")  # the admin port's /logging reaches every worker
        await pool.refresh()
        assert all(r["logLevel"] == "debug" for _, r in pool.reports())

        os.kill(pids[0], signal.SIGKILL)
        await wait_until(lambda: not pool.all_up, "the dead worker noticed")
        assert pool.status()["1"].startswith("down")
        await wait_until(lambda: pool.all_up, "the worker restarted")
        await pool.refresh()
        again = [int(r["pid"]) for _, r in pool.reports()]
        assert again[0] != pids[0] and again[1] == pids[1]
        # The restarted one has the level set since, not the one it was started with.
        assert all(r["logLevel"] == "debug" for _, r in pool.reports())

        await pool.close()
        assert not any(alive(p) for p in again)
        assert all(v.startswith("stopped") for k, v in pool.status().items() if k != "0")

    aio.run(main())
