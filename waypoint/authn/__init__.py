"""RequestAuthentication (JWT) at the waypoint: the resource parsed strictly (`parse`, pure, no
JWT library), and the per-request check (`verify`: PyJWT, keys from inline JWKS or a
`file://` jwksUri, never the network). A request with an invalid token gets 401 `Jwt
verification fails`; one without a token passes with no request principal."""
