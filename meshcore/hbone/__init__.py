"""HBONE: TCP carried in HTTP/2 CONNECT streams over mutual TLS.

`h2frames` and `conn` are sans-IO (bytes in, events and bytes out); `transport` is the one
asyncio shell around them; `pool` shares client connections between streams.
"""
