"""idle: a pod process that does nothing until SIGTERM (or SIGINT), then exits 0.

It keeps a non-mesh pod (legacy-client) alive so requests can be sent from inside its
network namespace, as a client the mesh does not manage.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType


def main() -> int:
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
