"""Symmetric positive definite systems, factorised robustly for the Newton-type solvers."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def spd_factor(matrix: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Cholesky factor of ``D^-1/2 M D^-1/2`` (``D = diag(M)``) and ``D^1/2``.

    The diagonal rescaling makes the interior-point systems, whose diagonals span
    many orders of magnitude near convergence, well conditioned enough for a
    Cholesky factorisation. A ridge of a few ulps absorbs the rounding errors that
    make a positive semi-definite block look slightly indefinite; if that is not
    enough (nearly parallel gradients in float32) the factorisation is redone
    with a ridge of ``sqrt(eps)``, which only perturbs the Newton direction.
    """
    k = matrix.shape[-1]
    eps = jnp.finfo(matrix.dtype).eps
    root_diag = jnp.sqrt(jnp.diagonal(matrix))
    scaled = matrix / root_diag[:, None] / root_diag[None, :]
    scaled = 0.5 * (scaled + scaled.T)
    eye = jnp.eye(k, dtype=matrix.dtype)
    chol = jnp.linalg.cholesky(scaled + 16 * eps * eye)
    fallback = jnp.linalg.cholesky(scaled + jnp.sqrt(eps) * eye)
    chol = jnp.where(jnp.all(jnp.isfinite(chol)), chol, fallback)
    return chol, root_diag


def spd_solve(factor: tuple[jax.Array, jax.Array], rhs: jax.Array) -> jax.Array:
    chol, root_diag = factor
    solution = jax.scipy.linalg.cho_solve((chol, True), rhs / root_diag)
    return solution / root_diag
