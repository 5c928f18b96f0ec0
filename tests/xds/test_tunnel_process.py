"""(d) A real tunnel process (`python -m ztunnel`) configured with XDS_ADDRESS: it gets its
state from the discovery server over TLS and applies a pushed update, as its admin's
/config_dump shows. On loopback, no pods enrolled, as the unprivileged user."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

from controlplane.xds.auth import SubscriberAuth
from controlplane.xds.server import XdsServer
from tests.support.aio import Loop, wait_until
from tests.support.ports import free_port
from tests.xds.conftest import Harness
from tests.xds.states import demo_state
from tests.xds.test_server import changed_state

ROOT = Path(__file__).resolve().parents[2]


def config_dump(port: int) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/config_dump", timeout=2) as r:
            return json.loads(r.read())  # type: ignore[no-any-return]
    except OSError:
        return None


def start_tunnel(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "ztunnel"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def log_tail(log: Path, lines: int = 40) -> str:
    """The tunnel's last lines, for a failure's message: what it was doing when a wait
    ran out (a push not applied once in a loaded run, with no output kept to say why)."""
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"(no log: {e})"


def memory_map(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def workload_health(dump: dict[str, Any] | None, uid: str) -> str | None:
    if dump is None:
        return None
    for w in dump.get("workloads", []):
        if w.get("uid") == uid:
            return str(w.get("status"))
    return None


def test_tunnel_process_runs_on_pushed_state(aio: Loop, harness: Harness, tmp_path: Path) -> None:
    # The tunnel authenticates with the token its CA client uses (CA_TOKEN_PATH): here a
    # node token of the local cluster's kind.
    token = secrets.token_hex(32)
    server = XdsServer(
        demo_state(), auth=SubscriberAuth("cluster.local", node_tokens={token: "node1"})
    )
    roots = tmp_path / "root-cert.pem"
    roots.write_bytes(harness.ca.roots_pem())
    (tmp_path / "token").write_text(token + "\n")
    (tmp_path / "enrolment.yaml").write_text("{}\n")
    admin = free_port()
    uid = demo_state().workloads[0].uid
    gone = demo_state().workloads[-1].uid

    async def main() -> None:
        port = await harness.serve(server)
        env = {
            **os.environ,
            "NODE_NAME": "node1",
            "XDS_ADDRESS": f"127.0.0.1:{port}",
            "XDS_ROOT_CERT": str(roots),
            "ENROLMENT_PATH": str(tmp_path / "enrolment.yaml"),
            "CA_ADDRESS": str(tmp_path / "ca.sock"),  # never dialled: no pod is enrolled
            "CA_TOKEN_PATH": str(tmp_path / "token"),
            "ADMIN_PORT": str(admin),
            "METRICS_PORT": str(free_port()),
            "READINESS_PORT": str(free_port()),
        }
        log = tmp_path / "tunnel.log"
        proc = start_tunnel(env, log)

        def stop() -> None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

        aio.defer(stop)
        first: dict[str, Any] = {}

        def has_first() -> bool:
            assert proc.poll() is None, "the tunnel exited"
            dump = config_dump(admin)
            if dump is not None and workload_health(dump, uid) is not None:
                first.update(dump)
                return True
            return False

        try:
            await wait_until(has_first, "the tunnel's first state", limit=30, interval=0.2)
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- the tunnel's output ---\n{log_tail(log)}") from None
        assert len(first["workloads"]) == len(demo_state().workloads)
        assert first["config"]["rejected"] is None
        # The tunnel speaks gRPC with its own small client: grpcio's core is not loaded,
        # and the TLS to the server needs no `cryptography` either.
        loaded = memory_map(proc.pid)
        assert "cygrpc" not in loaded and "cryptography" not in loaded
        server.update(changed_state())

        def applied() -> bool:
            dump = config_dump(admin)
            return (
                dump is not None
                and workload_health(dump, uid) == "UNHEALTHY"
                and workload_health(dump, gone) is None
            )

        try:
            await wait_until(applied, "the pushed update in the tunnel", limit=30, interval=0.2)
        except AssertionError as e:
            dump = config_dump(admin)
            seen = {w.get("uid"): w.get("status") for w in (dump or {}).get("workloads", [])}
            raise AssertionError(
                f"{e}\nworkloads in the tunnel: {seen}\nnacks: {server.nacks}"
                f"\n--- the tunnel's output ---\n{log_tail(log)}"
            ) from None
        assert not server.nacks  # nothing refused

    aio.run(main, limit=90)
