"""The waypoint: the L7 proxy a namespace, service or pod opts into (`python -m waypoint`).

It terminates HBONE with the shared core (`meshcore.hbone`), reads the original destination
from the CONNECT authority, speaks the port's protocol (HTTP/1.1, HTTP/2, gRPC, or TCP passed
through), routes each request (`routes`, pure), applies its policies (authorization, retries,
timeouts, faults, load balancing, outlier detection) and sends it on over HBONE to the chosen
endpoint with its own identity. It imports the core, never the tunnel.
"""
