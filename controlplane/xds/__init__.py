"""The discovery server: delta ADS (`server.XdsServer`, per-stream `session.DeltaSession`)
over grpcio, TLS with a certificate from the mesh CA (`tls`)."""
