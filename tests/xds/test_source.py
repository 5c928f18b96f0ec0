"""Which source of mesh state a proxy uses: exactly one of LOCAL_XDS_PATH and XDS_ADDRESS."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshcore.envconfig import EnvConfigError
from meshcore.xds.source import XdsSettings, parse_source
from ztunnel.config import parse_config

BASE = {"NODE_NAME": "n1", "ENROLMENT_PATH": "/e.yaml", "CA_ADDRESS": "/ca", "CA_TOKEN_PATH": "/t"}


def test_tunnel_takes_an_xds_server() -> None:
    cfg = parse_config({**BASE, "XDS_ADDRESS": "127.0.0.1:15012", "XDS_ROOT_CERT": "/r.pem"})
    assert cfg.local_xds_path is None
    assert cfg.xds == XdsSettings("127.0.0.1:15012", Path("/r.pem"))


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({}, "LOCAL_XDS_PATH or XDS_ADDRESS must be set"),
        ({"LOCAL_XDS_PATH": "/x", "XDS_ADDRESS": "a:1"}, "not both"),
        ({"XDS_ADDRESS": "nohost"}, "neither host:port"),
        ({"XDS_ADDRESS": "a:99999"}, "neither host:port"),
        ({"XDS_ADDRESS": "a:15012"}, "XDS_ROOT_CERT must name"),
    ],
)
def test_source_errors_name_the_variable(env: dict[str, str], says: str) -> None:
    with pytest.raises(EnvConfigError, match=says):
        parse_source(env, "LOCAL_XDS_PATH")
