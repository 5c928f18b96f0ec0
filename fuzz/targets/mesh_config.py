"""The mesh config parser (meshcore.discovery.parse_local_config, building
meshcore.state.MeshState): the LOCAL_XDS document, YAML or JSON.

Contract: raises MeshConfigError and nothing else.
"""

from __future__ import annotations

import yaml

from fuzz.targets import samples
from meshcore.discovery import parse_local_config
from meshcore.state import MeshConfigError


def test_one_input(data: bytes) -> None:
    try:
        state = parse_local_config(data.decode("utf-8", "replace"))
    except MeshConfigError:
        return
    # A parsed state answers its lookups.
    for w in state.workloads:
        for ip in w.ips:
            state.workload_by_ip(w.network, ip)


def seeds() -> dict[str, bytes]:
    return {
        "config-json": samples.text(samples.config()),
        "config-yaml": yaml.safe_dump(samples.config(policies=[])).encode(),
        "workloads-only": samples.text({"workloads": samples.WORKLOADS}),
    }
