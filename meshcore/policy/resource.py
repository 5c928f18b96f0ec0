"""The two shapes a policy entry comes in, and workload selectors. Pure: no I/O.

Shared by the AuthorizationPolicy and PeerAuthentication parsers:
- an Istio resource as users write it: `apiVersion`, `kind`, `metadata: {name, namespace,
  annotations}`, `spec` (dry run is the annotation `istio.io/dry-run: "true"`);
- a flat entry (a control plane's form): `name`, `namespace` and the spec's fields at the
  top level.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from meshcore.reader import Reader, describe, join
from meshcore.state import MeshConfigError, RawPolicy

Labels = tuple[tuple[str, str], ...]

# Keys of an Istio resource envelope. `status` is what the API server writes back; it is
# accepted so that `kubectl get -o yaml` output can be used as is, and never read.
_ENVELOPE_KEYS = frozenset({"apiVersion", "kind", "metadata", "spec", "status"})
DRY_RUN_ANNOTATION = "istio.io/dry-run"


def reader_for(kind: str, key: str) -> Reader:
    """A reader whose every error names the policy being parsed and the field."""
    return Reader(MeshConfigError, f"{kind} {key}: ")


def parse_selector(r: Reader, value: Any, path: str) -> Labels:
    """`{matchLabels: {k: v}}` as sorted pairs; () when absent or empty."""
    sel = r.mapping(value, path)
    r.check_keys(sel, ("matchLabels",), path)
    labels_path = join(path, "matchLabels")
    out: list[tuple[str, str]] = []
    for k, v in r.mapping(sel.get("matchLabels"), labels_path).items():
        if not k:
            r.fail(labels_path, "a label name must not be empty")
        if not isinstance(v, str):
            r.fail(f"{labels_path}.{k}", f"label value must be a string, got {describe(v)}")
        out.append((k, v))
    return tuple(sorted(out))


def selects(selector: Labels, labels: Mapping[str, str]) -> bool:
    """Whether every selector label is on the workload (an empty selector selects all)."""
    return all(labels.get(k) == v for k, v in selector)


@dataclass(frozen=True, slots=True)
class Envelope:
    """One policy entry, unwrapped: its body (the spec) and where the body lives."""

    resource: bool  # Istio resource form (kind/metadata/spec) rather than a flat entry
    body: dict[str, Any]
    body_path: str  # "spec" for resources, "" for flat entries
    dry_run: bool | None  # from the resource's annotation; None when not given


def decode(raw: RawPolicy, r: Reader) -> Any:
    try:
        return raw.spec()
    except ValueError as exc:  # a RawPolicy built by hand with broken JSON
        r.fail("", f"entry is not valid JSON: {exc}")


def unwrap(raw: RawPolicy, r: Reader, kind: str) -> Envelope:
    """Split an entry into its body, checking the envelope of the Istio resource form."""
    entry = decode(raw, r)
    if not isinstance(entry, dict):
        r.fail("", f"expected a mapping, got {describe(entry)}")
    if "kind" not in entry and "metadata" not in entry:
        return Envelope(False, entry, "", None)
    r.check_keys(entry, _ENVELOPE_KEYS, "")
    if entry.get("kind") != kind:
        r.fail("kind", f"expected {kind!r}, got {entry.get('kind')!r}")
    api = entry.get("apiVersion")
    if api is not None and (not isinstance(api, str) or not api.startswith("security.istio.io/")):
        r.fail("apiVersion", f"expected security.istio.io/<version>, got {api!r}")
    meta = r.mapping(entry.get("metadata"), "metadata")
    annotations = r.mapping(meta.get("annotations"), "metadata.annotations")
    dry_run: bool | None = None
    if DRY_RUN_ANNOTATION in annotations:
        text = annotations[DRY_RUN_ANNOTATION]
        if not isinstance(text, str) or text.lower() not in ("true", "false"):
            r.fail(
                f"metadata.annotations.{DRY_RUN_ANNOTATION}",
                f'expected "true" or "false", got {text!r}',
            )
        dry_run = text.lower() == "true"
    return Envelope(True, r.mapping(entry.get("spec"), "spec"), "spec", dry_run)
