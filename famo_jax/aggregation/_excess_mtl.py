"""ExcessMTL: robust multi-task learning with excess risks (He, Zhou, Zhao and Hsu, ICML 2024)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from famo_jax import _checks, _numerics
from famo_jax.aggregation import _base, _stacked


class ExcessMTLState(NamedTuple):
    r"""State of :func:`excess_mtl`.

    Attributes:
      squared_grad_sum: the running sums :math:`S_i` of the squared task
        gradients (AdaGrad's accumulator; LibMTL's ``grad_sum``): a pytree with
        the structure of the parameters given to ``init``, every leaf of shape
        ``(num_tasks, *param.shape)`` in the parameter's dtype promoted to at
        least float32, starting at zero. :math:`k` times the size of the parameters.
      loss_weights: ``(num_tasks,)`` float32: the task weights :math:`\alpha`,
        normalised to sum to ``num_tasks`` as in LibMTL (``loss_weight``),
        starting at ones.
      initial_excess: ``(num_tasks,)`` float32: each task's first positive
        excess-risk estimate :math:`\hat E_i^{(0)}` (LibMTL's ``initial_w``),
        by which later estimates are divided; 0 until a task has one.
      num_updates: ``()`` int32: applied updates.
      num_skipped: ``()`` int32: updates with non-finite task gradients, which
        left the state unchanged.
    """

    squared_grad_sum: Any
    loss_weights: jax.Array
    initial_excess: jax.Array
    num_updates: jax.Array
    num_skipped: jax.Array


def excess_mtl(
    num_tasks: int, robust_step_size: float = 1e-2
) -> optax.GradientTransformationExtraArgs:
    r"""ExcessMTL: weights that grow with each task's estimated excess risk.

    ExcessMTL estimates how far each task is from its optimum, its excess
    risk, by a quadratic model with AdaGrad's diagonal curvature estimate,
    and raises the weights of the tasks furthest from theirs by an
    exponentiated-gradient step:

    .. math::
        S_i &\leftarrow S_i + g_i \odot g_i, \qquad
        \hat E_i = \Big\langle g_i, \frac{g_i}{\sqrt{S_i + 10^{-7}}}\Big\rangle, \\
        \alpha_i &\leftarrow k\, \frac{\alpha_i \exp(\eta\, \hat E_i / \hat E_i^{(0)})}
            {\sum_j \alpha_j \exp(\eta\, \hat E_j / \hat E_j^{(0)})}, \qquad
        d = \frac1k \sum_i \alpha_i g_i ,

    where :math:`\hat E_i^{(0)}` is task :math:`i`'s first estimate (the
    paper's scale processing, which makes tasks of different loss scales
    comparable). The weights are updated before they are used.

    This follows LibMTL's ``ExcessMTL``, which is the authors' code
    (``uiuctml/ExcessMTL``, identical): weights starting at ones and
    normalised to sum to :math:`k`, the first update setting
    :math:`\hat E^{(0)}` without moving the weights, :math:`\eta = 10^{-2}`
    (``robust_step_size``), and the estimate's :math:`10^{-7}` (which makes
    it depend on the gradients' scale where :math:`S_i` is below ~1e-7).
    Differences: the exponentiated step is taken in log space (the same
    weights; the reference's product overflows to inf, then NaN, once
    :math:`\eta \hat E / \hat E^{(0)}` exceeds ~88); and a task whose first
    estimate is zero (a zero gradient at the first update) keeps weight
    factor 1 until its first positive estimate becomes its
    :math:`\hat E^{(0)}` (the reference divides by zero and its weights are NaN
    from then on). TorchJD 0.18 differs from both: it moves the weights at the
    first call (by the raw estimate), divides by :math:`\hat E^{(0)} +
    10^{-7}`, offers a warm-up, and defaults to :math:`\eta = 1`.

    Inputs: ``updates`` (stacked task gradients). ExcessMTL needs no losses:
    the reference's loss, :math:`\sum_i \alpha_i \ell_i`, only serves to take
    the weighted sum of the task gradients. It is not Gram-based: its state
    holds the squared-gradient sums, :math:`O(k m)` memory for :math:`m`
    parameters, and ``init`` needs the parameters (or a pytree of their shapes).

    Scale convention: the output is :math:`\frac1k \sum_i \alpha_i g_i`, on the
    scale of the *mean* of the task gradients (equal task gradients give
    exactly that gradient; for ``k = 1``, the task gradient). LibMTL's is
    :math:`\sum_i \alpha_i g_i` (sum convention):
    ``optax.chain(famo_jax.excess_mtl(k), optax.scale(k))``. The reference
    weights every parameter's gradient (task heads included); with
    :func:`famo_jax.shared_trunk` the weights act on the trunk only.

    Non-finite task gradients: the output is NaN (``optax.apply_if_finite``
    then skips the step) and the state is kept (counted in ``num_skipped``).

    Cost: :math:`O(k m)` time and :math:`O(k m)` state.

    Args:
      num_tasks: the number of tasks :math:`k`.
      robust_step_size: the step size :math:`\eta \ge 0` of the weights.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update(updates, state,
      params=None)`` takes per-task gradients stacked on a leading axis of size
      ``k`` and returns one gradient pytree; state :class:`ExcessMTLState`.

    Example:
      >>> import jax.numpy as jnp
      >>> import famo_jax
      >>> tx = famo_jax.excess_mtl(num_tasks=2, robust_step_size=1.0)
      >>> state = tx.init(jnp.zeros(2))
      >>> out, state = tx.update(jnp.array([[1.0, 0.0], [0.0, 2.0]]), state)
      >>> state.loss_weights  # the first update sets the reference estimates
      Array([1., 1.], dtype=float32)
      >>> out, state = tx.update(jnp.array([[1.0, 0.0], [0.0, 0.2]]), state)
      >>> [round(x, 4) for x in state.loss_weights.tolist()]  # task 2 is nearer its optimum
      [1.3351, 0.6649]

    References:
      He, Zhou, Zhao and Hsu, *Robust Multi-Task Learning with Excess Risks*,
      ICML 2024. https://proceedings.mlr.press/v235/he24n.html (code:
      https://github.com/uiuctml/ExcessMTL; LibMTL:
      https://github.com/median-research-group/LibMTL/blob/main/LibMTL/weighting/ExcessMTL.py)
    """
    num_tasks = _checks.check_num_tasks(num_tasks)
    robust_step_size = float(_checks.check_nonnegative("robust_step_size", robust_step_size))

    def init_fn(params):
        zero = jnp.zeros((), jnp.int32)
        return ExcessMTLState(
            squared_grad_sum=_stacked.zeros_like_stacked(params, num_tasks),
            loss_weights=jnp.ones((num_tasks,), jnp.float32),
            initial_excess=jnp.zeros((num_tasks,), jnp.float32),
            num_updates=zero,
            num_skipped=zero,
        )

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        _stacked.reject_implicit(
            updates, "excess_mtl", "accumulates every task gradient's squares in its state"
        )
        k = _base.num_tasks_of(updates)
        _base.check_built_num_tasks(k, num_tasks, "excess_mtl")
        _stacked.check_like_state(updates, state.squared_grad_sum, "excess_mtl")
        dtype = _base.compute_dtype(updates)
        squared_sum = jax.tree.map(
            lambda s, g: s + jnp.square(g.astype(s.dtype)), state.squared_grad_sum, updates
        )
        excess = jnp.zeros((k,), dtype)
        for s, g in zip(jax.tree.leaves(squared_sum), jax.tree.leaves(updates), strict=True):
            g = g.astype(dtype)
            excess = excess + jnp.sum(
                (g * g / jnp.sqrt(s.astype(dtype) + 1e-7)).reshape(k, -1), axis=1
            )
        initial = state.initial_excess.astype(dtype)
        has_initial = initial > 0
        ratio = jnp.where(has_initial, excess / jnp.where(has_initial, initial, 1.0), 0.0)
        log_weights = jnp.log(state.loss_weights.astype(dtype)) + robust_step_size * ratio
        loss_weights = k * jax.nn.softmax(log_weights)
        valid = jnp.all(jnp.isfinite(excess)) & jnp.all(jnp.isfinite(loss_weights))
        out = _base.combine(updates, jnp.where(valid, loss_weights / k, jnp.nan))
        num_updates, num_skipped = _numerics.counters_after(
            valid, state.num_updates, state.num_skipped
        )
        new_state = ExcessMTLState(
            squared_grad_sum=_numerics.keep_if_valid(valid, squared_sum, state.squared_grad_sum),
            loss_weights=jnp.where(valid, loss_weights, state.loss_weights).astype(
                state.loss_weights.dtype
            ),
            initial_excess=jnp.where(valid & ~has_initial, excess, state.initial_excess).astype(
                state.initial_excess.dtype
            ),
            num_updates=num_updates,
            num_skipped=num_skipped,
        )
        return out, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
