"""One strict reader for decoded YAML and JSON documents.

Every parser of the project's inputs (the mesh config, AuthorizationPolicy and
PeerAuthentication, the local cluster file, the node agent's pod source) reads raw values
through a `Reader`, so the same mistake is worded the same way wherever it is made, and
every message names the path of the field: `pods[2].labels.version: expected a string, got
a number (quote it)`.

Strict means: unknown fields are errors, a value of the wrong type is never coerced
(except a port written as a string of digits, which YAML users write both ways), and null
counts as "not given". Each parser raises its own error type (`Reader(error=...)`) and
may put the entry it is reading in front of every message (`prefix`).
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Callable, Collection, Mapping
from typing import Any, NoReturn

import yaml

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# -- documents ---------------------------------------------------------------------------------

_BaseLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _StrictLoader(_BaseLoader):  # type: ignore[valid-type,misc]
    """SafeLoader (libyaml's when present) that refuses duplicate mapping keys: PyYAML
    silently keeps the last, so a key given twice would mean something nobody wrote."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:
                continue  # unhashable key: the base constructor reports it properly
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key!r}",
                    key_node.start_mark,
                )
            seen.add(key)
        result: dict[Any, Any] = super().construct_mapping(node, deep=deep)
        return result


# What PyYAML's constructors raise for bad input besides YAMLError (a timestamp with month
# 13, a document nested too deeply): all of it means "not valid YAML" to the person who
# wrote it.
_YAML_ERRORS = (yaml.YAMLError, ValueError, TypeError, OverflowError, RecursionError, MemoryError)


def _yaml_error(error: Callable[[str], Exception], exc: BaseException) -> Exception:
    if isinstance(exc, yaml.YAMLError):
        return error(f"not valid YAML: {exc}")
    return error(f"not valid YAML: {type(exc).__name__}: {exc}")


def load_document(text: str, error: Callable[[str], Exception] = ValueError) -> Any:
    """One YAML (or JSON) document, strictly: duplicate keys and anything but plain data
    are refused with `error(message)`."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise error(f"not valid JSON: found duplicate key {key!r}")
            out[key] = value
        return out

    # JSON is YAML too, and json parses it about a hundred times faster than PyYAML: a large
    # generated document written as JSON takes the fast path. Flow-style YAML such as
    # `{workloads: []}` is not JSON and falls through to the YAML loader.
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text, object_pairs_hook=no_duplicates)
        except json.JSONDecodeError:
            pass
        except RecursionError as exc:
            raise error("not valid JSON: nested too deeply") from exc
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass: no objects
    except _YAML_ERRORS as exc:
        raise _yaml_error(error, exc) from exc


def load_documents(text: str, error: Callable[[str], Exception] = ValueError) -> list[Any]:
    """Every document of a YAML stream (`---` between them), strictly; empty ones dropped."""
    try:
        return [d for d in yaml.load_all(text, Loader=_StrictLoader) if d is not None]
    except _YAML_ERRORS as exc:
        raise _yaml_error(error, exc) from exc


def describe(value: Any) -> str:
    """A short description of a decoded value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def join(path: str, name: object) -> str:
    """`path.name`, or `name` at the top."""
    return f"{path}.{name}" if path else str(name)


