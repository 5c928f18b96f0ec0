"""The tunnel's environment parsing: booleans, HBONE limits, the CA."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ztunnel.config import EnvConfigError, parse_config

BASE = {
    "NODE_NAME": "n1",
    "LOCAL_XDS_PATH": "/x.yaml",
    "ENROLMENT_PATH": "/e.yaml",
    "CA_ADDRESS": "/ca.sock",
    "CA_TOKEN_PATH": "/token",
}


def test_same_node_in_process_is_on_unless_turned_off() -> None:
    assert parse_config(BASE).same_node_in_process is True
    for off in ("false", "0", "no", "OFF"):
        assert parse_config({**BASE, "SAME_NODE_IN_PROCESS": off}).same_node_in_process is False
    for on in ("true", "1", "yes", " On "):
        assert parse_config({**BASE, "SAME_NODE_IN_PROCESS": on}).same_node_in_process is True


def test_a_boolean_that_is_not_one_names_the_variable() -> None:
    with pytest.raises(EnvConfigError, match="SAME_NODE_IN_PROCESS='maybe' is not a boolean"):
        parse_config({**BASE, "SAME_NODE_IN_PROCESS": "maybe"})


def test_every_hbone_limit_is_a_setting_with_its_default() -> None:
    from meshcore.hbone.limits import DEFAULT_LIMITS
    from ztunnel.config import hbone_limit_names

    assert parse_config(BASE).hbone_limits == DEFAULT_LIMITS
    names = hbone_limit_names()
    assert names["HBONE_MAX_PREMATURE_RESETS"] == "max_premature_resets"
    assert names["HBONE_IDLE_TIMEOUT"] == "idle_timeout"
    env = {**BASE, "HBONE_MAX_PREMATURE_RESETS": "20", "HBONE_IDLE_TIMEOUT": "2.5"}
    limits = parse_config(env).hbone_limits
    assert (limits.max_premature_resets, limits.idle_timeout) == (20, 2.5)
    assert limits.max_empty_frames == DEFAULT_LIMITS.max_empty_frames


def test_early_data_may_be_switched_off_but_not_made_negative() -> None:
    """The one HBONE setting that bounds what we send, not what a peer may cost: 0 means
    none (the app's bytes wait for the CONNECT's answer)."""
    assert parse_config(BASE).hbone_limits.early_data_bytes == 16 * 1024
    off = parse_config({**BASE, "HBONE_EARLY_DATA_BYTES": "0"}).hbone_limits
    assert off.early_data_bytes == 0
    with pytest.raises(EnvConfigError, match=r"HBONE_EARLY_DATA_BYTES.*must be greater than 0"):
        parse_config({**BASE, "HBONE_EARLY_DATA_BYTES": "-1"})


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("HBONE_MAX_EMPTY_FRAMES", "ten", "is not an integer"),
        ("HBONE_MAX_EMPTY_FRAMES", "1.5", "is not an integer"),
        ("HBONE_IDLE_TIMEOUT", "soon", "is not a number of seconds"),
        ("HBONE_MAX_EMPTY_FRAMES", "0", "must be greater than 0"),
        ("HBONE_PING_TIMEOUT", "inf", "must be greater than 0"),
        ("HBONE_MAX_EMPTY_FRAME", "5", "is not a setting"),
    ],
)
def test_a_bad_hbone_limit_names_the_variable(name: str, value: str, message: str) -> None:
    with pytest.raises(EnvConfigError, match=f"{name}.*{message}"):
        parse_config({**BASE, name: value})


def test_dns_proxy_is_off_unless_turned_on() -> None:
    cfg = parse_config(BASE)
    assert cfg.dns_capture is False and str(cfg.dns_resolv_conf) == "/etc/resolv.conf"
    cfg = parse_config({**BASE, "ISTIO_META_DNS_CAPTURE": "true", "DNS_RESOLV_CONF": "/r.conf"})
    assert cfg.dns_capture is True and str(cfg.dns_resolv_conf) == "/r.conf"
    with pytest.raises(EnvConfigError, match="ISTIO_META_DNS_CAPTURE"):
        parse_config({**BASE, "ISTIO_META_DNS_CAPTURE": "maybe"})


def test_the_ca_is_a_socket_path_or_a_grpc_address() -> None:
    from pathlib import Path

    from meshcore.identity.istio_ca import DEFAULT_TOKEN_PATH, CaGrpcSettings

    unix = parse_config(BASE)
    assert (unix.ca_address, unix.ca_grpc, unix.ca_token_path) == (
        Path("/ca.sock"),
        None,
        Path("/token"),
    )
    grpc_env = {**BASE, "CA_ADDRESS": "https://istiod.istio-system.svc:15012"}
    grpc_env["CA_ROOT_CERT"] = "/root.pem"
    del grpc_env["CA_TOKEN_PATH"]
    cfg = parse_config(grpc_env)
    assert cfg.ca_address is None
    assert cfg.ca_grpc == CaGrpcSettings(
        "istiod.istio-system.svc:15012", Path("/root.pem"), DEFAULT_TOKEN_PATH
    )
    assert str(DEFAULT_TOKEN_PATH) == "/var/run/secrets/tokens/istio-token"  # upstream's
    own = parse_config({**grpc_env, "CA_ADDRESS": "127.0.0.1:15012", "CA_TOKEN_PATH": "/t"})
    assert own.ca_grpc == CaGrpcSettings("127.0.0.1:15012", Path("/root.pem"), Path("/t"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"CA_ADDRESS": "127.0.0.1:15012"}, "CA_ROOT_CERT must be set"),
        ({"CA_ROOT_CERT": "/root.pem"}, "CA_ROOT_CERT is for a gRPC CA"),
        ({"CA_TOKEN_PATH": ""}, "CA_TOKEN_PATH must be set for the CA socket"),
        ({"CA_ADDRESS": "http://ca:15012", "CA_ROOT_CERT": "/r"}, "only https://"),
        ({"CA_ADDRESS": "ca", "CA_ROOT_CERT": "/r"}, "is not host:port"),
        ({"CA_ADDRESS": "ca:99999", "CA_ROOT_CERT": "/r"}, "is not host:port"),
        ({"CA_ADDRESS": "https://ca/x:1", "CA_ROOT_CERT": "/r"}, "no path"),
        ({"CA_ADDRESS": ""}, "CA_ADDRESS must be set"),
    ],
)
def test_a_bad_ca_setting_says_which_and_why(change: dict[str, str], message: str) -> None:
    with pytest.raises(EnvConfigError, match=message):
        parse_config({**BASE, **change})


def test_the_agents_uids_default_to_ours_and_are_checked() -> None:
    assert parse_config(BASE).zds_peer_uids is None  # the ZDS client then uses our own
    assert parse_config({**BASE, "ZDS_PEER_UIDS": "0, 1000"}).zds_peer_uids == frozenset({0, 1000})
    with pytest.raises(EnvConfigError, match=r"ZDS_PEER_UIDS='root'.*not a uid"):
        parse_config({**BASE, "ZDS_PEER_UIDS": "root"})


def test_the_dns_proxys_limits_are_settings() -> None:
    cfg = parse_config({**BASE, "DNS_PROXY_MAX_QUERIES_PER_SECOND": "50"})
    assert cfg.dns_limits.max_queries_per_second == 50
    assert cfg.dns_limits.max_query_burst == 1000
    with pytest.raises(EnvConfigError, match="DNS_PROXY_MAX_QPS is not a setting"):
        parse_config({**BASE, "DNS_PROXY_MAX_QPS": "5"})
    # Upstream's own setting of that prefix is no limit, and no error either.
    assert parse_config({**BASE, "DNS_PROXY_ADDR": "127.0.0.1:15053"}).dns_limits.max_query_burst


def test_the_certificate_lifetime_in_seconds_or_as_istios_secret_ttl() -> None:
    assert parse_config(BASE).cert_ttl_seconds == 86400
    assert parse_config({**BASE, "CERT_TTL_SECONDS": "60"}).cert_ttl_seconds == 60
    assert parse_config({**BASE, "SECRET_TTL": "90m"}).cert_ttl_seconds == 5400
    assert parse_config({**BASE, "SECRET_TTL": "5s"}).cert_ttl_seconds == 5  # the same minimum
    both = {**BASE, "CERT_TTL_SECONDS": "3600", "SECRET_TTL": "1h"}
    assert parse_config(both).cert_ttl_seconds == 3600


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SECRET_TTL": "4s"}, r"SECRET_TTL=4s \(4 s\) is outside 5..604800 seconds"),
        ({"SECRET_TTL": "24"}, "SECRET_TTL='24' is not a duration.*has no unit"),
        (
            {"CERT_TTL_SECONDS": "3600", "SECRET_TTL": "24h"},
            r"CERT_TTL_SECONDS=3600 and SECRET_TTL=24h \(86400 s\) disagree",
        ),
    ],
)
def test_a_bad_or_conflicting_secret_ttl_is_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(EnvConfigError, match=message):
        parse_config({**BASE, **env})


def test_a_tunnel_with_conflicting_lifetimes_exits_2_saying_why() -> None:
    env = {**BASE, "CERT_TTL_SECONDS": "3600", "SECRET_TTL": "24h"}
    done = subprocess.run(
        [sys.executable, "-m", "ztunnel"],
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "CERT_TTL_SECONDS=3600 and SECRET_TTL=24h (86400 s) disagree" in done.stderr
