"""JWT verification for the waypoint's RequestAuthentication (PyJWT). Pure but for the clock
and the one-time read of `file://` key sets when the verifier is built.

Istio's semantics (Envoy's jwt_authn as istiod configures it):
- no token in any configured location: the request passes, with no request principal (an
  ALLOW rule with `requestPrincipals` then denies it);
- a token that fails (bad signature, expired or not yet valid, an issuer no rule names, no
  audience the rule accepts, unreadable): 401 `Jwt verification fails`;
- a valid token: principal `iss/sub`, its claims for `request.auth.claims[...]`; the token's
  header is removed unless `forwardOriginalToken`, and `outputPayloadToHeader` gets the
  payload (base64url, as in the token).

Keys: an algorithm is accepted only if it belongs to the key's type (RSA: RS*/PS*, EC: the
curve's ES*, OKP: EdDSA) and to the key's own `alg` when it names one, so a token cannot pick
a weaker or different algorithm for the same key; `none` is never accepted. Clock skew: 60 s
(Envoy's default).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any
from urllib.parse import parse_qsl

import jwt

from waypoint.authn.parse import JwtRule, RequestAuthentication
from waypoint.http.message import Headers, Request, Response, text_response

UNAUTHORIZED_BODY = "Jwt verification fails"
CLOCK_SKEW_SECONDS = 60

_FAMILIES: dict[tuple[str, str | None], frozenset[str]] = {
    ("RSA", None): frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}),
    ("EC", "P-256"): frozenset({"ES256"}),
    ("EC", "P-384"): frozenset({"ES384"}),
    ("EC", "P-521"): frozenset({"ES512"}),
    ("OKP", "Ed25519"): frozenset({"EdDSA"}),
}


@dataclass(frozen=True, slots=True)
class AuthnResult:
    ok: bool
    reason: str  # why it failed (for the log), or what passed
    principal: str | None = None  # "iss/sub" of a verified token
    claims: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    # What to do to the request before it goes upstream.
    remove_headers: tuple[str, ...] = ()
    add_headers: tuple[tuple[str, str], ...] = ()

    def apply_to(self, request: Request) -> None:
        """Edit `request`'s headers as the result says (token removed, payload added)."""
        if self.remove_headers:
            drop = set(self.remove_headers)
            request.headers[:] = [(k, v) for k, v in request.headers if k not in drop]
        request.headers.extend(self.add_headers)


NO_TOKEN = AuthnResult(True, "no token")


@dataclass(frozen=True, slots=True)
class _Key:
    jwk: Mapping[str, Any]
    kid: str | None
    algorithms: frozenset[str]


class _Issuer:
    """Every rule naming one issuer, with its keys (or why they cannot be used)."""

    __slots__ = ("cache", "error", "keys", "rules")

    def __init__(self) -> None:
        self.rules: list[JwtRule] = []
        self.keys: list[_Key] = []
        self.error: str | None = None
        self.cache: dict[tuple[int, str], jwt.PyJWK] = {}


