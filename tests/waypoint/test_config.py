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


def test_the_http_limits_are_settings() -> None:
    cfg = parse_config(
        {
            **BASE,
            "CA_ADDRESS": "/x/ca.sock",
            "CA_TOKEN_PATH": "/x/t",
            "WAYPOINT_HTTP1_HEAD_TIMEOUT": "2.5",
            "WAYPOINT_HTTP1_MAX_BODY_BYTES": "1048576",
            "WAYPOINT_HTTP2_MAX_HEADERS": "50",
        }
    )
    assert cfg.http1_limits.head_timeout == 2.5
    assert cfg.http1_limits.max_body_bytes == 1 << 20
    assert cfg.http1_limits.max_headers == 100  # untouched: the default
    assert cfg.http2_limits.max_headers == 50


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("WAYPOINT_HTTP1_MAX_HEADERS", "0", "must be greater than 0"),
        ("WAYPOINT_HTTP2_IDLE_TIMEOUT", "soon", "is not a number of seconds"),
        ("WAYPOINT_HTTP2_MAX_HEADER", "5", "is not a setting"),
    ],
)
def test_a_bad_http_limit_names_the_variable(name: str, value: str, message: str) -> None:
    with pytest.raises(EnvConfigError, match=message) as info:
        parse_config({**BASE, "CA_ADDRESS": "/x/ca.sock", "CA_TOKEN_PATH": "/x/t", name: value})
    assert name in str(info.value)


CA = {"CA_ADDRESS": "/x/ca.sock", "CA_TOKEN_PATH": "/x/token"}


def test_the_certificate_lifetime_in_seconds_or_as_istios_secret_ttl() -> None:
    assert parse_config({**BASE, **CA}).cert_ttl_seconds == 86400
    assert parse_config({**BASE, **CA, "SECRET_TTL": "12h"}).cert_ttl_seconds == 43200
    assert parse_config({**BASE, **CA, "SECRET_TTL": "1m"}).cert_ttl_seconds == 60
    both = {**BASE, **CA, "CERT_TTL_SECONDS": "7200", "SECRET_TTL": "2h"}
    assert parse_config(both).cert_ttl_seconds == 7200


@pytest.mark.parametrize(
    ("env", "message"),
    [
        # The waypoint's minimum, as for CERT_TTL_SECONDS.
        ({"SECRET_TTL": "59s"}, r"SECRET_TTL=59s \(59 s\) is outside 60..604800 seconds"),
        ({"SECRET_TTL": "1x"}, "SECRET_TTL='1x' is not a duration.*unknown unit 'x'"),
        (
            {"CERT_TTL_SECONDS": "7200", "SECRET_TTL": "1h"},
            r"CERT_TTL_SECONDS=7200 and SECRET_TTL=1h \(3600 s\) disagree",
        ),
    ],
)
def test_a_bad_or_conflicting_secret_ttl_is_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(EnvConfigError, match=message):
        parse_config({**BASE, **CA, **env})
