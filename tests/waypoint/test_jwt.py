"""RequestAuthentication at the waypoint, with real keys made here."""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from meshcore.state import MeshConfigError
from waypoint.authn.parse import (
    load_request_authentication,
    parse_request_authentication,
    validate_request_authentication,
)
from waypoint.authn.verify import AuthnResult, JwtVerifier, unauthorized_response
from waypoint.authz.decide import DestinationRef, WaypointRef, applicable, authorize_request
from waypoint.authz.facts import RequestFacts
from waypoint.authz.parse import parse_l7_policy
from waypoint.http.message import BufferedBody, Request

ISSUER = "https://issuer.example"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwk(key: Any, kid: str, alg: str) -> dict[str, Any]:
    algo = jwt.algorithms.RSAAlgorithm if alg.startswith("RS") else jwt.algorithms.ECAlgorithm
    out: dict[str, Any] = json.loads(algo.to_jwk(key.public_key()))
    out.update(kid=kid, alg=alg, use="sig")
    return out


JWKS = json.dumps({"keys": [jwk(RSA_KEY, "rsa1", "RS256"), jwk(EC_KEY, "ec1", "ES256")]})


def token(key: Any = RSA_KEY, alg: str = "RS256", kid: str | None = "rsa1", **claims: Any) -> str:
    now = int(time.time())
    body = {"iss": ISSUER, "sub": "alice", "aud": "shop", "iat": now, "exp": now + 600}
    body.update(claims)
    body = {k: v for k, v in body.items() if v is not None}
    return jwt.encode(body, key, algorithm=alg, headers={"kid": kid} if kid else None)


def resource(**rule: Any) -> dict[str, Any]:
    jwt_rule: dict[str, Any] = {"issuer": ISSUER, "jwks": JWKS, "audiences": ["shop"]}
    jwt_rule.update(rule)
    jwt_rule = {k: v for k, v in jwt_rule.items() if v is not None}
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "RequestAuthentication",
        "metadata": {"name": "jwt", "namespace": "shop"},
        "spec": {
            "targetRefs": [{"kind": "Service", "group": "", "name": "reviews"}],
            "jwtRules": [jwt_rule],
        },
    }


def verifier(**rule: Any) -> JwtVerifier:
    return JwtVerifier([parse_request_authentication(resource(**rule))])


def request(tok: str | None = None, path: str = "/api", header: str = "authorization") -> Request:
    headers = [("x-other", "1")]
    if tok is not None:
        headers.append((header, f"Bearer {tok}" if header == "authorization" else tok))
    return Request("GET", "reviews:9080", path, headers)


def test_valid_rs256_token():
    result = verifier().authenticate(request(token()))
    assert result.ok, result.reason
    assert result.principal == f"{ISSUER}/alice"
    assert result.claims["aud"] == "shop"
    assert result.remove_headers == ("authorization",)


def test_valid_es256_token():
    result = verifier().authenticate(request(token(EC_KEY, "ES256", "ec1")))
    assert result.ok, result.reason
    assert result.principal == f"{ISSUER}/alice"


def test_token_without_kid_tries_the_keys_of_its_algorithm():
    assert verifier().authenticate(request(token(kid=None))).ok


REJECT_CASES = [
    ("bad signature", lambda: token(OTHER_KEY), "bad signature"),
    ("expired", lambda: token(exp=int(time.time()) - 3600), "expired"),
    ("not yet valid", lambda: token(nbf=int(time.time()) + 3600), "not yet valid"),
    ("wrong issuer", lambda: token(iss="https://evil.example"), "not configured"),
    ("wrong audience", lambda: token(aud="other"), "Audiences"),
    ("no audience", lambda: token(aud=None), "Audiences"),
    ("garbage", lambda: "not.a.jwt", "not well formed"),
    ("alg none", lambda: _unsigned(), "no key"),
    ("HS256 with the public key", lambda: _hs256_confusion(), "no key"),
    ("RSA token claiming the EC key", lambda: token(kid="ec1"), "no key"),
    ("tampered payload", lambda: _tampered(), "bad signature"),
]


def _unsigned() -> str:
    head = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{head}.{_b64(json.dumps({'iss': ISSUER, 'sub': 'x', 'aud': 'shop'}).encode())}."


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _hs256_confusion() -> str:
    # The classic attack: an HMAC token keyed with the (public) RSA key's PEM, made by hand
    # because PyJWT itself refuses to sign with it.
    secret = RSA_KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "rsa1"}).encode())
    body = _b64(json.dumps({"iss": ISSUER, "sub": "x", "aud": "shop"}).encode())
    sig = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(sig)}"


def _tampered() -> str:
    head, _, sig = token().split(".")
    payload = base64.urlsafe_b64encode(
        json.dumps({"iss": ISSUER, "sub": "root", "aud": "shop"}).encode()
    )
    return f"{head}.{payload.decode().rstrip('=')}.{sig}"


@pytest.mark.parametrize(
    ("make", "reason"), [c[1:] for c in REJECT_CASES], ids=[c[0] for c in REJECT_CASES]
)
def test_rejected_tokens(make, reason):
    result = verifier().authenticate(request(make()))
    assert not result.ok
    assert reason in result.reason
    assert result.principal is None
    resp = unauthorized_response(result)
    assert resp.status == 401
    assert isinstance(resp.body, BufferedBody) and resp.body.data == b"Jwt verification fails"


