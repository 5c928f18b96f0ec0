"""The tunnel's DNS proxy (15053 in each enrolled pod, UDP and TCP).

`message`: the DNS wire format, strict and bounded (pure). `resolve`: which names the tunnel
answers itself, from the mesh state, and with what (pure). `resolvconf`: the upstream
resolvers, read from a resolv.conf. `server`: the per-pod listeners, the forwarder and
their bounds.
"""
