"""Benchmarks: scripts that measure, not tests (BENCHMARKS.md has the results)."""
