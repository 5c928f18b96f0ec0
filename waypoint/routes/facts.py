"""What matching needs to know about a request, and nothing of the codec's objects."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote_plus

Header = tuple[str, str]


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """A request as the router sees it.

    `path` is the origin-form target with its query ("/a/b?x=1"); header names are
    lower-case and repeats are kept in order; `authority` is Host or :authority.
    `source_namespace`, when the caller knows the client's namespace, lets a route written in
    the client's own namespace (a consumer route) apply to it.
    """

    method: str
    path: str
    headers: tuple[Header, ...] = ()
    authority: str = ""
    is_grpc: bool = False
    source_namespace: str | None = None
    source_ip: str | None = None

    @property
    def path_only(self) -> str:
        return split_path(self.path)[0]

    @property
    def query(self) -> str:
        return split_path(self.path)[1]

    def header(self, name: str) -> str | None:
        """The header's value, repeats joined with ',' (how HTTP folds them), or None."""
        values = [v for n, v in self.headers if n == name]
        if not values:
            return None
        return values[0] if len(values) == 1 else ",".join(values)

    def query_param(self, name: str) -> str | None:
        """The first value of a query parameter, decoded, or None."""
        for key, value in query_params(self.query):
            if key == name:
                return value
        return None

    @property
    def host(self) -> str:
        return authority_host(self.authority)


def split_path(target: str) -> tuple[str, str]:
    """("/a/b", "x=1") from "/a/b?x=1"; a fragment, which never belongs on the wire, is cut."""
    target = target.split("#", 1)[0]
    path, _, query = target.partition("?")
    return path, query


def query_params(query: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for part in query.split("&"):
        if not part:
            continue
        key, _, value = part.partition("=")
        out.append((unquote_plus(key), unquote_plus(value)))
    return out


def authority_host(authority: str) -> str:
    """The host of "host:port" or "[v6]:port", lower-case, without the port."""
    authority = authority.strip().lower()
    if authority.startswith("["):
        end = authority.find("]")
        return authority[: end + 1] if end > 0 else authority
    host, sep, port = authority.rpartition(":")
    if sep and port.isdigit() and ":" not in host:
        return host
    return authority


def authority_port(authority: str) -> int | None:
    if authority.startswith("["):
        _, _, rest = authority.partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        _, sep, port = authority.rpartition(":")
        if not sep:
            return None
    return int(port) if port.isdigit() and 0 < int(port) < 65536 else None
