"""localcluster/kube/helm.py: where helm is found, and how its failures read."""

from __future__ import annotations

import stat

import pytest

from localcluster.kube import helm
from tests.daemonset.conftest import NAMESPACE, RELEASE, chart_path


def test_the_cache_comes_first(tmp_path, monkeypatch):
    fake = tmp_path / "helm"
    fake.write_text("#!/bin/sh\necho v3.17.0\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("HELM_CACHE", str(tmp_path))
    assert helm.helm_binary() == fake


def test_path_when_nothing_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HELM_CACHE", str(tmp_path / "empty"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    on_path = bin_dir / "helm"
    on_path.write_text("#!/bin/sh\n")
    on_path.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    assert helm.helm_binary() == on_path
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    with pytest.raises(helm.HelmError, match=r"scripts/helm-fetch\.sh"):
        helm.helm_binary()


def test_the_default_cache_is_under_home(monkeypatch):
    monkeypatch.delenv("HELM_CACHE", raising=False)
    monkeypatch.setenv("HOME", "/home/someone")
    assert str(helm.cached_binary()) == "/home/someone/.cache/ambient-mesh/helm-3.17/helm"


@pytest.mark.usefixtures("helm_present")
def test_a_failure_carries_helms_words():
    with pytest.raises(helm.HelmError) as failed:
        helm.template(chart_path("node-agent"), RELEASE, NAMESPACE, set=["redirectMode=nft"])
    message = str(failed.value)
    assert message.startswith("helm template ")
    assert 'redirectMode must be "iptables" or "ebpf", not "nft"' in message


def test_a_run_is_bounded(tmp_path, monkeypatch):
    # A helm that never answers: its timeout is the caller's, not forever.
    slow = tmp_path / "helm"
    slow.write_text("#!/bin/sh\nexec sleep 30\n")
    slow.chmod(0o755)
    monkeypatch.setenv("HELM_CACHE", str(tmp_path))
    with pytest.raises(helm.HelmError, match=r"no answer within 0\.2 s"):
        helm.run(["version"], timeout=0.2)


@pytest.mark.usefixtures("helm_present")
def test_values_keep_their_types():
    """Values go to helm as a YAML file, so a boolean stays a boolean (as --set-string would
    not), and `set` still applies on top."""
    objs = helm.template(
        chart_path("tunnel"),
        RELEASE,
        NAMESPACE,
        values={"dnsCapture": False, "logLevel": "debug"},
        set=["logLevel=warning"],
    )
    (ds,) = [o for o in objs if o["kind"] == "DaemonSet"]
    env = {
        e["name"]: e.get("value") for e in ds["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["ISTIO_META_DNS_CAPTURE"] == "false"
    assert env["LOG_LEVEL"] == "warning"
