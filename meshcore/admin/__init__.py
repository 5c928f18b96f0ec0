"""The admin (node-local) and metrics HTTP servers."""
