"""What tests share, so each piece is written once.

- `aio`: the async runner (`Loop`, `run`; the `aio` fixture in tests/conftest.py) and
  `wait_until` / `wait_until_sync`.
- `fds`: counting and opening file descriptors (`open_fds`, `opened`).
- `mesh`: one default workload and service, and builders that override it
  (`workload(**kw)`, `service(**kw)`, `mesh_state(...)`, policy entries).
- `certs`: the project's CA held in memory (`InProcessCA`, `issue`), and the first
  bytes of a real TLS client (`client_hello`), for handshakes left unfinished.
- `zds`: both ends of the ZDS handshake spoken by hand (`HandTunnel`, `HandAgent`) and a
  recording pod manager (`RecordingPods`).
- `h2`: HTTP/2 frames and CONNECT streams for the sans-IO connection's tests, and
  `Frames`, what a server sent to a client written by hand.

Nothing here needs root. Cleanup of what a test starts lives in fixtures (the `aio`
fixture's `defer`), never at the end of a test body.
"""
