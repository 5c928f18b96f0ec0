"""The node agent's DNS capture setting: off unless `--dns-capture` or AMBIENT_DNS_CAPTURE."""

from __future__ import annotations

import pytest

from redirect import agent
from redirect.rules import InpodConfig


def test_off_by_default_on_by_flag_or_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    base = ["--node", "n1", "--pods-file", "/p.json"]
    monkeypatch.delenv(agent.DNS_CAPTURE_ENV, raising=False)
    assert agent.build_parser().parse_args(base).dns_capture is False
    assert agent.build_parser().parse_args([*base, "--dns-capture"]).dns_capture is True
    monkeypatch.setenv(agent.DNS_CAPTURE_ENV, "true")
    assert agent.build_parser().parse_args(base).dns_capture is True
    assert agent.build_parser().parse_args([*base, "--no-dns-capture"]).dns_capture is False
    monkeypatch.setenv(agent.DNS_CAPTURE_ENV, "sometimes")
    with pytest.raises(SystemExit, match="AMBIENT_DNS_CAPTURE='sometimes'"):
        agent.build_parser()


def test_the_dataplane_applies_the_dns_rules_it_was_given() -> None:
    plane = agent.NodeDataplane(inpod_cfg=InpodConfig(capture_dns=True))
    assert plane.inpod_cfg.capture_dns
    assert agent.NodeDataplane().inpod_cfg.capture_dns is False
