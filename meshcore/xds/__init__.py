"""xDS for the mesh: Istio's workload discovery over delta ADS.

`wire` (a strict protobuf codec driven by frozen dataclasses), `messages` (the messages of
meshcore/xds/proto, same packages and field numbers as upstream), `convert` (MeshState <->
resources, pure), `delta` (the client's delta-ADS state machine, pure), `grpc` (one gRPC
stream over HTTP/2 + TLS with the `h2` library, so a proxy never loads grpcio) and `client`
(`XdsClient`: subscribe, ACK/NACK, reconnect with backoff, resume).
"""
