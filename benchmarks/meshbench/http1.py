"""The one piece of HTTP/1.1 answer parsing the load generators share (the mesh_bench
loadgen and the soak's): a head's Content-Length, strictly."""

from __future__ import annotations


def content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            try:
                n = int(value.strip())
            except ValueError:
                raise ValueError(f"bad Content-Length {value[:20]!r}") from None
            if n < 0:
                raise ValueError(f"negative Content-Length {n}")
            return n
    return 0
