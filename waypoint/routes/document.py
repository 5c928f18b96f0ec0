"""The envelope every routing document shares: apiVersion, kind, metadata, spec."""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, TypeVar

from meshcore.defaults import NAMESPACE as DEFAULT_NAMESPACE
from meshcore.reader import Reader
from waypoint.routes.values import RouteConfigError, one_of

GATEWAY_GROUP = "gateway.networking.k8s.io"
ISTIO_NETWORKING = "networking.istio.io"

# kind -> the apiVersions accepted for it.
API_VERSIONS: dict[str, tuple[str, ...]] = {
    "HTTPRoute": (f"{GATEWAY_GROUP}/v1", f"{GATEWAY_GROUP}/v1beta1"),
    "GRPCRoute": (f"{GATEWAY_GROUP}/v1", f"{GATEWAY_GROUP}/v1alpha2"),
    "ReferenceGrant": (f"{GATEWAY_GROUP}/v1beta1", f"{GATEWAY_GROUP}/v1alpha2"),
    "VirtualService": tuple(f"{ISTIO_NETWORKING}/{v}" for v in ("v1", "v1beta1", "v1alpha3")),
    "DestinationRule": tuple(f"{ISTIO_NETWORKING}/{v}" for v in ("v1", "v1beta1", "v1alpha3")),
}

_TOP = ("apiVersion", "kind", "metadata", "spec", "status")
_METADATA = (
    "name",
    "namespace",
    "labels",
    "annotations",
    "creationTimestamp",
    "uid",
    "resourceVersion",
    "generation",
)


class RouteConfigErrors(RouteConfigError):
    """Several errors in one document, each naming its field."""

    def __init__(self, messages: list[str]) -> None:
        super().__init__("; ".join(messages))
        self.messages = messages


@dataclass(frozen=True, slots=True)
class Meta:
    kind: str
    api_version: str
    namespace: str
    name: str
    # RFC 3339 in UTC as Kubernetes writes it; compares in time order as a string.
    created: str | None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def identify(doc: Any) -> tuple[str, str, str]:
    """(kind, namespace, name) as far as they can be read, for statuses of bad documents."""
    if not isinstance(doc, dict):
        return "?", "?", "?"
    meta = doc.get("metadata")
    meta = meta if isinstance(meta, dict) else {}
    kind, ns, name = doc.get("kind"), meta.get("namespace"), meta.get("name")
    return (
        kind if isinstance(kind, str) else "?",
        ns if isinstance(ns, str) and ns else DEFAULT_NAMESPACE,
        name if isinstance(name, str) else "?",
    )


def read_meta(
    r: Reader, doc: Any, kinds: Collection[str] | None = None
) -> tuple[Meta, dict[str, Any]]:
    """The envelope of `doc` and its spec, strictly."""
    doc = r.mapping(doc, "", required=True)
    r.check_keys(doc, _TOP, "")
    kind = one_of(r, doc.get("kind"), "kind", tuple(kinds or API_VERSIONS))
    api_version = one_of(r, doc.get("apiVersion"), "apiVersion", API_VERSIONS[kind])
    metadata = r.mapping(doc.get("metadata"), "metadata", required=True)
    r.check_keys(metadata, _METADATA, "metadata")
    name = r.name(metadata, "name", "metadata")
    if len(name) > 253:
        r.fail("metadata.name", "is longer than 253 characters")
    namespace = r.name(metadata, "namespace", "metadata", DEFAULT_NAMESPACE)
    r.string_map(metadata.get("labels"), "metadata.labels")
    r.string_map(metadata.get("annotations"), "metadata.annotations")
    created = metadata.get("creationTimestamp")
    if created is not None and not isinstance(created, str):
        created = str(created)  # YAML reads an unquoted timestamp as a datetime
    spec = r.mapping(doc.get("spec"), "spec", required=True)
    return Meta(kind, api_version, namespace, name, created), spec


T = TypeVar("T")


def collect(errors: list[str], fn: Callable[[], T]) -> T | None:
    """Run one part of a parse; its error joins `errors` so later parts are still checked."""
    try:
        return fn()
    except RouteConfigErrors as exc:
        errors.extend(exc.messages)
    except RouteConfigError as exc:
        errors.append(str(exc))
    return None


def limited(r: Reader, value: Any, path: str, most: int) -> list[Any]:
    items = r.items(value, path)
    if len(items) > most:
        r.fail(path, f"at most {most} entries are allowed, got {len(items)}")
    return items


def each_mapping(r: Reader, value: Any, path: str, most: int) -> list[tuple[str, dict[str, Any]]]:
    """(path, entry) for each entry of a list of mappings."""
    out = []
    for i, entry in enumerate(limited(r, value, path, most)):
        at = f"{path}[{i}]"
        out.append((at, r.mapping(entry, at, required=True)))
    return out


def no_duplicates(r: Reader, names: list[str], path: str) -> None:
    seen: set[str] = set()
    for i, name in enumerate(names):
        if name in seen:
            r.fail(f"{path}[{i}]", f"{name!r} is given twice")
        seen.add(name)
