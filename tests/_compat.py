"""Test helpers that differ between the supported JAX versions (see tools/lower_bounds)."""

import jax

# A context manager turning float64 on and off: jax.enable_x64 since JAX 0.7,
# jax.experimental.enable_x64 before (removed after).
if hasattr(jax, "enable_x64"):
    enable_x64 = jax.enable_x64
else:  # JAX < 0.7
    from jax.experimental import enable_x64  # noqa: F401
