"""The tunnel says which mesh config it runs (readiness JSON and config dump), and which
newer file it refused and why: what `ambientctl apply --wait` and `status` read."""

from __future__ import annotations

import hashlib
from pathlib import Path

from meshcore.discovery import LocalConfigWatcher
from meshcore.identity.certs import CertificateManager
from meshcore.identity.certworker_client import CertWorkerClient
from tests.support.aio import Loop
from tests.support.certs import InProcessCA
from ztunnel.node import NodeProxy

GOOD = "workloads: []\nservices: []\npolicies: []\n"
# A kind the mesh config does not carry (a Sidecar has no meaning in ambient mode).
REFUSED = GOOD.replace(
    "policies: []",
    "policies: [{apiVersion: networking.istio.io/v1, kind: Sidecar, "
    "metadata: {name: vs, namespace: default}, spec: {}}]",
)


def test_status_and_config_dump_carry_the_digest_in_force_and_a_refusal(
    aio: Loop, tmp_path: Path
) -> None:
    path = tmp_path / "xds.yaml"
    path.write_text(GOOD)
    good = hashlib.sha256(GOOD.encode()).hexdigest()

    async def main() -> None:
        certs = aio.closing(
            CertificateManager(InProcessCA(), crypto=CertWorkerClient(idle_exit=0.01))
        )
        node = aio.closing(NodeProxy("n1", certs, "cluster.local"))
        watcher = aio.closing(LocalConfigWatcher(path, node.on_state, interval=60))
        await watcher.start()
        node.config_status = lambda: watcher.status
        assert node.status()["config"] == node.config_dump()["config"]
        assert node.status()["config"] == {"digest": good, "rejected": None}

        path.write_text(REFUSED)
        await watcher.check_now()
        after = node.status()["config"]
        assert after == node.config_dump()["config"]
        assert after["digest"] == good  # the last good config stays in force
        assert after["rejected"]["digest"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert "'Sidecar' is not one of AuthorizationPolicy" in after["rejected"]["error"]

    aio.run(main)
