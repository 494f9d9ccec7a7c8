"""Reproducible benchmarks for saf (run as scripts, not collected as tests)."""
