"""Path matching for `to.operation.paths`: exact, prefix (`/api/*`), suffix (`*.png`),
presence (`*`), and the path templates `{*}` and `{**}`. Pure.

Templates follow Istio's rules (as Envoy's uri_template compiles them): each operator is a
whole path segment; `{*}` matches exactly one non-empty segment; `{**}` matches zero or more
characters, slashes included, and may only be the last segment; a templated path has no
other `*`. So `/foo/{*}/bar` matches `/foo/x/bar`, not `/foo//bar` or `/foo/x/y/bar`;
`/foo/{**}` matches `/foo/` and `/foo/a/b`, not `/foo`.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshcore.policy.model import StringMatch

ONE = "{*}"
ANY = "{**}"


class PathTemplateError(ValueError):
    """A path value that is not a valid template; the message says which rule it breaks."""


@dataclass(frozen=True, slots=True)
class PathTemplate:
    # The segments before `{**}` (or all of them), None for a `{*}` segment.
    segments: tuple[str | None, ...]
    tail: bool  # ends with `{**}`

    def matches(self, path: str) -> bool:
        parts = path.split("/")
        n = len(self.segments)
        if self.tail:
            # "/a/{**}" splits as ["", "a", "{**}"]: the path needs the n fixed parts and then
            # anything (even empty) after the slash that follows them.
            if len(parts) < n + 1:
                return False
            head = parts[:n]
        else:
            if len(parts) != n:
                return False
            head = parts
        for want, got in zip(self.segments, head, strict=True):
            if want is None:
                if not got:
                    return False
            elif want != got:
                return False
        return True

    def to_json(self) -> dict[str, str]:
        text = "/".join(ONE if s is None else s for s in self.segments)
        return {"template": text + ("/" + ANY if self.tail else "")}


PathMatcher = StringMatch | PathTemplate


def is_template(text: str) -> bool:
    return "{" in text or "}" in text


def parse_path(text: str) -> PathMatcher:
    """One `paths` value as a matcher; raises PathTemplateError for a bad template."""
    if not is_template(text):
        return StringMatch.istio(text)
    if not text.startswith("/"):
        raise PathTemplateError(f"{text!r}: a path template must start with '/'")
    parts = text.split("/")
    segments: list[str | None] = []
    tail = False
    for i, part in enumerate(parts):
        if part == ANY:
            if i != len(parts) - 1:
                raise PathTemplateError(f"{text!r}: {ANY} may only be the last segment")
            tail = True
        elif part == ONE:
            segments.append(None)
        elif "{" in part or "}" in part:
            raise PathTemplateError(f"{text!r}: {ONE} and {ANY} must each be a whole path segment")
        elif "*" in part:
            raise PathTemplateError(f"{text!r}: a path template may not contain another '*'")
        else:
            segments.append(part)
    return PathTemplate(tuple(segments), tail)


def path_only(target: str) -> str:
    """The path of a request target, without its query or fragment (policies never see
    them, as Istio's `url_path` matcher)."""
    for sep in ("?", "#"):
        cut = target.find(sep)
        if cut >= 0:
            target = target[:cut]
    return target
