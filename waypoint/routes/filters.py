"""Applying a decision to a request: header edits, URL rewrites, redirect locations."""

from __future__ import annotations

from collections.abc import Sequence

from waypoint.routes.facts import RequestFacts, authority_host, authority_port, split_path
from waypoint.routes.model import (
    Backend,
    Forward,
    HeaderFilter,
    PathRewrite,
    PathRewriteKind,
    RedirectSpec,
    Rewrite,
)

Headers = list[tuple[str, str]]
_DEFAULT_PORTS = {"http": 80, "https": 443}


def apply_headers(edit: HeaderFilter, headers: Sequence[tuple[str, str]]) -> Headers:
    """`headers` after `edit`: set replaces every value of a name, add appends one more,
    remove drops every value; names compare case-insensitively (they are lower case)."""
    if not edit:
        return list(headers)
    drop = {name for name, _ in edit.set} | set(edit.remove)
    out = [(n, v) for n, v in headers if n.lower() not in drop]
    out.extend(edit.set)
    out.extend(edit.add)
    if edit.remove:
        # A header both added and removed ends up removed, as in Envoy.
        removed = set(edit.remove)
        out = [(n, v) for n, v in out if n not in removed]
    return out


def replace_prefix(path: str, prefix: str, replacement: str) -> str:
    """The Gateway API's ReplacePrefixMatch: `prefix` (matched element-wise) becomes
    `replacement`, trailing slashes of both ignored, so "/foo" + "/" on "/foo/bar" is "/bar"."""
    stem = prefix.rstrip("/")
    rest = path[len(stem) :] if path.startswith(stem) else path
    out = replacement.rstrip("/") + rest
    return out if out.startswith("/") else "/" + out


def rewrite_path(rewrite: PathRewrite, path: str, matched_prefix: str | None) -> str:
    """`path` (query included) after a path rewrite; the query is kept."""
    only, query = split_path(path)
    if rewrite.kind is PathRewriteKind.FULL:
        new = rewrite.value or "/"
    elif rewrite.kind is PathRewriteKind.PREFIX:
        new = replace_prefix(only, matched_prefix or "/", rewrite.value)
    elif matched_prefix is not None and only.startswith(matched_prefix):
        new = rewrite.value + only[len(matched_prefix) :]  # Istio: the matched string prefix
    else:
        new = rewrite.value
    return f"{new}?{query}" if query else new


def apply_request(
    forward: Forward,
    backend: Backend,
    path: str,
    authority: str,
    headers: Sequence[tuple[str, str]],
) -> tuple[str, str, Headers]:
    """(path, authority, headers) to send to `backend`: the rule's request header edits, then
    the backend's, then the URL rewrite."""
    out = apply_headers(forward.request_headers, headers)
    out = apply_headers(backend.request_headers, out)
    rewrite: Rewrite | None = forward.rewrite
    if rewrite is not None:
        if rewrite.path is not None:
            path = rewrite_path(rewrite.path, path, forward.matched_prefix)
        if rewrite.hostname is not None:
            authority = rewrite.hostname
    return path, authority, out


def apply_response(
    forward: Forward, backend: Backend, headers: Sequence[tuple[str, str]]
) -> Headers:
    """Response headers after the backend's, then the rule's, response header edits."""
    return apply_headers(forward.response_headers, apply_headers(backend.response_headers, headers))


def redirect_location(
    spec: RedirectSpec, facts: RequestFacts, port: int, matched_prefix: str | None
) -> str:
    """The Location of a redirect, as the Gateway API builds it: scheme, host and path from
    the request unless the filter replaces them; the port from the filter, else the scheme's
    well-known port when the filter sets a scheme, else the port the request came to
    (`port`, the service port); a port that is the scheme's default is left out."""
    scheme = spec.scheme or "http"
    host = spec.hostname or authority_host(facts.authority) or "localhost"
    if spec.port is not None:
        out_port = spec.port
    elif spec.scheme is not None:
        out_port = _DEFAULT_PORTS[scheme]
    else:
        out_port = authority_port(facts.authority) or port
    path = facts.path
    if spec.path is not None:
        path = rewrite_path(spec.path, path, matched_prefix)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    netloc = host if out_port == _DEFAULT_PORTS.get(scheme) else f"{host}:{out_port}"
    return f"{scheme}://{netloc}{path}"
