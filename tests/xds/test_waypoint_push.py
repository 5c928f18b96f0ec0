"""A waypoint configured with XDS_ADDRESS gets its routes, policies and endpoints pushed:
the first state before it serves, then every update (never polled), on loopback."""

from __future__ import annotations

import secrets
from ipaddress import ip_address
from pathlib import Path

from controlplane.xds.auth import SubscriberAuth
from controlplane.xds.server import XdsServer
from meshcore.identity.certs import CertificateManager
from meshcore.state import MeshState
from meshcore.xds import convert
from meshcore.xds.source import XdsSettings
from tests.support.aio import Loop, wait_until
from tests.support.certs import InProcessCA
from tests.support.ports import free_port
from tests.xds.conftest import Harness
from tests.xds.states import RESOURCES, demo_document, demo_state
from waypoint.config import WaypointConfig, parse_config
from waypoint.instance import Waypoint


def without_routes() -> MeshState:
    import json

    from meshcore.discovery import parse_local_config

    return parse_local_config(json.dumps(demo_document(resources=[])))


def test_waypoint_gets_routes_pushed(aio: Loop, harness: Harness, tmp_path: Path) -> None:
    # The waypoint authenticates with its CA token (CA_TOKEN_PATH), a node token here.
    token = secrets.token_hex(32)
    server = XdsServer(
        demo_state(), auth=SubscriberAuth("cluster.local", node_tokens={token: "node1"})
    )
    roots = tmp_path / "root.pem"
    roots.write_bytes(harness.ca.roots_pem())
    (tmp_path / "token").write_text(token)

    async def main() -> None:
        port = await harness.serve(server)
        cfg = WaypointConfig(
            name="waypoint",
            namespace="travel",
            node_name="node1",
            pod_ip=ip_address("127.0.0.1"),
            local_xds_path=None,
            ca_address=Path("/nonexistent"),
            ca_token_path=tmp_path / "token",
            hbone_port=free_port(),
            xds=XdsSettings(f"127.0.0.1:{port}", roots),
        )
        wp = Waypoint(cfg, certs=CertificateManager(InProcessCA()))
        aio.defer(wp.close)
        await wp.start()
        assert wp.state == convert.canonical(demo_state())
        assert [r.name for r in wp.state.resources("HTTPRoute")] == ["flights-canary"]
        assert wp.state.resources("PeerAuthentication")
        l7_before = wp.l7
        server.update(without_routes())
        await wait_until(lambda: not wp.state.resources("HTTPRoute"), "the route's removal")
        assert wp.l7 is not l7_before  # the L7 config was rebuilt from the pushed state
        assert len(RESOURCES) == 1

    aio.run(main)


def test_waypoint_config_takes_one_source() -> None:
    base = {
        "WAYPOINT_NAME": "wp",
        "POD_NAMESPACE": "ns",
        "NODE_NAME": "n",
        "POD_IP": "10.0.0.1",
        "CA_ADDRESS": "/ca",
        "CA_TOKEN_PATH": "/t",
    }
    cfg = parse_config({**base, "XDS_ADDRESS": "istiod:15012", "XDS_ROOT_CERT": "/root.pem"})
    assert cfg.local_xds_path is None
    assert cfg.xds == XdsSettings("istiod:15012", Path("/root.pem"))
    assert parse_config({**base, "LOCAL_XDS_PATH": "/x.yaml"}).xds is None
