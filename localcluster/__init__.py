"""A Kubernetes-like cluster on one Linux machine, built entirely inside network namespaces.

A cluster netns holds the bridge; each node is a netns on that bridge; each pod is a netns
behind its node. Nothing is routed from the root namespace. `spec` parses the cluster file,
`network` builds and removes the namespaces, `up`/`down` orchestrate the whole cluster.
"""
