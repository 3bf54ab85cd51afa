"""IMTL-L: impartial multi-task learning, loss part (Liu et al., ICLR 2021)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from famo_jax import _checks, _numerics
from famo_jax.weighting import _base, _famo


class IMTLLState(NamedTuple):
    """State of :func:`imtl_l`.

    Attributes:
      log_scales: ``(num_tasks,)`` float32: the learned log-scales :math:`s`
        (LibMTL's ``loss_scale``); task :math:`i`'s loss is scaled by
        :math:`e^{s_i}`. They start at zero.
      opt_state: the state of the log-scale optimizer (an optax state pytree).
      num_updates: ``()`` int32: optimizer steps applied to ``log_scales``.
      num_skipped: ``()`` int32: updates skipped because a loss or the new
        log-scales were not finite (``log_scales`` and ``opt_state`` are then
        left unchanged).
    """

    log_scales: jax.Array
    opt_state: optax.OptState
    num_updates: jax.Array
    num_skipped: jax.Array


def imtl_l(
    num_tasks: int,
    learning_rate: optax.ScalarOrSchedule = 1e-4,
    weight_decay: float | None = None,
    optimizer: optax.GradientTransformation | None = None,
) -> _base.LossWeighting:
    r"""IMTL-L: learned loss scales that make every scaled loss equal to one.

    Each task has a log-scale :math:`s_i` (starting at 0); the model is trained on

    .. math::
        L(\ell, s) = \frac{1}{k}\sum_{i=1}^{k}\big(e^{s_i}\ell_i - s_i\big),
        \qquad w_i = \frac{e^{s_i}}{k},

    and :math:`s` descends the same objective: ``update(prev_losses,
    curr_losses, state)`` takes one optimizer step along the reference's
    gradient

    .. math::
        \nabla_s \sum_i \big(e^{s_i}\ell^{\rm prev}_i - s_i\big) = e^{s} \odot
        \ell^{\rm prev} - 1,

    whose fixed point :math:`s_i = -\log\ell_i` makes every scaled loss
    :math:`e^{s_i}\ell_i` equal to one (the weights :math:`1/(k\ell_i)` of
    :func:`~famo_jax.scale_invariant`, reached gradually). ``prev_losses`` are
    the losses the model step was computed from, so this is the reference's
    joint step (the scales' gradient taken in the same backward pass as the
    model's); ``curr_losses`` is not used (only checked for shape).

    IMTL (the full method, LibMTL's ``IMTL``) combines these scaled losses with
    :func:`~famo_jax.imtl_g` on the shared parameters: compute the task
    gradients of ``jnp.exp(state.log_scales) * losses`` (the scales under
    ``stop_gradient``), aggregate the shared part with ``imtl_g`` (its weights
    sum to one, as the reference's) and train the task-specific parameters on
    ``weigh``; ``update`` advances the scales as above.

    Conventions and differences from the reference (LibMTL's ``IMTL``, the only
    public implementation; the paper has no code):

    - the model's loss is the mean (:math:`1/k` times the reference's sum), the
      mean scale of :func:`~famo_jax.linear_scalarization`; its weights are
      the reference's :math:`e^{s}` divided by :math:`k`;
    - the scales' gradient is the reference's (the sum, not divided by
      :math:`k`), because LibMTL trains ``loss_scale`` with the model's
      optimizer, ``torch.optim.Adam(lr=1e-4, weight_decay=1e-5)`` by default,
      whose coupled decay is not invariant to the gradient's scale. The default
      optimizer is that Adam (betas 0.9/0.999, eps 1e-8, ``weight_decay *
      s`` added to the gradient: not AdamW), without the model's learning-rate
      schedule (pass an optax schedule as ``learning_rate`` for one);
    - ``update`` skips steps with non-finite losses (``num_skipped``).

    Like :func:`~famo_jax.uncertainty_weighting`, IMTL-L assumes positive
    losses: for a zero or negative loss the objective has no minimum in
    :math:`s_i`, which then grows at every step, and so does the task's weight.

    Args:
      num_tasks: number of tasks :math:`k` (a positive int).
      learning_rate: the log-scales' learning rate (a float or an optax
        schedule); LibMTL's default model learning rate 1e-4. Used only when
        ``optimizer`` is None.
      weight_decay: the coupled L2 decay of the default optimizer; default
        LibMTL's 1e-5. Used only when ``optimizer`` is None.
      optimizer: the optax transformation that updates the log-scales.

    Returns:
      A :class:`~famo_jax.LossWeighting` with ``init() -> IMTLLState``.

    Example:
      >>> import jax.numpy as jnp
      >>> import famo_jax
      >>> weighting = famo_jax.imtl_l(2, learning_rate=0.1)
      >>> state = weighting.init()
      >>> losses = jnp.array([0.1, 10.0])
      >>> for _ in range(300):
      ...   state = weighting.update(losses, losses, state)
      >>> [round(x, 2) for x in (jnp.exp(state.log_scales) * losses).tolist()]  # -> 1
      [1.0, 1.0]

    References:
      Liu, Li, Kuang, Xue, Chen, Yang, Liao and Zhang, *Towards Impartial
      Multi-task Learning*, ICLR 2021. Code: LibMTL, ``LibMTL/weighting/IMTL.py``,
      https://github.com/median-research-group/LibMTL
    """
    num_tasks = _checks.check_num_tasks(num_tasks)
    learning_rate = _checks.check_nonnegative("learning_rate", learning_rate, allow_callable=True)
    if weight_decay is not None:
        weight_decay = _checks.check_nonnegative("weight_decay", weight_decay)
    optimizer = _checks.check_optimizer(
        optimizer,
        lambda: _famo.reference_adam(learning_rate, 1e-5 if weight_decay is None else weight_decay),
        weight_decay=weight_decay,
    )

    def init() -> IMTLLState:
        log_scales = jnp.zeros((num_tasks,), jnp.float32)
        return IMTLLState(
            log_scales=log_scales,
            opt_state=optimizer.init(log_scales),
            num_updates=jnp.zeros((), jnp.int32),
            num_skipped=jnp.zeros((), jnp.int32),
        )

    def check_state(state: IMTLLState) -> None:
        if jnp.shape(state.log_scales) != (num_tasks,):
            raise ValueError(
                f"state.log_scales must have shape (num_tasks,) = ({num_tasks},), got shape "
                f"{jnp.shape(state.log_scales)}: was the state made by init() of this imtl_l()?"
            )

    def weigh(losses: ArrayLike, state: IMTLLState) -> jax.Array:
        losses = _checks.check_losses("losses", losses, num_tasks)
        check_state(state)
        dtype = _numerics.at_least_float32(jnp.promote_types(losses.dtype, state.log_scales.dtype))
        log_scales = jax.lax.stop_gradient(state.log_scales).astype(dtype)
        value = jnp.mean(jnp.exp(log_scales) * losses.astype(dtype) - log_scales)
        return _numerics.nan_unless(jnp.all(jnp.isfinite(losses)), value).astype(losses.dtype)

    def update(prev_losses: ArrayLike, curr_losses: ArrayLike, state: IMTLLState) -> IMTLLState:
        prev_losses = _checks.check_losses("prev_losses", prev_losses, num_tasks)
        _checks.check_losses("curr_losses", curr_losses, num_tasks)
        check_state(state)
        dtype = _numerics.at_least_float32(
            jnp.promote_types(prev_losses.dtype, state.log_scales.dtype)
        )
        losses = prev_losses.astype(dtype)
        gradient = jnp.exp(state.log_scales.astype(dtype)) * losses - 1.0
        gradient = gradient.astype(state.log_scales.dtype)
        updates, opt_state = optimizer.update(gradient, state.opt_state, state.log_scales)
        log_scales = optax.apply_updates(state.log_scales, updates)
        valid = jnp.all(jnp.isfinite(losses)) & jnp.all(jnp.isfinite(log_scales))
        log_scales, opt_state = _numerics.keep_if_valid(
            valid, (log_scales, opt_state), (state.log_scales, state.opt_state)
        )
        num_updates, num_skipped = _numerics.counters_after(
            valid, state.num_updates, state.num_skipped
        )
        return IMTLLState(log_scales, opt_state, num_updates, num_skipped)

    return _base.LossWeighting(init=init, weigh=weigh, update=update)
