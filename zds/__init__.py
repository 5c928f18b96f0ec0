"""ZDS: the protocol between a node's agent and its tunnel (Istio ambient's
istio.workload.zds, wire-compatible).

- `zds.messages`: the messages and their protobuf codec.
- `zds.wire`: packets on the SOCK_SEQPACKET unix socket, with an fd via SCM_RIGHTS.
- `zds.server`: the agent's end (`ZdsServer`); the tunnel's end is `ztunnel.zds_client`.
"""

from zds.messages import WorkloadInfo, ZdsError

__all__ = ["WorkloadInfo", "ZdsError"]
