"""L7 AuthorizationPolicy at the waypoint: which policies apply to a request (`scope`), their
parsed form (`model`, `parse`, `paths`), and the one decision per request (`decide`:
`authorize_request(policies, facts) -> L7Verdict`). Pure: no I/O; the proxy calls it per
request and answers a denial with `denied_response()` (403 `RBAC: access denied`)."""
