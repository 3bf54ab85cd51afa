"""Benchmarks of famo_jax: run each from the repository root as ``python -m benchmarks.<name>``."""
