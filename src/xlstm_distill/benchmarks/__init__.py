"""Benchmark helpers: timing and result files (JSON + markdown table + PNG plot)."""