def test_missing_token_passes_without_principal():
    result = verifier().authenticate(request())
    assert result.ok and result.principal is None and not result.claims


def test_missing_token_then_request_principals_denies():
    policy = parse_l7_policy(
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "need-jwt", "namespace": "shop"},
            "spec": {
                "targetRefs": [{"kind": "Service", "group": "", "name": "reviews"}],
                "rules": [{"from": [{"source": {"requestPrincipals": ["*"]}}]}],
            },
        }
    )

    def facts(result: AuthnResult) -> RequestFacts:
        return RequestFacts(
            None,
            ipaddress.ip_address("10.0.0.1"),
            ipaddress.ip_address("10.0.0.2"),
            9080,
            None,
            "GET",
            "reviews",
            "/",
            (),
            request_principal=result.principal,
            claims=result.claims,
        )

    v = verifier()
    assert not authorize_request([policy], facts(v.authenticate(request()))).allowed
    assert authorize_request([policy], facts(v.authenticate(request(token())))).allowed


def test_nested_and_list_claims_are_usable():
    tok = token(groups=["admins", "dev"], org={"team": {"name": "store"}})
    result = verifier().authenticate(request(tok))
    assert result.ok
    assert result.claims["groups"] == ["admins", "dev"]
    assert result.claims["org"]["team"]["name"] == "store"


def test_custom_header_and_prefix_and_forwarding():
    v = verifier(fromHeaders=[{"name": "X-Jwt", "prefix": "Token "}], forwardOriginalToken=True)
    req = Request("GET", "h", "/", [("x-jwt", f"Token {token()}")])
    result = v.authenticate(req)
    assert result.ok and result.remove_headers == ()
    # The default location is not read once a rule names its own.
    assert v.authenticate(request(token(OTHER_KEY))).ok


def test_query_parameter_token():
    v = verifier(fromParams=["jwt"])
    assert v.authenticate(request(path=f"/a?x=1&jwt={token()}")).principal == f"{ISSUER}/alice"
    assert not v.authenticate(request(path=f"/a?jwt={token(OTHER_KEY)}")).ok


def test_default_access_token_parameter():
    assert verifier().authenticate(request(path=f"/a?access_token={token()}")).ok


def test_output_payload_to_header_and_token_removed():
    tok = token()
    req = request(tok)
    result = verifier(outputPayloadToHeader="X-Jwt-Payload").authenticate(req)
    result.apply_to(req)
    assert req.header("authorization") is None and req.header("x-other") == "1"
    payload = req.header("x-jwt-payload")
    assert payload == tok.split(".")[1]
    decoded = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert decoded["sub"] == "alice"


def test_jwks_from_file(tmp_path):
    path = tmp_path / "jwks.json"
    path.write_text(JWKS)
    v = verifier(jwks=None, jwksUri=f"file://{path}")
    assert v.authenticate(request(token())).ok


def test_unreadable_jwks_file_fails_tokens_not_tokenless_requests(tmp_path):
    v = verifier(jwks=None, jwksUri=f"file://{tmp_path}/missing.json")
    assert not v.authenticate(request(token())).ok
    assert v.authenticate(request()).ok


def test_broken_resource_fails_closed():
    doc = resource(jwksUri="https://issuer.example/keys", jwks=None)
    stand_in = load_request_authentication(doc)
    assert stand_in.error is not None
    v = JwtVerifier([stand_in])
    assert v.active
    assert not v.authenticate(request()).ok
    refs = applicable(
        [stand_in], WaypointRef("shop", "waypoint"), DestinationRef("shop", "reviews")
    )
    assert refs == (stand_in,)


ERROR_CASES = [
    ("network jwksUri", {"jwks": None, "jwksUri": "https://x/keys"}, "only file:// URIs"),
    ("both jwks and uri", {"jwksUri": "file:///k"}, "either jwks or jwksUri"),
    ("no keys", {"jwks": None}, "needs jwks"),
    ("bad jwks json", {"jwks": "{"}, "jwks: not valid JSON"),
    ("jwks without keys", {"jwks": '{"keys": []}'}, "JWKS document"),
    ("no issuer", {"issuer": None}, "issuer: is required"),
    ("unknown field", {"fromCookies": ["c"]}, "fromCookies: unknown field"),
    ("bad header entry", {"fromHeaders": [{"header": "x"}]}, "fromHeaders[0].header"),
    ("bad forward flag", {"forwardOriginalToken": "yes"}, "expected true or false"),
    ("audiences not list", {"audiences": "shop"}, "audiences: expected a list"),
]


@pytest.mark.parametrize(
    ("change", "message"), [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES]
)
def test_validate_names_the_field(change, message):
    errors = validate_request_authentication(resource(**change))
    assert len(errors) == 1 and message in errors[0], errors
    assert errors[0].startswith("RequestAuthentication shop/jwt: ")
    with pytest.raises(MeshConfigError):
        parse_request_authentication(resource(**change))


def test_valid_resource_has_no_errors():
    assert validate_request_authentication(resource()) == []
