"""A tiny image store for the kubelet's tests: Debian's static busybox as an image's rootfs.

The image `test/busybox:1` has `/bin/busybox` with a link per applet, an /etc/passwd with root
and `app` (1000:1000, also in group `extra` 2000), ENTRYPOINT `/bin/sh -c` and a CMD script, so
the argv rules can be seen; its Env sets PATH and a variable the pod may override.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

BUSYBOX = Path("/bin/busybox")  # Debian's busybox-static (scripts/programs.txt)
REF = "test/busybox:1"
DIGEST = "sha256:" + "b" * 64
ENTRYPOINT = ["/bin/sh", "-c"]
CMD = ["echo image-cmd; id -u"]
ENV = ["PATH=/bin", "FROM_IMAGE=image", "OVERRIDDEN=image"]


def build_store(store: Path) -> Path:
    """Write the image into `store` (once; image.json last) and return the store."""
    image = store / "test" / "busybox" / "1"
    if (image / "image.json").exists():
        return store
    rootfs = image / "rootfs"
    shutil.rmtree(image, ignore_errors=True)
    (rootfs / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
    applets = subprocess.run(
        [str(BUSYBOX), "--list"], check=True, capture_output=True, text=True
    ).stdout.split()
    for name in applets:
        if name != "busybox":
            os.symlink("busybox", rootfs / "bin" / name)
    for d in ("etc", "tmp", "proc", "sys", "dev", "run", "var", "home/app"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    os.chmod(rootfs / "tmp", 0o1777)
    os.symlink("/run", rootfs / "var" / "run")  # as Debian's: a mount under it must stay inside
    (rootfs / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n"
    )
    (rootfs / "etc" / "group").write_text("root:x:0:\napp:x:1000:\nextra:x:2000:app\n")
    (rootfs / "etc" / "image-file").write_text("from the image\n")
    meta = {
        "ref": REF,
        "digest": DIGEST,
        "config": {"Env": ENV, "Entrypoint": ENTRYPOINT, "Cmd": CMD, "WorkingDir": "/"},
    }
    (image / "image.json").write_text(json.dumps(meta))
    return store
