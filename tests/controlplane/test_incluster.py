"""The in-cluster control plane's pure parts: the CA Secret and the root certificate
ConfigMaps, and the waypoints it deploys there."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path

import pytest

from controlplane.__main__ import parse_args, waypoint_template
from controlplane.ca import CAError, CertificateAuthority
from controlplane.incluster import (
    CA_SECRET,
    ROOT_CERT_KEY,
    SECRET_CERT_KEY,
    SECRET_KEY_KEY,
    ca_from_secret,
    ca_secret,
    namespace_active,
    needs_update,
    root_configmap,
)
from controlplane.waypoints import WaypointGateway, deployment

TD = "cluster.local"


def test_a_secret_round_trips_the_root() -> None:
    ca = CertificateAuthority.create(TD)
    secret = ca_secret(ca, "istio-system")
    assert secret["metadata"] == {
        "name": CA_SECRET,
        "namespace": "istio-system",
        "labels": {"app.kubernetes.io/managed-by": "ambient-mesh-controlplane"},
    }
    back = ca_from_secret(secret, TD)
    assert back.roots_pem() == ca.roots_pem()
    assert back.key_pem() == ca.key_pem()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop(SECRET_KEY_KEY), "has no ca-key.pem"),
        (lambda d: d.update({SECRET_CERT_KEY: "%%%"}), "ca-cert.pem is not base64"),
        (
            lambda d: d.update({SECRET_KEY_KEY: base64.b64encode(b"junk").decode()}),
            "ca-key.pem is not an unencrypted PEM private key",
        ),
    ],
)
def test_a_broken_secret_is_an_error_naming_it(
    mutate: Callable[[dict[str, str]], object], message: str
) -> None:
    secret = ca_secret(CertificateAuthority.create(TD), "istio-system")
    mutate(secret["data"])
    with pytest.raises(CAError, match=message) as e:
        ca_from_secret(secret, TD)
    assert "Secret istio-system/istio-ca-secret" in str(e.value)


def test_another_roots_key_is_refused() -> None:
    a, b = CertificateAuthority.create(TD), CertificateAuthority.create(TD)
    secret = ca_secret(a, "istio-system")
    secret["data"][SECRET_KEY_KEY] = ca_secret(b, "istio-system")["data"][SECRET_KEY_KEY]
    with pytest.raises(CAError, match="does not belong"):
        ca_from_secret(secret, TD)


def test_a_secret_of_another_trust_domain_is_refused() -> None:
    secret = ca_secret(CertificateAuthority.create("other.domain"), "istio-system")
    with pytest.raises(CAError, match=r"created for trust domain 'other\.domain'"):
        ca_from_secret(secret, TD)


def test_root_configmap_and_when_it_needs_writing() -> None:
    cm = root_configmap("travel", "PEM")
    assert cm["metadata"]["name"] == "istio-ca-root-cert"
    assert cm["metadata"]["namespace"] == "travel"
    assert cm["data"] == {ROOT_CERT_KEY: "PEM"}
    assert needs_update(None, "PEM")
    assert not needs_update(cm, "PEM")
    assert needs_update(cm, "OTHER")
    assert needs_update({"data": None}, "PEM")


def test_a_terminating_namespace_gets_no_copy() -> None:
    assert namespace_active({"metadata": {"name": "a"}, "status": {"phase": "Active"}})
    assert not namespace_active({"metadata": {"name": "a"}, "status": {"phase": "Terminating"}})
    assert not namespace_active({"metadata": {"name": "a", "deletionTimestamp": "x"}})
    assert not namespace_active(None)


def test_in_cluster_needs_its_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POD_NAMESPACE", raising=False)
    with pytest.raises(SystemExit) as e:
        parse_args(["--in-cluster"])
    assert e.value.code == 2


def test_outside_the_cluster_mesh_out_is_required() -> None:
    with pytest.raises(SystemExit) as e:
        parse_args([])
    assert e.value.code == 2


def test_in_cluster_waypoints_use_istiod_and_their_own_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("POD_NAMESPACE", "mesh-system")
    args = parse_args(["--in-cluster", "--waypoint-image", "ambient-mesh/mesh:0.13.0"])
    assert args.mesh_out is None
    gw = WaypointGateway("travel", "waypoint", "u1", "service", False, 1)
    d = deployment(gw, waypoint_template(args))
    pod = d["spec"]["template"]["spec"]
    c = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["XDS_ADDRESS"] == env["CA_ADDRESS"] == "istiod.mesh-system.svc:15012"
    assert env["CA_ROOT_CERT"] == env["XDS_ROOT_CERT"] == "/var/run/secrets/istio/root-cert.pem"
    assert env["CA_TOKEN_PATH"] == "/var/run/secrets/tokens/istio-token"
    assert "LOCAL_XDS_PATH" not in env
    assert c["image"] == "ambient-mesh/mesh:0.13.0"
    assert not any("hostPath" in v for v in pod["volumes"])
    token = pod["volumes"][0]["projected"]["sources"][0]["serviceAccountToken"]
    assert token["audience"] == "istio-ca"
    assert pod["volumes"][1]["configMap"] == {"name": "istio-ca-root-cert"}
    sc = c["securityContext"]
    assert sc["runAsUser"] == 1337 and sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"]
    assert sc["capabilities"] == {"drop": ["ALL"]}


def test_outside_the_cluster_waypoints_still_mount_the_node_directory(tmp_path: Path) -> None:
    args = parse_args(["--mesh-out", str(tmp_path / "mesh.json")])
    gw = WaypointGateway("travel", "waypoint", "u1", "service", False, 1)
    pod = deployment(gw, waypoint_template(args))["spec"]["template"]["spec"]
    assert pod["volumes"][0]["hostPath"]["path"] == "/var/run/ambient-mesh"
    assert "securityContext" not in pod["containers"][0]
