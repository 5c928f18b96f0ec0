"""A CA outage (SIGKILL of the CA process): the pods already served keep their traffic on
the certificates they hold; a pod enrolled during the outage stays pending with its traffic
refused (captured, no listener: never passed in plaintext) and is served within the short
backoff cap (meshcore.identity.lifetime.BACKOFF_MAX_WAITING) once the CA is back.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from localcluster import mesh
from meshcore.defaults import ADMIN_PORT
from meshcore.identity.lifetime import BACKOFF_MAX_WAITING
from redirect.enrolment import DATAPLANE_MODE_LABEL

from .common import HERE, echo, logged, pod_ip, pod_socket

pytestmark = pytest.mark.netns

CLUSTER_FILE = HERE / "ca_outage.yaml"
LATE = "spiffe://cluster.local/ns/late/sa/late"


def late_status(c: mesh.Cluster) -> str | None:
    _, body = mesh.node_http(c.layout, "n1", ADMIN_PORT, "/config_dump")
    dump: dict[str, Any] = json.loads(body)
    for pod in dump["pods"]:
        if pod["workload"] == "late/late":
            return str(pod["status"])
    return None


def wait_for(cond: Any, what: str, limit: float) -> float:
    start = time.monotonic()
    while not cond():
        assert time.monotonic() - start < limit, f"no {what} within {limit} s"
        time.sleep(0.1)
    return time.monotonic() - start


def late_connect_fails(c: mesh.Cluster) -> str | None:
    """What stopped the late pod's connection to the server, or None if it got through."""
    with pod_socket(c, "late", "late") as s:
        s.settimeout(3)
        try:
            s.connect((pod_ip(c, "mesh", "server"), 9000))
            s.recv(100)
        except OSError as e:
            return f"{type(e).__name__}: {e}"
    return None


def test_ca_outage_keeps_existing_pods_and_holds_new_ones_until_it_returns(
    cluster: mesh.Cluster,
) -> None:
    c = cluster
    server = pod_ip(c, "mesh", "server")
    assert echo(c, "mesh", "client", server, 9000, b"before")[1] == b"before"
    assert mesh.kill_ca(c)
    try:
        # Existing pods: their traffic goes on, over HBONE, on the certificates they hold.
        for i in range(20):
            payload = f"outage-{i}".encode()
            assert echo(c, "mesh", "client", server, 9000, payload)[1] == payload
        # A pod enrolled now: pending with the CA's absence as the reason, traffic refused.
        mesh.label_pod(c, "late", "late", DATAPLANE_MODE_LABEL, "ambient")
        wait_for(lambda: "cannot reach the CA" in (late_status(c) or ""), "pending late pod", 20)
        assert (late_status(c) or "").startswith("pending")
        why = late_connect_fails(c)
        assert why is not None, "the late pod's traffic passed while it had no certificate"
        time.sleep(2.0)  # a few retries fail (the backoff grows, up to its short cap)
        assert (late_status(c) or "").startswith("pending")
    finally:
        mesh.start_ca(c.spec, c.layout, c.state)
    back_in = wait_for(lambda: late_status(c) == "ready", "late pod served", 30)
    print(f"\nCA outage: late pod refused ({why}); served {back_in:.1f} s after the CA restarted")
    assert back_in <= BACKOFF_MAX_WAITING + 3.0
    seen, data = echo(c, "late", "late", server, 9000, b"after")
    assert data == b"after" and seen.split(":")[0] == pod_ip(c, "late", "late")
    assert logged(c, f'"src.identity": "{LATE}"')  # carried over HBONE, as itself
