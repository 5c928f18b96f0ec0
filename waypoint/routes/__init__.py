"""Routing for the waypoint, pure: which backend a request goes to, and how.

Resource documents (HTTPRoute, GRPCRoute, VirtualService, DestinationRule, ReferenceGrant)
become frozen domain values once, at the edge (`gateway`, `virtualservice`,
`destinationrule`, all reading through `meshcore.reader`); `RouteTable.build` indexes them
by service and port, and `RouteTable.select` turns plain request facts into a frozen
`RouteDecision` (forward to weighted backends, redirect, or answer directly). Retries,
faults and the connection-pool gate are pure decisions too: time and random numbers are
arguments, never read here. Nothing in this package touches a socket, a clock or the loop.
"""
