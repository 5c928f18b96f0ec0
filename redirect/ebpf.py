"""eBPF capture mode (bcc). Being written; until then installing it fails closed."""

from __future__ import annotations

from redirect.iptables import CaptureError
from redirect.rules import InpodConfig

_HINT = "use --redirect-mode iptables on this node"


def install(netns_path: str, cfg: InpodConfig) -> None:
    raise CaptureError(netns_path, "eBPF capture", "not available in this build", _HINT)


def remove(netns_path: str, cfg: InpodConfig) -> None:
    raise CaptureError(netns_path, "eBPF capture removal", "not available in this build", _HINT)
