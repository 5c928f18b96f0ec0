"""A cluster's policy resources as `kubectl apply` takes them: defaults, checks, identity. Pure.

Each document must be a resource as users write it (apiVersion, kind, metadata.name,
spec). A missing `metadata.namespace` is `default`, as kubectl fills it in (without it
the tunnel would read the policy as mesh-wide). Then each document is checked with the
tunnel's own parsers (`meshcore.policy.validate`): what a tunnel would refuse, replace with
a deny-all stand-in or read differently from what was written is refused here, before
anything is written. A batch is all or nothing.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from meshcore.defaults import NAMESPACE as DEFAULT_NAMESPACE
from meshcore.policy.validate import ENFORCED_KINDS, check_resource

MAX_POLICIES = 1000  # per cluster: real meshes have tens; each one costs every tunnel
# `kubectl delete authorizationpolicy ...` spellings of the kinds, lowercase.
KIND_NAMES = {k.lower(): k for k in ENFORCED_KINDS}

Key = tuple[str, str, str]  # (kind, namespace, name)


class PolicyError(ValueError):
    """Documents that cannot be applied (or deleted); the message names every problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        if len(self.problems) == 1:
            text = self.problems[0]
        else:
            text = f"{len(self.problems)} problems:\n  " + "\n  ".join(self.problems)
        super().__init__(text)


@dataclass(frozen=True, slots=True)
class Resource:
    """One checked document, with its defaults filled in."""

    kind: str
    namespace: str
    name: str
    doc: Mapping[str, Any] = field(hash=False)
    warnings: tuple[str, ...] = ()

    @property
    def key(self) -> Key:
        return (self.kind, self.namespace, self.name)


def describe(key: Key) -> str:
    return f"{key[0]} {key[1]}/{key[2]}"


def with_defaults(doc: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `doc` with kubectl's default namespace when it names none."""
    out = copy.deepcopy(dict(doc))
    meta = out.get("metadata")
    if isinstance(meta, dict) and not meta.get("namespace"):
        meta["namespace"] = DEFAULT_NAMESPACE
    return out


def _envelope_problem(doc: Any) -> str | None:
    if not isinstance(doc, Mapping):
        return f"expected a resource (a mapping), got {type(doc).__name__}"
    missing = [k for k in ("apiVersion", "kind", "metadata") if not doc.get(k)]
    if missing:
        return f"not a resource: {', '.join(missing)} not set (kubectl needs them too)"
    return None


def check_documents(docs: Sequence[Any], source: str) -> list[Resource]:
    """Every document checked, defaults filled in; raises PolicyError naming every problem
    (`source` names where the documents came from, e.g. the file)."""
    out: list[Resource] = []
    problems: list[str] = []
    first: dict[Key, int] = {}
    for i, raw in enumerate(docs):
        where = f"{source}[{i}]" if len(docs) > 1 else source
        problem = _envelope_problem(raw)
        if problem is not None:
            problems.append(f"{where}: {problem}")
            continue
        doc = with_defaults(raw)
        check = check_resource(doc, path=where)
        if not check.ok:
            problems += [f"{where}: {e}" if not e.startswith(where) else e for e in check.errors]
            continue
        res = Resource(check.kind, check.namespace, check.name, doc, check.warnings)
        if res.key in first:
            problems.append(f"{where}: {describe(res.key)} is also document {first[res.key]}")
            continue
        first[res.key] = i
        out.append(res)
    if problems:
        raise PolicyError(problems)
    return out


def key_of(doc: Mapping[str, Any]) -> Key:
    """(kind, namespace, name) of a stored (already checked) document."""
    meta = doc["metadata"]
    return (str(doc["kind"]), str(meta["namespace"]), str(meta["name"]))


def merge(current: Iterable[Mapping[str, Any]], new: Iterable[Resource]) -> list[dict[str, Any]]:
    """`current` with each of `new` created or replaced in place (apply's semantics)."""
    out = [dict(d) for d in current]
    index = {key_of(d): i for i, d in enumerate(out)}
    for res in new:
        if res.key in index:
            out[index[res.key]] = dict(res.doc)
        else:
            index[res.key] = len(out)
            out.append(dict(res.doc))
    if len(out) > MAX_POLICIES:
        raise PolicyError(
            [f"a cluster holds at most {MAX_POLICIES} policies; this would make {len(out)}"]
        )
    return out


def remove(current: Iterable[Mapping[str, Any]], keys: Iterable[Key]) -> list[dict[str, Any]]:
    """`current` without `keys`; raises PolicyError naming each key that is not there (and
    then removes nothing)."""
    docs = [dict(d) for d in current]
    present = {key_of(d) for d in docs}
    wanted = list(dict.fromkeys(keys))
    missing = [k for k in wanted if k not in present]
    if missing:
        raise PolicyError([f"no {describe(k)}" for k in missing])
    gone = set(wanted)
    return [d for d in docs if key_of(d) not in gone]


def delete_keys(docs: Sequence[Any], source: str) -> list[Key]:
    """What `delete -f` removes: the kind, namespace (default `default`) and name of each
    document. Only those parts are read, as kubectl does."""
    keys: list[Key] = []
    problems: list[str] = []
    for i, raw in enumerate(docs):
        where = f"{source}[{i}]" if len(docs) > 1 else source
        problem = _envelope_problem(raw)
        meta = raw.get("metadata") if isinstance(raw, Mapping) else None
        if problem is None and not (isinstance(meta, Mapping) and meta.get("name")):
            problem = "metadata.name not set"
        if problem is None and raw["kind"] not in ENFORCED_KINDS:
            problem = (
                f"kind {raw['kind']!r} is not one this mesh holds ({', '.join(ENFORCED_KINDS)})"
            )
        if problem is not None:
            problems.append(f"{where}: {problem}")
            continue
        assert isinstance(meta, Mapping)
        keys.append(
            (str(raw["kind"]), str(meta.get("namespace") or DEFAULT_NAMESPACE), str(meta["name"]))
        )
    if problems:
        raise PolicyError(problems)
    return keys
