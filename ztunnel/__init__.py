"""The per-node L4 tunnel.

One process per node. For every enrolled pod on its node it opens the capture listeners
(15001 outbound, 15006 inbound plaintext, 15008 inbound HBONE) inside that pod's network
namespace, and carries the pod's TCP connections to other pods in mutual-TLS HBONE tunnels
(HTTP/2 CONNECT) with SPIFFE identities.
"""
