"""eBPF capture mode (bcc). Being written; until then installing it fails closed."""

from __future__ import annotations

from redirect.iptables import CaptureError
from redirect.rules import InpodConfig


def install(netns_path: str, cfg: InpodConfig) -> None:
    raise CaptureError(f"{netns_path}: the eBPF capture mode is not available yet")


def remove(netns_path: str, cfg: InpodConfig) -> None:
    raise CaptureError(f"{netns_path}: the eBPF capture mode is not available yet")
