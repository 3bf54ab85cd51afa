r"""The Euclidean projection onto the probability simplex, in pure JAX.

SDMGrad and MoDo update their task weights by a projected gradient step,
:math:`w \leftarrow \Pi_{\Delta}(w - \eta\, d)`. Their reference code
projects on the host (SDMGrad: NumPy in float64; MoDo: a Python loop over the
sorted entries); here the same projection is a sort and a cumulative sum, so it
runs under ``jit`` and ``vmap``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def project_onto_simplex(values: jax.Array) -> jax.Array:
    r"""The point of the probability simplex closest to ``values`` (a ``(k,)`` vector).

    :math:`\Pi_\Delta(y) = \max(y - \theta, 0)` with the threshold
    :math:`\theta = (\sum_{i \le \rho} u_i - 1) / \rho` for the entries
    :math:`u` sorted in decreasing order and :math:`\rho` the largest index with
    :math:`u_\rho > (\sum_{i \le \rho} u_i - 1) / \rho` (Held, Wolfe and
    Crowder 1974; Duchi et al. 2008), the same threshold as the peers' loops.

    The projection is invariant to adding a constant to every entry, so the
    entries are shifted by their maximum first: for entries of size
    :math:`10^{28}` (a projected step on huge gradients), the unshifted
    threshold loses the :math:`-1` to rounding and the result leaves the
    simplex; shifted, it is the nearest vertex, as in exact arithmetic.

    Args:
      values: ``(k,)`` floating vector.

    Returns:
      ``(k,)`` non-negative weights summing to one (NaN if ``values`` is not
      finite).

    Example:
      >>> import jax.numpy as jnp
      >>> from famo_jax._solvers import project_onto_simplex
      >>> project_onto_simplex(jnp.array([0.5, 0.9, -1.0]))
      Array([0.3, 0.7, 0. ], dtype=float32)
    """
    values = jnp.asarray(values)
    shifted = values - jnp.max(values)
    descending = -jnp.sort(-shifted)
    cumulative = jnp.cumsum(descending) - 1.0
    counts = jnp.arange(1, values.shape[0] + 1, dtype=values.dtype)
    # The entries that stay positive are a prefix of the sorted order; the first
    # entry always does (u_1 > u_1 - 1), so the count is at least one.
    positive = descending * counts > cumulative
    count = jnp.sum(positive)
    threshold = cumulative[count - 1] / count.astype(values.dtype)
    return jnp.maximum(shifted - threshold, 0.0)
