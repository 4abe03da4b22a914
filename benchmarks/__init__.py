"""Benchmarks: scripts that measure and write their figures to benchmarks/results/<name>.json.

Each runs on its own (``python -m benchmarks.<name> [--quick]``) or through ``python -m benchmarks.run_all``,
which also writes BENCHMARKS.md. None asserts a time.
"""
