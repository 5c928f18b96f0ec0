"""Authorization: Istio AuthorizationPolicy and PeerAuthentication, and the one inbound decision."""
