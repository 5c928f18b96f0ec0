"""A Kubernetes-like cluster on one Linux machine, built entirely inside network namespaces.

A cluster netns holds the bridge; each node is a netns on that bridge; each pod is a netns
behind its node. Nothing is routed from the root namespace. `spec` parses the cluster file,
`network` builds and removes the namespaces, `up`/`down` orchestrate the whole cluster.

Modules: `spec` (cluster file -> frozen ClusterSpec, addressing, pod env), `xds` (the
LOCAL_XDS_PATH document), `network` (namespaces, veths, bridges, routes, service DNAT),
`processes` (processes in a netns, recorded by pid + start time), `apps` (the pods' own
commands), `state` (the per-cluster record and an idempotent teardown).
"""
