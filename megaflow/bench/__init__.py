"""Benchmarks behind `megaflow bench ...`; each appends its results to BENCHMARKS.md."""
