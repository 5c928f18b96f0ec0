"""The files of a secret, configMap, downwardAPI or projected volume (pure).

`volume_files` computes what the kubelet writes for a volume from the objects it read (each
ConfigMap/Secret as key -> bytes, None when it does not exist), the pod's own fields and the
tokens it requested. A required object or key that is missing raises `VolumeNotReady`: the
kubelet keeps the container waiting and tries again, as the real one does (FailedMount).
"""

from __future__ import annotations

import calendar
import json
import time
from collections.abc import Mapping
from typing import Any

from localcluster.kube.containerplan import FileSource, Volume

Files = dict[str, tuple[bytes, int]]  # relative path -> (content, mode)
ObjectKey = tuple[str, str]  # ("secret" | "configMap", name)
TokenKey = tuple[str, int, str]  # (audience, expirationSeconds, path)


class VolumeNotReady(RuntimeError):
    """A volume cannot be written yet (its Secret or ConfigMap is missing); says which."""


TOKEN_RENEW_FRACTION = 0.8  # a projected token is renewed at 80% of its lifetime


def renew_at(issued: float, expiration_timestamp: str, requested_s: int) -> float:
    """When to ask again for a token issued at `issued` (epoch seconds): at 80% of the
    lifetime the API server granted (its `expirationTimestamp`, which may differ from the
    request), else of the one requested."""
    lifetime = float(requested_s)
    try:
        expires = calendar.timegm(time.strptime(expiration_timestamp, "%Y-%m-%dT%H:%M:%SZ"))
        lifetime = max(expires - issued, 1.0)
    except ValueError:
        pass
    return issued + TOKEN_RENEW_FRACTION * lifetime


def token_key(src: FileSource) -> TokenKey:
    return (src.audience, src.expiration_s, src.token_path)


def object_keys(volume: Volume) -> list[ObjectKey]:
    return [(s.kind, s.name) for s in volume.sources if s.kind in ("secret", "configMap")]


def _quote(v: str) -> str:
    # Go's %q, which the kubelet uses for labels and annotations files: JSON's escaping is the
    # same for every character a label value can hold.
    return json.dumps(v, ensure_ascii=False)


def pod_field(pod: Mapping[str, Any], path: str) -> str:
    """A downward API fieldPath's value, as the kubelet writes it into a file."""
    md = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    for key in ("labels", "annotations"):
        whole = f"metadata.{key}"
        values = md.get(key) or {}
        if path == whole:
            return "\n".join(f"{k}={_quote(str(values[k]))}" for k in sorted(values))
        if path.startswith(whole + "['") and path.endswith("']"):
            return str(values.get(path[len(whole) + 2 : -2], ""))
    simple = {
        "metadata.name": md.get("name"),
        "metadata.namespace": md.get("namespace"),
        "metadata.uid": md.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName"),
        "status.podIP": status.get("podIP"),
        "status.hostIP": status.get("hostIP"),
    }
    if path not in simple:
        raise VolumeNotReady(f"downwardAPI fieldPath {path!r} is not supported")
    return str(simple[path] or "")


def volume_files(
    volume: Volume,
    objects: Mapping[ObjectKey, Mapping[str, bytes] | None],
    pod: Mapping[str, Any],
    tokens: Mapping[TokenKey, str],
) -> Files:
    out: Files = {}
    for src in volume.sources:
        if src.kind in ("secret", "configMap"):
            data = objects.get((src.kind, src.name))
            if data is None:
                if src.optional:
                    continue
                raise VolumeNotReady(f"volume {volume.name}: {src.kind} {src.name!r} not found")
            if not src.items:
                for key, value in data.items():
                    out[key] = (value, volume.default_mode)
                continue
            for it in src.items:
                if it.key not in data:
                    if src.optional:
                        continue
                    raise VolumeNotReady(
                        f"volume {volume.name}: {src.kind} {src.name!r} has no key {it.key!r}"
                    )
                mode = it.mode if it.mode is not None else volume.default_mode
                out[it.path] = (data[it.key], mode)
        elif src.kind == "downwardAPI":
            for d in src.downward:
                mode = d.mode if d.mode is not None else volume.default_mode
                out[d.path] = (pod_field(pod, d.field).encode(), mode)
        elif src.kind == "serviceAccountToken":
            token = tokens.get(token_key(src))
            if token is None:
                raise VolumeNotReady(f"volume {volume.name}: no token for {src.token_path}")
            out[src.token_path] = (token.encode(), volume.default_mode)
    return out
