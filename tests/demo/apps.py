"""Running the travel apps as real processes for tests.

The apps are standalone scripts (demo/travel/*.py), not an installed package, so importing
this module puts their directory on sys.path for the pure tests. `AppRunner` starts them
exactly as a pod would (cwd = demo/, configuration only through the environment) on
127.0.0.1, and stops every one it started by PID.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest

from tests.support.ports import free_port

DEMO_DIR = Path(__file__).resolve().parents[2] / "demo"
TRAVEL_DIR = DEMO_DIR / "travel"
if str(TRAVEL_DIR) not in sys.path:
    sys.path.insert(0, str(TRAVEL_DIR))

STARTUP_S = 10.0


@dataclass
class App:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log: IO[bytes]  # stderr goes to a file: a pipe nobody reads could fill and block the app

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def get(self, path: str, timeout: float = 15.0) -> tuple[int, Any]:
        """GET path; returns (status, decoded body: JSON object or text)."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(self.url(path), timeout=timeout) as resp:
                status, raw, ctype = resp.status, resp.read(), resp.headers["Content-Type"]
        except urllib.error.HTTPError as exc:
            status, raw, ctype = exc.code, exc.read(), exc.headers["Content-Type"]
        body = json.loads(raw) if ctype == "application/json" else raw.decode()
        return status, body

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def stop(self, timeout: float = 5.0) -> int:
        """SIGTERM, then SIGKILL if it does not exit in time; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        return self.proc.returncode


class AppRunner:
    """Starts travel apps as real processes; `close` stops every one it started."""

    def __init__(self) -> None:
        self.apps: list[App] = []

    def start(
        self,
        script: str,
        env: Mapping[str, str],
        *extra: str,
        pod: str | None = None,
        node: str = "node1",
        wait: bool = True,
    ) -> App:
        port = free_port()
        # Closed in close(), with the process: it must outlive this call.
        log = tempfile.TemporaryFile()  # noqa: SIM115
        full_env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "POD_NAME": pod or f"{script}-0",
            "POD_NAMESPACE": "travel",
            "POD_IP": "127.0.0.1",
            "NODE_NAME": node,
            **env,
        }
        proc = subprocess.Popen(
            [
                sys.executable,
                f"travel/{script}.py",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                *extra,
            ],
            cwd=DEMO_DIR,
            env=full_env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        app = App(script, port, proc, log)
        self.apps.append(app)
        if wait:
            self._wait_healthy(app)
        return app

    def _wait_healthy(self, app: App) -> None:
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            if app.proc.poll() is not None:
                pytest.fail(f"{app.name} exited with {app.proc.returncode}: {app.stderr()}")
            try:
                if app.get("/healthz", timeout=1.0) == (200, "ok"):
                    return
            except OSError:
                pass
            time.sleep(0.05)
        pytest.fail(f"{app.name} did not answer /healthz on port {app.port} in {STARTUP_S} s")

    def close(self) -> None:
        for app in self.apps:
            app.stop()
            app.log.close()


def service_env(name: str, app: App) -> dict[str, str]:
    prefix = name.upper()
    return {f"{prefix}_SERVICE_HOST": "127.0.0.1", f"{prefix}_SERVICE_PORT": str(app.port)}


@dataclass
class Chain:
    frontend: App
    flights: App
    pricing: App
