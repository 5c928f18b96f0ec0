"""The soak and churn benchmark's parts (benchmarks/soak.py): the load generator, the pure
analysis and the report."""
