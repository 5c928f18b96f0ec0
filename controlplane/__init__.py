"""The control plane: the mesh's certificate authority and the sources of mesh config.

In local mode it is a CA that signs SPIFFE leaf certificates over a unix socket, for nodes
that prove who they are with a token; workloads, services and policies come from one file.
"""
