"""The mesh's well-known numbers and names, each written once (protocols.md).

Ports and the socket mark are Istio ambient's, so the parts interoperate with upstream's.
Every module that needs one imports it from here; a setting that can be changed at run
time (the tunnel's environment, a CLI flag) takes its default from here too.
"""

from __future__ import annotations

from typing import Final

# Inside every enrolled pod's network namespace (the tunnel's listeners).
OUTBOUND_PORT: Final = 15001  # captured outbound TCP
INBOUND_PLAIN_PORT: Final = 15006  # captured inbound plaintext (clients outside the mesh)
HBONE_PORT: Final = 15008  # inbound HBONE (mTLS HTTP/2 CONNECT); also a waypoint's listener
# A connection to any of them through the capture is a self-call and is refused.
TUNNEL_PORTS: Final = frozenset({OUTBOUND_PORT, INBOUND_PLAIN_PORT, HBONE_PORT})

# In the proxy's own network namespace.
ADMIN_PORT: Final = 15000  # config dump, connections, explain, logging; 127.0.0.1 only
METRICS_PORT: Final = 15020  # Prometheus text
READINESS_PORT: Final = 15021  # /healthz/ready

# SO_MARK on every socket the tunnel opens, so the pods' capture rules let it pass.
TUNNEL_MARK: Final = 0x539

TRUST_DOMAIN: Final = "cluster.local"
# What a pod runs as, and where a resource lives, when nothing says otherwise (Kubernetes').
SERVICE_ACCOUNT: Final = "default"
NAMESPACE: Final = "default"
# Policies here without a selector apply mesh-wide; istio-cni never captures its pods.
ROOT_NAMESPACE: Final = "istio-system"

# The node agent's mark on each pod whose capture it installed (istio-cni's), and its value;
# the control plane's admission check lets the agent change this annotation and nothing else.
REDIRECTION_ANNOTATION: Final = "ambient.istio.io/redirection"
REDIRECTION_ENABLED: Final = "enabled"
