"""RequestAuthentication resources to frozen `RequestAuthentication` values. Pure.

`parse_request_authentication(doc)` raises MeshConfigError naming the resource and the field;
`validate_request_authentication(doc)` lists the errors for `ambientctl apply -f`.
Fields (security.istio.io/v1): `selector` or `targetRef(s)` (as AuthorizationPolicy's),
`jwtRules[]`: `issuer` (required), `audiences`, `jwks` (the JWKS as a JSON string) or
`jwksUri` (only `file://` paths: the waypoint fetches nothing from the network), `fromHeaders`
(`{name, prefix}`), `fromParams`, `forwardOriginalToken`, `outputPayloadToHeader`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from meshcore.defaults import ROOT_NAMESPACE
from meshcore.policy.resource import Labels, parse_selector, reader_for, unwrap
from meshcore.reader import Reader, describe, join
from meshcore.state import MeshConfigError, RawPolicy
from waypoint.authz.model import TargetRef
from waypoint.authz.parse import parse_target_refs

KIND = "RequestAuthentication"
_SPEC_KEYS = ("selector", "targetRef", "targetRefs", "jwtRules")
_RULE_KEYS = (
    "issuer",
    "audiences",
    "jwks",
    "jwksUri",
    "fromHeaders",
    "fromParams",
    "forwardOriginalToken",
    "outputPayloadToHeader",
)
# Where a token is looked for when a rule names no location (Istio's default).
DEFAULT_HEADER = ("authorization", "Bearer ")
DEFAULT_PARAM = "access_token"


@dataclass(frozen=True, slots=True)
class JwtRule:
    issuer: str
    audiences: tuple[str, ...]
    jwks: str | None  # the JWKS document (JSON text), inline
    jwks_path: str | None  # the file a `file://` jwksUri names
    from_headers: tuple[tuple[str, str], ...]  # (lower-case name, prefix)
    from_params: tuple[str, ...]
    forward_original_token: bool
    output_payload_to_header: str | None

    @property
    def headers(self) -> tuple[tuple[str, str], ...]:
        if self.from_headers or self.from_params:
            return self.from_headers
        return (DEFAULT_HEADER,)

    @property
    def params(self) -> tuple[str, ...]:
        if self.from_headers or self.from_params:
            return self.from_params
        return (DEFAULT_PARAM,)


@dataclass(frozen=True, slots=True)
class RequestAuthentication:
    name: str
    namespace: str
    selector: Labels
    target_refs: tuple[TargetRef, ...]
    rules: tuple[JwtRule, ...]
    targets_unknown: bool = False
    # Set on the stand-in for a resource that did not parse: every request it applies to is
    # refused (401), since which tokens it would accept is unknown (fail closed).
    error: str | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def _jwks_text(r: Reader, text: str, path: str) -> str:
    try:
        doc = json.loads(text)
    except ValueError as exc:
        r.fail(path, f"not valid JSON: {exc}")
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list) or not doc["keys"]:
        r.fail(path, 'expected a JWKS document: {"keys": [...]} with at least one key')
    return text


def _jwks_path(r: Reader, uri: str, path: str) -> str:
    parts = urlsplit(uri)
    if parts.scheme != "file":
        r.fail(
            path,
            f"{uri!r}: only file:// URIs are supported (the waypoint fetches no keys over the "
            "network); give the keys inline with `jwks`",
        )
    if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
        r.fail(path, f"{uri!r}: expected file:///absolute/path")
    return unquote(parts.path)


def _rule(r: Reader, raw: Any, path: str) -> JwtRule:
    body = r.mapping(raw, path, required=True)
    r.check_keys(body, _RULE_KEYS, path)
    issuer = r.string(body, "issuer", path)
    audiences = tuple(r.strings(body.get("audiences"), join(path, "audiences")))
    jwks = None
    jwks_path = None
    if body.get("jwks") is not None and body.get("jwksUri") is not None:
        r.fail(join(path, "jwks"), "give either jwks or jwksUri, not both")
    if body.get("jwks") is not None:
        jwks = _jwks_text(r, r.string(body, "jwks", path), join(path, "jwks"))
    elif body.get("jwksUri") is not None:
        jwks_path = _jwks_path(r, r.string(body, "jwksUri", path), join(path, "jwksUri"))
    else:
        r.fail(path, "needs jwks or a file:// jwksUri (keys are never discovered over the network)")
    headers = []
    for i, h in enumerate(r.items(body.get("fromHeaders"), join(path, "fromHeaders"))):
        hpath = join(path, f"fromHeaders[{i}]")
        hbody = r.mapping(h, hpath, required=True)
        r.check_keys(hbody, ("name", "prefix"), hpath)
        name = r.string(hbody, "name", hpath).lower()
        headers.append((name, r.string(hbody, "prefix", hpath, default="", empty_ok=True)))
    params = tuple(r.strings(body.get("fromParams"), join(path, "fromParams")))
    out_header = body.get("outputPayloadToHeader")
    if out_header is not None and (not isinstance(out_header, str) or not out_header):
        r.fail(
            join(path, "outputPayloadToHeader"),
            f"expected a header name, got {describe(out_header)}",
        )
    return JwtRule(
        issuer=issuer,
        audiences=audiences,
        jwks=jwks,
        jwks_path=jwks_path,
        from_headers=tuple(headers),
        from_params=params,
        forward_original_token=r.boolean(body, "forwardOriginalToken", path, False),
        output_payload_to_header=out_header.lower() if out_header else None,
    )


def parse_request_authentication(
    doc: Any, root_namespace: str = ROOT_NAMESPACE, default_namespace: str = "default"
) -> RequestAuthentication:
    """One RequestAuthentication resource; raises MeshConfigError (only)."""
    meta = doc.get("metadata") if isinstance(doc, Mapping) else None
    name = meta.get("name") if isinstance(meta, Mapping) else None
    namespace = meta.get("namespace") if isinstance(meta, Mapping) else None
    namespace = namespace if isinstance(namespace, str) and namespace else default_namespace
    r = reader_for(KIND, f"{namespace}/{name if isinstance(name, str) else '?'}")
    if not isinstance(doc, Mapping) or "kind" not in doc or not isinstance(meta, Mapping):
        r.fail("", "expected an Istio resource with kind, metadata and spec")
    r.check_keys(meta, ("name", "namespace", "annotations", "labels"), "metadata")
    name = r.name(meta, "name", "metadata")
    env = unwrap(RawPolicy.from_mapping(name, namespace, doc, KIND), r, KIND)
    body = env.body
    r.check_keys(body, _SPEC_KEYS, "spec")
    selector = parse_selector(r, body.get("selector"), "spec.selector")
    refs = parse_target_refs(r, body, "spec", namespace, root_namespace)
    if selector and refs:
        r.fail("spec.selector", "a RequestAuthentication has either a selector or targetRefs")
    rules = tuple(
        _rule(r, raw, f"spec.jwtRules[{i}]")
        for i, raw in enumerate(r.items(body.get("jwtRules"), "spec.jwtRules"))
    )
    return RequestAuthentication(name, namespace, selector, refs, rules)


def load_request_authentication(
    doc: Any, root_namespace: str = ROOT_NAMESPACE, default_namespace: str = "default"
) -> RequestAuthentication:
    """`parse_request_authentication`, or a fail-closed stand-in; never raises."""
    try:
        return parse_request_authentication(doc, root_namespace, default_namespace)
    except MeshConfigError as exc:
        error = str(exc)
    meta = doc.get("metadata") if isinstance(doc, Mapping) else None
    meta = meta if isinstance(meta, Mapping) else {}
    name = str(meta.get("name")) if isinstance(meta.get("name"), str) else "?"
    ns = str(meta.get("namespace")) if isinstance(meta.get("namespace"), str) else default_namespace
    spec = doc.get("spec") if isinstance(doc, Mapping) else None
    refs: tuple[TargetRef, ...] = ()
    unknown = False
    if isinstance(spec, Mapping) and (spec.get("targetRef") or spec.get("targetRefs")):
        try:
            refs = parse_target_refs(reader_for(KIND, ""), spec, "spec", ns, root_namespace)
        except MeshConfigError:
            unknown = True
    return RequestAuthentication(name, ns, (), refs, (), unknown, error)


def validate_request_authentication(
    doc: Any, root_namespace: str = ROOT_NAMESPACE, default_namespace: str = "default"
) -> list[str]:
    """The reasons the waypoint would refuse `doc` (empty when it would use it as written)."""
    try:
        parse_request_authentication(doc, root_namespace, default_namespace)
    except MeshConfigError as exc:
        return [str(exc)]
    return []
