"""Metrics, the Prometheus text format, the access log, structured logging and the table of
open connections."""
