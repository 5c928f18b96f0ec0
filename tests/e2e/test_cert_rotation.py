"""Certificate rotation under load: 8 s certificates, so each tunnel rotates every few seconds.

The load (tests/e2e/loadgen.py) opens a new connection every 20 ms from a pod on n1 to a
pod on n2, plus three long-lived connections echoing every 100 ms, for 16 s: at least two
rotations of both identities. Every new connection must work, and the long-lived ones must
survive the rotations (and the expiry of the certificates they were opened with), while
the client's pool drains the HBONE connections made with an expiring certificate. The
rotations are counted from the serials the tunnels' admin `/config_dump` shows.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import pytest

import nsutil
from localcluster import mesh
from meshcore.defaults import ADMIN_PORT

from .common import HERE

pytestmark = pytest.mark.netns

CLUSTER_FILE = HERE / "cert_rotation.yaml"
LOAD_SECONDS = 16.0
CLIENT = "spiffe://cluster.local/ns/mesh/sa/client"
SERVER = "spiffe://cluster.local/ns/mesh/sa/server"


def certificates(c: mesh.Cluster, node: str) -> list[dict[str, Any]]:
    _, body = mesh.node_http(c.layout, node, ADMIN_PORT, "/config_dump")
    dump: dict[str, Any] = json.loads(body)
    return list(dump["certificates"])


def retired(c: mesh.Cluster) -> int:
    """Connections the client's pool drained because their certificates were expiring."""
    _, body = mesh.node_http(c.layout, "n1", ADMIN_PORT, "/config_dump")
    for pod in json.loads(body)["pods"]:
        if pod["workload"] == "mesh/client":
            return int(pod["hbonePool"]["retired"])
    raise AssertionError("no client pod in n1's config dump")


def test_rotation_under_load_fails_no_request(cluster: mesh.Cluster) -> None:
    target = str(cluster.layout.pod("mesh", "server").ip)
    load = subprocess.Popen(
        [sys.executable, str(HERE / "loadgen.py"), target, "9000", "--seconds", str(LOAD_SECONDS),
         "--interval-ms", "20", "--long", "3"],
        preexec_fn=nsutil.preexec_enter(cluster.pod_netns("mesh", "client")),
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    serials: dict[str, set[str]] = {CLIENT: set(), SERVER: set()}
    try:
        deadline = time.monotonic() + LOAD_SECONDS
        while time.monotonic() < deadline and load.poll() is None:
            for node in ("n1", "n2"):
                for cert in certificates(cluster, node):
                    if cert["identity"] in serials and "serial" in cert:
                        assert cert["state"] == "valid", cert
                        serials[cert["identity"]].add(cert["serial"])
            time.sleep(0.25)
        out, _ = load.communicate(timeout=LOAD_SECONDS + 40)
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
    assert load.returncode == 0
    result = json.loads(out)
    rotations = {identity: len(s) - 1 for identity, s in serials.items()}
    print(
        f"\nrotation: {result['attempts']} new connections, {len(result['failures'])} failed, "
        f"rotations {rotations}, long-lived {result['long']}"
    )
    assert result["attempts"] > 300
    assert result["failures"] == []
    assert all(x.get("ok") and x.get("rounds", 0) > 100 for x in result["long"]), result["long"]
    assert min(rotations.values()) >= 2, rotations
    # Pooled connections made with an expiring certificate were drained, not kept in use
    # (the long-lived streams on them survived, as checked above).
    assert retired(cluster) >= 1
