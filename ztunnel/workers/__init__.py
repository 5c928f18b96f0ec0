"""Tunnel worker processes: one node's tunnel on several cores.

The process started as `python -m ztunnel` is the owner: it keeps ZDS, the certificates,
the config source and the admin, metrics and readiness servers, and serves pods itself as
worker 0. With `TUNNEL_WORKERS` > 1 it also starts that many minus one worker processes
(`python -m ztunnel.workers.child`), each joined to it by a unix SEQPACKET socket pair.
Every worker opens every enrolled pod's three listeners in the pod's netns (the netns fd
passed over the socket), beside the owner's in the same SO_REUSEPORT groups, so the kernel
spreads a pod's connections over the processes. `plan` (the worker count), `codec` (the
messages, pure), `channel` (the socket), `owner` (the owner's side), `certs` (a worker's
certificates, from the owner) and `child` (a worker's main).
"""
