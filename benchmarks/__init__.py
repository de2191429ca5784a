"""Benchmarks of fusionops: pytest-benchmark suites and ``python -m benchmarks.report``."""
