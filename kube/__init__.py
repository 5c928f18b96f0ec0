"""A small asyncio client of the Kubernetes API and a list-then-watch informer.

Shared by the control plane, the node agent's pod source and the local cluster's kubelet.
Objects stay plain JSON dicts: each consumer reads the few fields it needs through its own
strict reader, and no generated model is built for the thousands of pods a node lists.
"""
