"""Benchmarks that time whole models, variants interleaved in one process: `python -m project.bench.generate`."""
