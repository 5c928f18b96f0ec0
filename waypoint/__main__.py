"""`python -m waypoint`: run one waypoint (configuration from the environment,
`waypoint/config.py`): HBONE on POD_IP:15008, readiness on 15021, metrics on 15020, admin on
127.0.0.1:15000. SIGTERM drains: the listener closes (a new waypoint beside this one takes
new connections), every connection gets GOAWAY, open streams finish within DRAIN_SECONDS.
"""

from __future__ import annotations

import meshcore.runtime.lean  # noqa: F401  (first: before anything imports structlog)

# isort: split
import asyncio
import os
import signal
import sys

import structlog

from meshcore.admin.readiness import ReadinessServer
from meshcore.admin.server import AdminServer, MetricsServer, process_metrics
from meshcore.runtime.entry import run_process
from waypoint.config import WaypointConfig, parse_config
from waypoint.instance import Waypoint

log = structlog.get_logger("waypoint")


async def run(cfg: WaypointConfig) -> None:
    wp = Waypoint(cfg)
    await wp.start()
    readiness = ReadinessServer(wp, cfg.readiness_port)
    await readiness.start()
    admin = AdminServer(wp, cfg.admin_port, host="127.0.0.1")
    await admin.start()
    metrics = MetricsServer(wp, process_metrics(), cfg.metrics_port)
    await metrics.start()
    log.info(
        "waypoint started",
        waypoint=f"{cfg.namespace}/{cfg.name}",
        pid=os.getpid(),
        address=wp.server.address,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(wp.quit_requested.wait())]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for w in waits:
        w.cancel()
    log.info("waypoint draining", deadline_seconds=cfg.drain_seconds)
    await wp.drain()
    await readiness.close()
    await admin.close()
    await metrics.close()
    await wp.close()
    log.info("waypoint stopped")


def main() -> int:
    return run_process("waypoint", parse_config, lambda cfg: cfg.log_level, run)


if __name__ == "__main__":
    sys.exit(main())
