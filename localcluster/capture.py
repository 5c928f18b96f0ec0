"""Packet capture on a link inside the cluster (tcpdump in that link's namespace)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import nsutil


class PacketCaptureError(RuntimeError):
    pass


class Capture:
    """tcpdump writing TCP packets of one interface to a pcap file, stopped by PID."""

    def __init__(self, netns_path: str, iface: str, out: Path) -> None:
        tcpdump = shutil.which("tcpdump") or "/usr/bin/tcpdump"
        self.out = out
        # `ip netns exec` rather than a bare setns: it also mounts the namespace's own
        # /sys, without which libpcap binds to the interface but captures nothing.
        name = Path(netns_path).name
        nsutil.netns_path(name)  # validates the name
        self._proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                name,
                tcpdump,
                "--immediate-mode",
                "-i",
                iface,
                "-U",
                "-s",
                "0",
                "-w",
                str(out),
                "tcp",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        # tcpdump says "listening on ..." once the capture is armed.
        assert self._proc.stderr is not None
        deadline = time.monotonic() + 10
        line = b""
        while time.monotonic() < deadline:
            line = self._proc.stderr.readline()
            if b"listening on" in line or not line:
                break
        if b"listening on" not in line:
            self.stop()
            raise PacketCaptureError(
                f"tcpdump did not start on {iface}: {line.decode(errors='replace')}"
            )

    def stop(self) -> None:
        if self._proc.poll() is None:
            time.sleep(0.3)  # let the last packets of the traffic just sent reach the file
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._proc.stderr is not None:
            self._proc.stderr.close()

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
