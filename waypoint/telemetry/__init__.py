"""What the waypoint reports about each request: Envoy's response flags (`flags`), Istio's
request metrics with `reporter="waypoint"` (`metrics`), one JSON access-log line
(`accesslog`), and W3C trace context with OTLP/HTTP export of its spans (`tracing` pure,
`export` the background exporter)."""
