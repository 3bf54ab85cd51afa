"""MoDo: multi-objective gradient with double sampling (Chen, Fernando, Ying and Chen, 2023)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from famo_jax import _checks, _numerics, _solvers
from famo_jax.aggregation import _base, _stacked


class MoDoState(NamedTuple):
    r"""State of :func:`modo`.

    Attributes:
      weights: ``(num_tasks,)`` float32: the task weights :math:`\lambda` on
        the simplex (LibMTL's ``self.lambd``), starting at :math:`1/k`.
      num_updates: ``()`` int32: updates that moved the weights.
      num_skipped: ``()`` int32: updates with a non-finite input (task
        gradients, their Gram or cross-Gram matrix), which kept the weights.
    """

    weights: jax.Array
    num_updates: jax.Array
    num_skipped: jax.Array


def modo_weights(
    cross_gram: jax.Array, weights: jax.Array, *, gamma: float = 1e-3, rho: float = 0.1
) -> jax.Array:
    r"""MoDo's weight update, one projected gradient step on the simplex.

    :math:`\lambda \leftarrow \Pi_\Delta(\lambda - \gamma (A + \rho I)\lambda)`.

    Args:
      cross_gram: ``(k, k)`` matrix :math:`A = G_1 G_2^\top` of two independent
        batches' task gradients (or the Gram matrix of one batch).
      weights: ``(k,)`` current weights :math:`\lambda` on the simplex.
      gamma: step size :math:`\gamma`.
      rho: :math:`\ell_2` regularisation :math:`\rho \ge 0`.

    Returns:
      The ``(k,)`` next weights (NaN if ``cross_gram`` is not finite).

    Example:
      >>> import jax.numpy as jnp
      >>> from famo_jax.aggregation import modo_weights
      >>> gram = jnp.array([[1.0, 0.0], [0.0, 4.0]])
      >>> [round(x, 4) for x in modo_weights(gram, jnp.full(2, 0.5), gamma=0.1).tolist()]
      [0.575, 0.425]
    """
    cross_gram = jnp.asarray(cross_gram)
    k = cross_gram.shape[0]
    if cross_gram.shape != (k, k):
        raise ValueError(f"cross_gram must be a square (k, k) matrix, got {cross_gram.shape}.")
    dtype = _numerics.at_least_float32(cross_gram.dtype)
    cross_gram = cross_gram.astype(dtype)
    weights = jnp.asarray(weights, dtype)
    return _solvers.project_onto_simplex(weights - gamma * (cross_gram @ weights + rho * weights))


def modo(
    num_tasks: int, gamma: float = 1e-3, rho: float = 0.1
) -> optax.GradientTransformationExtraArgs:
    r"""MoDo: weights by a projected step on a doubly sampled Gram matrix.

    MoDo moves the task weights :math:`\lambda \in \Delta_k` by one projected
    gradient step on :math:`\tfrac12\|G^\top\lambda\|^2 + \tfrac\rho2
    \|\lambda\|^2` per update, and combines the task gradients with the new
    weights:

    .. math::
        \lambda \leftarrow \Pi_\Delta\big(\lambda - \gamma\,(G_1 G_2^\top +
        \rho I)\,\lambda\big), \qquad d = G_3^\top \lambda ,

    where :math:`G_1, G_2` are two independent batches' task gradients (the
    double sampling that makes :math:`G_1 G_2^\top` an unbiased estimate of
    the Gram matrix) and :math:`G_3` a third batch's (LibMTL and the authors'
    code with ``three_grads``; the paper's Algorithm also allows :math:`G_3`
    to be the mean of :math:`G_1` and :math:`G_2`).

    Inputs (the closest honest counterpart of the peers' three backward passes):

    - ``updates``: the task gradients :math:`G_3` that are combined;
    - ``weight_batches=(grads_1, grads_2)`` (an extra argument, forwarded by
      ``optax.chain``): two further independent batches' task gradients,
      stacked like ``updates`` (inside :func:`famo_jax.shared_trunk`, give them
      for the full parameters: the leaves outside the trunk are dropped). For
      the paper's two-batch variant, pass the mean of the two as ``updates``.
    - Without ``weight_batches`` (the single-batch fallback), :math:`A` is the
      Gram matrix of ``updates``: deterministic MoDo (MGDA-like weights by
      one projected step per update), without the double sampling's
      unbiasedness.

    This follows LibMTL's ``MoDo`` (from the authors' code): :math:`\lambda`
    starts at :math:`1/k`, is updated *before* it is used, the Gram matrix is
    not normalised, and the defaults are :math:`\gamma = 10^{-3}`, :math:`\rho =
    0.1`. TorchJD 0.18's ``MoDoWeighting`` computes the same update with the
    default :math:`\gamma = 0.1` (``gamma=0.1`` reproduces it). The simplex
    projection is the peers' algorithm (a threshold on the sorted entries),
    evaluated after shifting the entries by their maximum (the same result;
    it stays on the simplex for huge gradients, where the peers' loses the
    threshold to rounding). The task heads: LibMTL gives them the mean of the
    three batches' head gradients; :func:`famo_jax.shared_trunk` gives them the
    ``updates`` batch's.

    Scale convention: the output :math:`G_3^\top \lambda` has weights on the
    simplex, the scale of the *mean* of the task gradients (equal task
    gradients give exactly that gradient; for ``k = 1``, the task gradient),
    as in LibMTL and TorchJD.

    Non-finite inputs: the output is NaN (``optax.apply_if_finite`` then skips
    the step), the weights are kept and the update is counted in ``num_skipped``.

    Cost: :math:`O(k^2 m)` for the (cross-)Gram matrix of :math:`m`
    parameters and :math:`O(k m)` for the weighted sum; with
    ``weight_batches``, two more backward passes per step (by the caller).

    Args:
      num_tasks: the number of tasks :math:`k` (the state holds the weights).
      gamma: step size :math:`\gamma > 0` of the weights (``MoDo_gamma``).
      rho: :math:`\ell_2` regularisation :math:`\rho \ge 0` (``MoDo_rho``).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update(updates, state,
      params=None, *, weight_batches=None)`` takes per-task gradients stacked on
      a leading axis of size ``k`` (or an
      :class:`~famo_jax.aggregation.ImplicitTaskGradients`) and returns one
      gradient pytree; state :class:`MoDoState`.

    Example:
      >>> import jax.numpy as jnp
      >>> import famo_jax
      >>> tx = famo_jax.modo(num_tasks=2, gamma=0.1)
      >>> grads = jnp.array([[1.0, 0.0], [0.0, 2.0]])
      >>> out, state = tx.update(grads, tx.init(None))  # single-batch fallback
      >>> [round(x, 4) for x in state.weights.tolist()]
      [0.575, 0.425]
      >>> [round(x, 4) for x in out.tolist()]
      [0.575, 0.85]

    References:
      Chen, Fernando, Ying and Chen, *Three-Way Trade-Off in Multi-Objective
      Learning: Optimization, Generalization and Conflict-Avoidance*, NeurIPS
      2023 (JMLR 2024). https://arxiv.org/abs/2305.20057 (code:
      https://github.com/heshandevaka/Trade-Off-MOL; LibMTL:
      https://github.com/median-research-group/LibMTL/blob/main/LibMTL/weighting/MoDo.py)
    """
    num_tasks = _checks.check_num_tasks(num_tasks)
    gamma = float(_checks.check_nonnegative("gamma", gamma))
    if gamma == 0:
        raise ValueError("gamma must be positive, got 0.")
    rho = float(_checks.check_nonnegative("rho", rho))

    def init_fn(params):
        del params
        zero = jnp.zeros((), jnp.int32)
        return MoDoState(
            weights=jnp.full((num_tasks,), 1.0 / num_tasks, jnp.float32),
            num_updates=zero,
            num_skipped=zero,
        )

    def update_fn(updates, state, params=None, *, weight_batches: Any = None, **extra_args):
        del params, extra_args
        k = _base.num_tasks_of(updates)
        _base.check_built_num_tasks(k, num_tasks, "modo")
        dtype = _base.compute_dtype(updates)
        matrix = _stacked.weight_matrix(updates, weight_batches, dtype, "modo")
        valid = jnp.all(jnp.isfinite(matrix))
        safe = jnp.where(valid, matrix, jnp.eye(k, dtype=dtype))
        weights = modo_weights(safe, state.weights.astype(dtype), gamma=gamma, rho=rho)
        out = _base.combine(updates, jnp.where(valid, weights, jnp.nan))
        valid = valid & _stacked.tree_all_finite(out)
        num_updates, num_skipped = _numerics.counters_after(
            valid, state.num_updates, state.num_skipped
        )
        new_state = MoDoState(
            weights=jnp.where(valid, weights, state.weights).astype(state.weights.dtype),
            num_updates=num_updates,
            num_skipped=num_skipped,
        )
        return out, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
