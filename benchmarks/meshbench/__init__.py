"""The mesh cost benchmark: scenarios (none, ambient, relay, sidecars) measured side by
side in one run; see benchmarks/mesh_bench.py for the command."""
