"""`python -m controlplane.xds`: serves a mesh-config file over TLS and pushes its edits."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from controlplane.xds.tls import server_identity
from meshcore.xds import messages as m
from meshcore.xds.client import XdsClient, XdsTarget
from meshcore.xds.convert import RESOURCE_TYPES
from meshcore.xds.grpc import client_context
from meshcore.xds.source import XDS_INITIAL_WAIT
from tests.support.aio import Loop, wait_until
from tests.xds.states import demo_document
from tests.xds.test_tunnel_process import ROOT, free_port


def start_server(args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "controlplane.xds", *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def write(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def test_server_process_pushes_file_edits(aio: Loop, tmp_path: Path) -> None:
    config = tmp_path / "xds.json"
    doc = demo_document()
    write(config, json.dumps(doc))
    port = free_port()
    proc = start_server(
        ["--config", str(config), "--state-dir", str(tmp_path), "--listen", f"127.0.0.1:{port}"]
    )

    def stop() -> None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    aio.defer(stop)
    root = tmp_path / "ca" / "root-cert.pem"

    async def main() -> None:
        await wait_until(root.exists, "the CA's root", limit=20, interval=0.1)
        target = XdsTarget(
            "127.0.0.1", port, client_context(root.read_bytes()), server_identity("cluster.local")
        )
        client = XdsClient(target, m.Node(id="n"), lambda _s: None, RESOURCE_TYPES)
        aio.defer(client.close)
        await client.start(wait=XDS_INITIAL_WAIT)
        assert len(client.current.workloads) == len(doc["workloads"])
        doc["workloads"].pop()
        write(config, json.dumps(doc))
        await wait_until(
            lambda: len(client.current.workloads) == len(doc["workloads"]), "the edit pushed"
        )
        assert proc.poll() is None

    aio.run(main)
