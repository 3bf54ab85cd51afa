"""Shared pytest configuration for the famo_jax test suite."""

# The PyTorch reference and its fixture generator import torch, which is not a
# test dependency; pytest's --doctest-modules would otherwise import them.
collect_ignore_glob = ["reference/*.py"]
