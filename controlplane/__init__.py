"""The control plane: the mesh's certificate authority and the sources of mesh config.

In local mode it is a CA that signs SPIFFE leaf certificates over a unix socket, for nodes
that prove who they are with a token; workloads, services and policies come from one file.
On Kubernetes (`python -m controlplane`) it computes that same file from the API server:
informers, a pure compute, the waypoints' objects and the statuses users read.
"""
