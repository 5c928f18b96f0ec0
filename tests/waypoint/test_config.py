"""The waypoint's environment: the CA socket of the local cluster, or istiod's gRPC CA."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshcore.envconfig import EnvConfigError
from waypoint.config import parse_config

BASE = {
    "WAYPOINT_NAME": "waypoint",
    "POD_NAMESPACE": "travel",
    "NODE_NAME": "n1",
    "POD_IP": "10.244.1.20",
    "LOCAL_XDS_PATH": "/x/mesh.json",
}


def test_the_ca_socket() -> None:
    cfg = parse_config({**BASE, "CA_ADDRESS": "/x/ca.sock", "CA_TOKEN_PATH": "/x/token"})
    assert cfg.ca_address == Path("/x/ca.sock")
    assert cfg.ca_grpc is None
    assert cfg.ca_token_path == Path("/x/token")


def test_istiods_grpc_ca_with_the_projected_token_by_default() -> None:
    cfg = parse_config(
        {
            **BASE,
            "CA_ADDRESS": "istiod.istio-system.svc:15012",
            "CA_ROOT_CERT": "/var/run/secrets/istio/root-cert.pem",
        }
    )
    assert cfg.ca_address is None
    assert cfg.ca_grpc is not None
    assert cfg.ca_grpc.address == "istiod.istio-system.svc:15012"
    assert cfg.ca_grpc.root_cert == Path("/var/run/secrets/istio/root-cert.pem")
    assert cfg.ca_token_path == Path("/var/run/secrets/tokens/istio-token")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CA_ADDRESS": "istiod:15012"}, "CA_ROOT_CERT must be set"),
        ({"CA_ADDRESS": "/x/ca.sock"}, "CA_TOKEN_PATH must be set"),
        (
            {"CA_ADDRESS": "/x/ca.sock", "CA_TOKEN_PATH": "/t", "CA_ROOT_CERT": "/r"},
            "for a gRPC CA",
        ),
        ({}, "CA_ADDRESS"),
    ],
)
def test_ca_settings_that_cannot_work_are_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(EnvConfigError, match=message):
        parse_config({**BASE, **env})
