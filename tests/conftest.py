"""Shared pytest configuration for the famo_jax test suite."""

import os
import tempfile

import jax

# The PyTorch reference and its fixture generator import torch, which is not a
# test dependency; pytest's --doctest-modules would otherwise import them.
collect_ignore_glob = ["reference/*.py"]

# Many tests compile the same programs (a solver for the same k and dtype, built
# by a fresh closure each time). XLA's persistent cache keys on the program, so
# each compiles once per machine, whichever xdist worker gets there first (10%
# off the suite's time from a cold cache). Subprocesses inherit it through the
# environment variable.
_XLA_CACHE = os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), f"famo_jax_test_xla_cache_{os.getuid()}"),
)
jax.config.update("jax_compilation_cache_dir", _XLA_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
