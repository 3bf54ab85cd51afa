"""IMTL-G: impartial multi-task learning, gradient part (Liu et al., ICLR 2021)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from famo_jax import _numerics, _solvers
from famo_jax.aggregation import _base


def imtl_g_weights(gram: jax.Array) -> jax.Array:
    r"""IMTL-G's weights :math:`\alpha` (summing to one) from the Gram matrix.

    Solves, in the coordinates :math:`\beta_i = \alpha_i \|g_i\|` of the unit
    vectors :math:`u_i = g_i / \|g_i\|` (whose Gram matrix is the cosine matrix
    :math:`C`, well scaled whatever the gradient norms), the linear system

    .. math::
        (C\beta)_i - \overline{(C\beta)} = 0 \ \ (i \text{ active}), \qquad
        \sum_i \beta_i / \|g_i\| = 1 ,

    whose unique solution, when there is one, is the authors' closed form
    :math:`\alpha_{2:k} = g_1 U^\top (D U^\top)^{-1}`,
    :math:`\alpha_1 = 1 - \sum_{i\ge2}\alpha_i`. It is solved by the
    pseudo-inverse (minimum-norm least squares), which also covers the
    singular cases.

    Args:
      gram: ``(k, k)`` Gram matrix.

    Returns:
      ``(k,)`` weights summing to one (zero for zero gradients); NaN if the
      Gram matrix is not finite.

    Example:
      >>> import jax.numpy as jnp
      >>> from famo_jax.aggregation import imtl_g_weights
      >>> gram = jnp.array([[1.0, 0.0], [0.0, 9.0]])  # orthogonal, norms 1 and 3
      >>> [round(w, 4) for w in imtl_g_weights(gram).tolist()]  # equal projections 0.75
      [0.75, 0.25]
    """
    gram, k = _solvers.check_gram(gram)
    safe = _numerics.finite_or_identity(gram)
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(safe), 0.0))
    active = norms > 0
    inv_norms = jnp.where(active, 1.0 / jnp.where(active, norms, 1.0), 0.0)
    cosines = safe * inv_norms[:, None] * inv_norms[None, :]
    mask = active.astype(safe.dtype)
    num_active = jnp.maximum(jnp.sum(mask), 1.0)
    centring = jnp.diag(mask) - jnp.outer(mask, mask) / num_active
    # The constraint row is normalised to unit length like the cosine rows.
    row_norm = jnp.sqrt(jnp.sum(inv_norms**2))
    row_scale = jnp.where(row_norm > 0, row_norm, 1.0)
    system = jnp.concatenate([centring @ cosines, (inv_norms / row_scale)[None, :]], axis=0)
    rhs = jnp.zeros((k + 1,), safe.dtype).at[k].set(1.0 / row_scale)
    beta = jnp.linalg.pinv(system) @ rhs
    alpha = beta * inv_norms
    total = jnp.sum(alpha)
    usable = jnp.any(active) & jnp.isfinite(total) & (total != 0)
    alpha = jnp.where(usable, alpha / jnp.where(usable, total, 1.0), 1.0 / k)
    return _numerics.nan_unless_finite(gram, alpha)


def imtl_g() -> optax.GradientTransformationExtraArgs:
    r"""IMTL-G: the combination with equal projections on every task's direction.

    IMTL-G picks weights :math:`\alpha` with :math:`\sum_i \alpha_i = 1` such
    that :math:`g = \sum_i \alpha_i g_i` has the same projection on every unit
    task direction :math:`u_i = g_i / \|g_i\|`:
    :math:`\langle g, u_1\rangle = \dots = \langle g, u_k\rangle`. The authors'
    closed form, with :math:`D = [g_1 - g_i]_{i \ge 2}` and :math:`U = [u_1 -
    u_i]_{i \ge 2}`, is

    .. math::
        \alpha_{2:k} = g_1 U^\top (D U^\top)^{-1}, \qquad
        \alpha_1 = 1 - \sum_{i \ge 2} \alpha_i .

    Here the same system is solved symmetrically in the tasks from the Gram
    matrix (see :func:`famo_jax.aggregation.imtl_g_weights`), so the result does not
    depend on which task comes first and the memory stays that of the input.
    When the system has a unique solution the two agree. Deviations, all in
    cases where the authors' code is undefined or arbitrary: when it is
    singular (for example two parallel gradients), the minimum-norm solution in
    unit-vector coordinates is used instead of the authors' ``1e-8`` ridge
    (which puts all the weight on task 1), so equal task gradients give their
    mean; a task with a zero gradient (for which the authors' ``g / |g|`` is NaN)
    is left out of the equal-projection conditions and gets weight 0; if all
    gradients are zero the output is zero.

    Scale convention: the weights sum to one, so the output is on the scale of
    the *mean* of the task gradients. The authors' trainer uses these weights
    as they are (their sum is one there too, unlike the other aggregators'
    ``k``), so no rescaling reproduces it; it clips the shared gradient to norm
    1. For ``k = 1`` the output is the task gradient.

    Non-finite task gradients: the output is NaN (``optax.apply_if_finite``
    then skips the step); there is no state.

    Cost: :math:`O(k^2 m)` time and :math:`O(k^2)` extra memory for the Gram
    matrix of :math:`m` parameters, :math:`O(k m)` for the weighted sum and an
    :math:`O(k^3)` pseudo-inverse.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update(updates, state,
      params=None)`` takes per-task gradients stacked on a leading axis of
      size ``k`` and returns one gradient pytree; state ``optax.EmptyState()``.

    Example:
      >>> import jax.numpy as jnp
      >>> import famo_jax
      >>> task_grads = jnp.array([[1.0, 0.0], [0.0, 3.0]])
      >>> tx = famo_jax.imtl_g()
      >>> g, _ = tx.update(task_grads, tx.init(None))
      >>> jnp.round(g, 4)  # equal projections (0.75) on both task directions
      Array([0.75, 0.75], dtype=float32)

    References:
      Liu, Li, Kuang, Xue, Chen, Yang, Liao and Zhang, *Towards Impartial
      Multi-task Learning*, ICLR 2021. https://openreview.net/forum?id=IMPnRXEWpvr
    """
    return _base.gram_weighted(_base.stateless(imtl_g_weights))