class Reader:
    """Typed access to decoded documents; every failure raises `error(message)`."""

    __slots__ = ("error", "prefix")

    def __init__(self, error: Callable[[str], Exception] = ValueError, prefix: str = "") -> None:
        self.error = error
        self.prefix = prefix  # e.g. "AuthorizationPolicy shop/allow-web: "

    def fail(self, path: str, message: str) -> NoReturn:
        at = f"{path}: " if path else ""
        raise self.error(f"{self.prefix}{at}{message}")

    # -- containers -------------------------------------------------------------------------

    def mapping(self, value: Any, path: str, *, required: bool = False) -> dict[str, Any]:
        """`value` as a mapping. Null counts as empty (YAML writes an empty field as null)
        unless `required`."""
        if value is None and not required:
            return {}
        if not isinstance(value, dict):
            self.fail(path, f"expected a mapping, got {describe(value)}")
        return value

    def items(self, value: Any, path: str) -> list[Any]:
        """`value` as a list; null counts as empty."""
        if value is None:
            return []
        if not isinstance(value, list):
            self.fail(path, f"expected a list, got {describe(value)}")
        return value

    def check_keys(self, entry: Mapping[Any, Any], allowed: Collection[str], path: str) -> None:
        """Refuse any key of `entry` not in `allowed` (a typo must not be ignored)."""
        if all(k in allowed for k in entry):
            return
        known = sorted(allowed)
        unknown = sorted((k for k in entry if k not in allowed), key=str)
        self.fail(join(path, unknown[0]), f"unknown field (expected one of {', '.join(known)})")

    # -- scalars ----------------------------------------------------------------------------

    def string(
        self,
        entry: Mapping[Any, Any],
        key: str,
        path: str,
        default: str | None = None,
        *,
        empty_ok: bool = False,
    ) -> str:
        """`entry[key]` as a string; without a default the field is required."""
        value = entry.get(key)
        # Paths are formatted only to report an error: a large config reads many fields.
        if value is None:
            if default is None:
                self.fail(join(path, key), "is required")
            return default
        if not isinstance(value, str):
            self.fail(
                join(path, key), f"expected a string, got {describe(value)} {value!r} (quote it)"
            )
        if not value and not empty_ok:
            self.fail(join(path, key), "must not be empty")
        return value

    def name(
        self, entry: Mapping[Any, Any], key: str, path: str, default: str | None = None
    ) -> str:
        """A string that is also a path segment (a namespace, a name): non-empty, no '/'."""
        value = self.string(entry, key, path, default)
        if "/" in value:
            self.fail(join(path, key), f"{value!r} must not contain '/'")
        return value

    def strings(self, value: Any, path: str) -> list[str]:
        """A list of non-empty strings; null counts as empty."""
        out = self.items(value, path)
        for i, v in enumerate(out):
            if not isinstance(v, str):
                self.fail(f"{path}[{i}]", f"expected a string, got {describe(v)}")
            if not v:
                self.fail(f"{path}[{i}]", "empty values are not allowed")
        return out

    def string_map(self, value: Any, path: str) -> dict[str, str]:
        """A mapping of strings to strings (labels, annotations, environment)."""
        out = self.mapping(value, path)
        for k, v in out.items():
            if not isinstance(k, str) or not k:
                self.fail(path, f"{k!r}: a key must be a non-empty string")
            if not isinstance(v, str):
                # YAML reads `version: 1` or `enabled: true` as a number or a boolean.
                self.fail(
                    join(path, k),
                    f"expected a string, got {describe(v)} {v!r} (quote numbers and booleans)",
                )
        return out

    def boolean(self, entry: Mapping[Any, Any], key: str, path: str, default: bool) -> bool:
        value = entry.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.fail(join(path, key), f"expected true or false, got {value!r}")
        return value

    def choice(self, value: Any, path: str, choices: Collection[str]) -> str:
        """One of `choices`, spelled exactly."""
        if not isinstance(value, str) or value not in choices:
            self.fail(path, f"expected one of {', '.join(choices)}, got {value!r}")
        return value

    def port(self, value: Any, path: str, *, low: int = 1) -> int:
        """A port number, given as a number or as a string of digits."""
        if isinstance(value, str) and value.isascii() and value.strip().isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(path, f"{value!r} is not a port number")
        if not low <= value <= 65535:
            self.fail(path, f"port {value} is not in {low}..65535")
        return value

    def ip(self, value: Any, path: str) -> IPAddress:
        if not isinstance(value, str):
            self.fail(path, f"expected an IP address string, got {describe(value)} {value!r}")
        # Fast path for the common case: inet_pton takes exactly the dotted quads ipaddress
        # takes (no leading zeros, no short forms) at a quarter of the cost. Anything else,
        # IPv6 included, goes the general way, which also words the error.
        try:
            return ipaddress.IPv4Address(socket.inet_pton(socket.AF_INET, value))
        except (OSError, ValueError):
            pass
        try:
            return ipaddress.ip_address(value)
        except ValueError:
            self.fail(path, f"{value!r} is not an IP address")
