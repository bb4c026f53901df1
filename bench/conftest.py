"""Benchmarks are not part of the test run: `pytest bench/ --benchmark-only`."""
