"""Benchmarks B1-B8 (see docs/benchmarks.md): ratios measured side by side in one process."""
