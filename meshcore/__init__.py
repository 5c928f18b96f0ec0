"""The shared core of the mesh's two proxies (the per-node tunnel `ztunnel/` and, later, the
waypoint `waypoint/`): identities and certificates, TLS, HBONE, the relay, authorization
policy, observability, the small HTTP/1.1 stack, the admin servers, the mesh state and its
discovery. It imports neither proxy, nor the local cluster, nor the CLI.
"""
