"""Benchmarks for dotresize (run with ``python -m benchmarks.<name>``)."""
