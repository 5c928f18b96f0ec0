"""Service-account tokens from a real kube-apiserver, for the tests of the token checks
(the CA's and xDS's): requested through the API, or signed with the server's own key to
set claims the API would not (an expiry in the past)."""

from __future__ import annotations

import json
import time
from typing import Any

import jwt

from localcluster.kube.apiserver import ISSUER, KubeControlPlane


def api_ok(cp: KubeControlPlane, method: str, path: str, body: object | None = None) -> Any:
    """The decoded answer of an API call that must succeed."""
    status, raw = cp.request(method, path, body)
    assert status < 300, f"{method} {path}: {status} {raw[:300]!r}"
    return json.loads(raw)


def signed_token(cp: KubeControlPlane, ns: str, sa: str, exp_offset: float) -> str:
    """A token for `ns/sa` with audience istio-ca, as the API server makes them (signed
    with its own key), expiring `exp_offset` seconds from now (negative: expired)."""
    uid = api_ok(cp, "GET", f"/api/v1/namespaces/{ns}/serviceaccounts/{sa}")["metadata"]["uid"]
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "sub": f"system:serviceaccount:{ns}:{sa}",
        "aud": ["istio-ca"],
        "iat": now - 7200,
        "nbf": now - 7200,
        "exp": int(now + exp_offset),
        "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": sa, "uid": uid}},
    }
    return jwt.encode(claims, (cp.pki / "sa.key").read_bytes(), algorithm="RS256")
