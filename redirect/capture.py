"""The capture of one pod, in the mode its node runs: iptables (default) or eBPF.

Both modes have the same observable semantics (protocols.md "Redirection inside the pod"):
the app's outbound TCP reaches the tunnel's 15001 listener with its original destination
recoverable, inbound TCP reaches 15006 (plaintext) or 15008 (HBONE), and the tunnel's own
marked traffic and loopback are untouched. Installing twice changes nothing; removing
leaves the pod as it was.
"""

from __future__ import annotations

import enum

from redirect.iptables import apply_inpod, remove_inpod
from redirect.iptables import stop_redirects as stop_iptables_redirects
from redirect.rules import InpodConfig


class RedirectMode(enum.Enum):
    IPTABLES = "iptables"
    EBPF = "ebpf"


def install(netns_path: str, mode: RedirectMode, cfg: InpodConfig | None = None) -> None:
    """Raises `redirect.iptables.CaptureError` (the eBPF mode too) with the failing step."""
    if mode is RedirectMode.EBPF:
        from redirect import ebpf  # bcc is loaded only on nodes that use it

        ebpf.install(netns_path, cfg or InpodConfig())
        return
    apply_inpod(netns_path, cfg or InpodConfig())


def remove(netns_path: str, mode: RedirectMode, cfg: InpodConfig | None = None) -> None:
    if mode is RedirectMode.EBPF:
        from redirect import ebpf

        ebpf.remove(netns_path, cfg or InpodConfig())
        return
    remove_inpod(netns_path, cfg or InpodConfig())


def stop_redirects(netns_path: str, mode: RedirectMode, cfg: InpodConfig | None = None) -> None:
    """Release, step one: new connections stop being captured; the ones the tunnel carries
    keep their path through it until `remove`."""
    if mode is RedirectMode.EBPF:
        from redirect import ebpf

        ebpf.stop_redirects(netns_path, cfg or InpodConfig())
        return
    stop_iptables_redirects(netns_path)