def _read_file(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read(1 << 20)  # a key set is small; a huge file is not one


def _keys(text: str) -> list[_Key]:
    doc = json.loads(text)
    out = []
    for jwk in doc.get("keys", []) if isinstance(doc, dict) else []:
        if not isinstance(jwk, dict):
            continue
        family = _FAMILIES.get((str(jwk.get("kty")), jwk.get("crv")))
        if family is None:
            continue
        alg = jwk.get("alg")
        algorithms = family & {alg} if isinstance(alg, str) else family
        kid = jwk.get("kid")
        out.append(
            _Key(MappingProxyType(dict(jwk)), kid if isinstance(kid, str) else None, algorithms)
        )
    return out


class JwtVerifier:
    """The JWT check for the RequestAuthentications that apply to a destination. Build one
    per set of resources (cheap to keep per destination); `authenticate` per request."""

    def __init__(
        self,
        authns: Sequence[RequestAuthentication],
        read_file: Callable[[str], str] = _read_file,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock
        self._broken = next((a for a in authns if a.error is not None), None)
        self._issuers: dict[str, _Issuer] = {}
        self._rules: list[JwtRule] = []
        for a in authns:
            for rule in a.rules:
                self._rules.append(rule)
                issuer = self._issuers.setdefault(rule.issuer, _Issuer())
                issuer.rules.append(rule)
                try:
                    text = rule.jwks if rule.jwks is not None else read_file(rule.jwks_path or "")
                    issuer.keys.extend(_keys(text))
                except (OSError, ValueError) as exc:
                    issuer.error = f"keys of {rule.issuer} unavailable: {exc}"

    @property
    def active(self) -> bool:
        """Whether any rule applies (else every request passes untouched)."""
        return bool(self._rules) or self._broken is not None

    def authenticate(self, request: Request) -> AuthnResult:
        if self._broken is not None:
            return AuthnResult(
                False,
                f"RequestAuthentication {self._broken.key} is invalid, so every request it "
                f"applies to is refused (fail closed): {self._broken.error}",
            )
        found = self._extract(request)
        if found is None:
            return NO_TOKEN
        token, location = found
        try:
            unverified = jwt.decode(token, options={"verify_signature": False})
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            return AuthnResult(False, f"Jwt is not well formed: {exc}")
        iss = unverified.get("iss")
        issuer = self._issuers.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            return AuthnResult(False, f"Jwt issuer {iss!r} is not configured")
        rule = next((r for r in issuer.rules if location in _locations(r)), None)
        if rule is None:
            return AuthnResult(False, f"Jwt of {iss} is not accepted in {location[1]}")
        if issuer.error is not None:
            return AuthnResult(False, issuer.error)
        claims = self._verify(token, header, issuer, rule)
        if isinstance(claims, str):
            return AuthnResult(False, claims)
        remove = (
            (location[1],) if location[0] == "header" and not rule.forward_original_token else ()
        )
        add: Headers = []
        if rule.output_payload_to_header:
            add.append((rule.output_payload_to_header, token.split(".")[1]))
        sub = claims.get("sub")
        return AuthnResult(
            True,
            "verified",
            f"{iss}/{sub if isinstance(sub, str) else ''}",
            MappingProxyType(claims),
            remove,
            tuple(add),
        )

    def _extract(self, request: Request) -> tuple[str, tuple[str, str]] | None:
        query: list[tuple[str, str]] | None = None
        for rule in self._rules:
            for name, prefix in rule.headers:
                value = request.header(name)
                if value is not None and value.startswith(prefix):
                    token = value[len(prefix) :].strip()
                    if token:
                        return token, ("header", name)
            for param in rule.params:
                if query is None:
                    _, _, qs = request.path.partition("?")
                    query = parse_qsl(qs.partition("#")[0], keep_blank_values=True)
                for k, v in query:
                    if k == param and v:
                        return v, ("param", param)
        return None

    def _verify(
        self, token: str, header: Mapping[str, Any], issuer: _Issuer, rule: JwtRule
    ) -> dict[str, Any] | str:
        alg = header.get("alg")
        kid = header.get("kid")
        if not isinstance(alg, str):
            return "Jwt verification fails: no algorithm"
        candidates = [
            (i, k)
            for i, k in enumerate(issuer.keys)
            if alg in k.algorithms and (kid is None or k.kid is None or k.kid == kid)
        ]
        if not candidates:
            return f"Jwt verification fails: no key of {rule.issuer} for alg {alg!r} kid {kid!r}"
        failure = "Jwt verification fails"
        for i, key in candidates:
            pyjwk = issuer.cache.get((i, alg))
            if pyjwk is None:
                try:
                    pyjwk = jwt.PyJWK(dict(key.jwk), alg)
                except jwt.PyJWTError as exc:
                    failure = f"Jwt verification fails: unusable key: {exc}"
                    continue
                issuer.cache[(i, alg)] = pyjwk
            try:
                claims: dict[str, Any] = jwt.decode(
                    token,
                    pyjwk.key,
                    algorithms=[alg],
                    audience=list(rule.audiences) or None,
                    issuer=rule.issuer,
                    leeway=CLOCK_SKEW_SECONDS,
                    options={"verify_aud": bool(rule.audiences), "require": ["iss"]},
                )
                return claims
            except jwt.InvalidSignatureError:
                failure = "Jwt verification fails: bad signature"
            except jwt.ExpiredSignatureError:
                return "Jwt is expired"
            except jwt.ImmatureSignatureError:
                return "Jwt is not yet valid"
            except (jwt.InvalidAudienceError, jwt.MissingRequiredClaimError) as exc:
                return f"Audiences in Jwt are not allowed: {exc}"
            except jwt.PyJWTError as exc:
                return f"Jwt verification fails: {exc}"
        return failure


def _locations(rule: JwtRule) -> set[tuple[str, str]]:
    return {("header", n) for n, _ in rule.headers} | {("param", p) for p in rule.params}


def unauthorized_response(result: AuthnResult) -> Response:
    """401 `Jwt verification fails`, as Envoy answers a request whose token fails."""
    del result  # the reason goes to the access log, never to the client
    return text_response(
        401,
        UNAUTHORIZED_BODY,
        [("www-authenticate", 'Bearer realm="waypoint", error="invalid_token"')],
    )
