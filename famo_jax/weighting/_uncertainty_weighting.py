"""Uncertainty weighting (UW, Kendall, Gal and Cipolla 2018)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from famo_jax import _checks, _numerics
from famo_jax.weighting import _base


class UncertaintyWeightingState(NamedTuple):
    """State of :func:`uncertainty_weighting`.

    Attributes:
      log_vars: ``(num_tasks,)`` float32: the learned log-variances :math:`s`
        (the reference's ``logsigma``); the task weights are ``exp(-s) / k``.
        They start at zero.
      opt_state: the state of the log-variance optimizer (an optax state pytree).
      num_updates: ``()`` int32: optimizer steps applied to ``log_vars``.
      num_skipped: ``()`` int32: updates skipped because a loss or the new
        log-variances were not finite (``log_vars`` and ``opt_state`` are then
        left unchanged).
    """

    log_vars: jax.Array
    opt_state: optax.OptState
    num_updates: jax.Array
    num_skipped: jax.Array


def uncertainty_weighting(
    num_tasks: int,
    learning_rate: optax.ScalarOrSchedule = 0.025,
    optimizer: optax.GradientTransformation | None = None,
) -> _base.LossWeighting:
    r"""Uncertainty weighting (UW): learned homoscedastic log-variances.

    Each task has a log-variance :math:`s_i` (starting at 0) and the model is
    trained on

    .. math::
        L(\ell, s) = \frac{1}{k} \sum_{i=1}^{k} \big(e^{-s_i} \ell_i + s_i\big),
        \qquad w_i = \frac{e^{-s_i}}{k},

    while :math:`s` descends the same objective: ``update(prev_losses,
    curr_losses, state)`` takes one step of its own optax optimizer along

    .. math::
        \nabla_s L(\ell^{\rm prev}, s) = \frac{1}{k}\big(1 - e^{-s} \odot
        \ell^{\rm prev}\big),

    whose fixed point is :math:`s_i = \log \ell_i`. ``prev_losses`` are the
    losses the model step was computed from, so this is the reference's joint
    step (the log-variances' gradient taken in the same backward pass as the
    model's); ``curr_losses`` is not used (only checked for shape).

    Conventions and deviations: the reference (Nash-MTL and FAMO codebases)
    uses :math:`\sum_i \tfrac12 (e^{-s_i}\ell_i + s_i)`, which is
    :math:`k/2` times the objective above. The mean convention makes UW start
    as :func:`~famo_jax.linear_scalarization` (weights :math:`1/k`); the
    log-variances' gradient is scaled by the same constant, to which Adam is
    invariant (up to its ``eps``), so with the default optimizer the
    log-variances follow the reference's trajectory. The reference trains
    ``logsigma`` in the model's ``torch.optim.Adam`` with a separate learning
    rate of 0.025 (``--method-params-lr``); the default here is that Adam
    (betas 0.9/0.999, eps 1e-8, no decay) without the model's ``StepLR``
    schedule (pass a schedule as ``learning_rate`` for one). ``update`` skips
    steps with non-finite losses (``num_skipped``). UW assumes positive losses:
    for a loss that is zero or negative the objective has no minimum in
    :math:`s_i`, which then decreases at every step and the task's weight grows
    without bound.

    Args:
      num_tasks: number of tasks :math:`k` (a positive int).
      learning_rate: the log-variances' learning rate (a float or an optax
        schedule). Used only when ``optimizer`` is None.
      optimizer: the optax transformation that updates the log-variances;
        default ``optax.adam(learning_rate)``.

    Returns:
      A :class:`~famo_jax.LossWeighting` with ``init() -> UncertaintyWeightingState``.

    Example:
      >>> import jax.numpy as jnp
      >>> import famo_jax
      >>> uw = famo_jax.uncertainty_weighting(2, learning_rate=0.1)
      >>> state = uw.init()
      >>> losses = jnp.array([0.1, 10.0])
      >>> for _ in range(200):
      ...   state = uw.update(losses, losses, state)
      >>> jnp.round(jnp.exp(state.log_vars), 1)  # s_i -> log(loss_i)
      Array([ 0.1, 10. ], dtype=float32)

    References:
      Kendall, Gal and Cipolla, *Multi-Task Learning Using Uncertainty to Weigh
      Losses for Scene Geometry and Semantics*, CVPR 2018.
      https://arxiv.org/abs/1705.07115
    """
    num_tasks = _checks.check_num_tasks(num_tasks)
    learning_rate = _checks.check_nonnegative("learning_rate", learning_rate, allow_callable=True)
    optimizer = _checks.check_optimizer(optimizer, lambda: optax.adam(learning_rate))

    def init() -> UncertaintyWeightingState:
        log_vars = jnp.zeros((num_tasks,), jnp.float32)
        return UncertaintyWeightingState(
            log_vars=log_vars,
            opt_state=optimizer.init(log_vars),
            num_updates=jnp.zeros((), jnp.int32),
            num_skipped=jnp.zeros((), jnp.int32),
        )

    def objective(losses: jax.Array, log_vars: jax.Array) -> jax.Array:
        return jnp.mean(jnp.exp(-log_vars) * losses + log_vars)

    def weigh(losses: ArrayLike, state: UncertaintyWeightingState) -> jax.Array:
        losses = _checks.check_losses("losses", losses, num_tasks)
        dtype = jnp.promote_types(losses.dtype, state.log_vars.dtype)
        log_vars = jax.lax.stop_gradient(state.log_vars).astype(dtype)
        value = objective(losses.astype(dtype), log_vars)
        return _numerics.nan_unless(jnp.all(jnp.isfinite(losses)), value).astype(losses.dtype)

    def update(
        prev_losses: ArrayLike, curr_losses: ArrayLike, state: UncertaintyWeightingState
    ) -> UncertaintyWeightingState:
        prev_losses = _checks.check_losses("prev_losses", prev_losses, num_tasks)
        _checks.check_losses("curr_losses", curr_losses, num_tasks)
        dtype = jnp.promote_types(prev_losses.dtype, state.log_vars.dtype)
        losses = prev_losses.astype(dtype)
        log_vars_grad = jax.grad(objective, argnums=1)(losses, state.log_vars.astype(dtype))
        log_vars_grad = log_vars_grad.astype(state.log_vars.dtype)
        step = _numerics.guarded_optimizer_step(
            optimizer,
            log_vars_grad,
            state.log_vars,
            state.opt_state,
            jnp.all(jnp.isfinite(losses)),
            state.num_updates,
            state.num_skipped,
        )
        return UncertaintyWeightingState(*step)

    return _base.LossWeighting(init=init, weigh=weigh, update=update)
