"""Smooth Tchebycheff scalarisation (STCH, Lin et al. 2024) with its nadir warm-up."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from famo_jax import _checks, _numerics
from famo_jax.weighting import _base


class STCHState(NamedTuple):
    """State of :func:`stch`.

    Attributes:
      nadir: ``(num_tasks,)`` float32: the nadir estimate :math:`n`, the mean of
        the task losses over the averaging steps seen so far (zeros before
        them); final once ``num_updates >= warmup_steps + nadir_steps``.
      num_updates: ``()`` int32: updates applied (valid steps); it selects the
        phase (warm-up, averaging, smooth Tchebycheff).
      num_skipped: ``()`` int32: updates skipped because a loss was not finite
        or negative (the state is then left unchanged, and the phase does not
        advance).
    """

    nadir: jax.Array
    num_updates: jax.Array
    num_skipped: jax.Array


def stch(
    num_tasks: int,
    *,
    warmup_steps: int,
    nadir_steps: int,
    mu: float = 1.0,
    eps: float = 1e-20,
) -> _base.LossWeighting:
    r"""Smooth Tchebycheff scalarisation (STCH) of the log-normalised losses.

    STCH minimises a smooth maximum of the task losses, each normalised by a
    nadir point :math:`n` estimated during a warm-up:

    .. math::
        x_i = \log\big(\ell_i / n_i + \epsilon\big), \qquad
        L(\ell) = \mu \log \sum_{i=1}^{k} e^{x_i / \mu}, \qquad
        w_i = \frac{\mathrm{softmax}(x / \mu)_i}{\ell_i + \epsilon\, n_i},

    a smooth upper bound of :math:`\max_i x_i` (within :math:`\mu \log k`), so
    the task that is worst relative to its nadir gets most of the weight; as
    :math:`\mu \to \infty` the weights tend to those of
    :func:`~famo_jax.scale_invariant`. The run has three phases, counted in
    valid updates (``state.num_updates``):

    1. ``num_updates < warmup_steps``: the loss is
       :math:`\frac1k\sum_i \log(\ell_i + \epsilon)` (scale-invariant weighting);
    2. the next ``nadir_steps`` updates: the same loss, and ``update`` averages
       ``prev_losses`` (the losses each step was computed from) into
       ``state.nadir``;
    3. afterwards: the smooth Tchebycheff loss above with that nadir.

    ``curr_losses`` is not used (only checked for shape): no extra forward pass.

    Conventions and differences from the reference (LibMTL's ``STCH``, the
    same code as the STCH authors' ``STCH_MTL``):

    - the reference counts its phases in epochs (``STCH_warmup_epoch``, default
      4, then one epoch of averaging); here they are counted in steps: for the
      reference's schedule pass ``warmup_steps = 4 * steps_per_epoch`` and
      ``nadir_steps = steps_per_epoch``;
    - the reference's loss is ``task_num`` times the one here, in both phases
      (``sum(log(losses + eps))``, then ``mu * log(sum(exp(...))) * task_num``):
      here the mean scale of :func:`~famo_jax.linear_scalarization` is used;
      the weights are the reference's divided by :math:`k`;
    - the reference subtracts the (detached) :math:`\max_i x_i` before its
      log-sum-exp, which leaves the gradient unchanged but shifts the value;
      here the value is the smooth maximum itself;
    - the nadir is a running mean (the reference sums, then divides once: the
      same up to rounding); an entry of zero (a task whose loss was zero at
      every averaging step, where the reference divides by zero) is replaced
      by 1, so that task is not normalised;
    - negative or non-finite losses are invalid: ``weigh`` is NaN with a NaN
      gradient, and ``update`` skips them (``num_skipped``) without advancing
      the phase. So is a loss whose ratio to its nadir overflows.

    Args:
      num_tasks: number of tasks :math:`k` (a positive int).
      warmup_steps: valid steps of the warm-up phase (a non-negative int).
      nadir_steps: valid steps over which the nadir is averaged (a positive int).
      mu: the smoothing :math:`\mu > 0`; the reference's default is 1.
      eps: the constant :math:`\epsilon \ge 0` inside the logarithms; the
        reference's is 1e-20 (so a zero loss has a finite log and weight).

    Returns:
      A :class:`~famo_jax.LossWeighting` with ``init() -> STCHState``.

    Example:
      >>> import jax.numpy as jnp
      >>> import famo_jax
      >>> weighting = famo_jax.stch(2, warmup_steps=1, nadir_steps=2, mu=1.0)
      >>> state = weighting.init()
      >>> for losses in ([1.0, 10.0], [1.0, 10.0], [3.0, 30.0]):  # nadir (2, 20)
      ...   state = weighting.update(jnp.array(losses), jnp.array(losses), state)
      >>> state.nadir
      Array([ 2., 20.], dtype=float32)
      >>> losses = jnp.array([2.0, 40.0])  # task 1 is twice its nadir
      >>> [round(w, 4) for w in famo_jax.loss_weights(weighting, losses, state).tolist()]
      [0.1667, 0.0167]

    References:
      Lin, Zhang, Yang, Liu, Wang and Zhang, *Smooth Tchebycheff Scalarization
      for Multi-Objective Optimization*, ICML 2024. Code:
      https://github.com/Xi-L/STCH (``STCH_MTL``) and LibMTL,
      ``LibMTL/weighting/STCH.py``, https://github.com/median-research-group/LibMTL
    """
    num_tasks = _checks.check_num_tasks(num_tasks)
    warmup_steps = _checks.check_int("warmup_steps", warmup_steps, minimum=0)
    nadir_steps = _checks.check_int("nadir_steps", nadir_steps)
    mu = _checks.check_nonnegative("mu", mu)
    if mu == 0:
        raise ValueError(f"mu must be > 0, got {mu}.")
    eps = _checks.check_nonnegative("eps", eps)
    smooth_from = warmup_steps + nadir_steps

    def init() -> STCHState:
        return STCHState(
            nadir=jnp.zeros((num_tasks,), jnp.float32),
            num_updates=jnp.zeros((), jnp.int32),
            num_skipped=jnp.zeros((), jnp.int32),
        )

    def check_state(state: STCHState) -> None:
        if jnp.shape(state.nadir) != (num_tasks,):
            raise ValueError(
                f"state.nadir must have shape (num_tasks,) = ({num_tasks},), got shape "
                f"{jnp.shape(state.nadir)}: was the state made by init() of this stch()?"
            )

    def usable(losses: jax.Array) -> jax.Array:
        # log(l + eps) (and log(l / n + eps)) needs l >= 0, and l > 0 when eps = 0.
        return jnp.all(jnp.isfinite(losses) & (losses >= 0) & ((losses > 0) | (eps > 0)))

    def weigh(losses: ArrayLike, state: STCHState) -> jax.Array:
        losses = _checks.check_losses("losses", losses, num_tasks)
        check_state(state)
        dtype = _numerics.at_least_float32(jnp.promote_types(losses.dtype, state.nadir.dtype))
        computed = losses.astype(dtype)
        nadir = jax.lax.stop_gradient(state.nadir).astype(dtype)
        nadir = jnp.where(nadir > 0, nadir, 1.0)
        warmup_value = jnp.mean(jnp.log(computed + eps))
        normalised = jnp.log(computed / nadir + eps)
        smooth_value = mu * jax.nn.logsumexp(normalised / mu)
        smooth = state.num_updates >= smooth_from
        value = jnp.where(smooth, smooth_value, warmup_value)
        valid = usable(computed) & (~smooth | jnp.all(jnp.isfinite(normalised)))
        return _numerics.nan_unless(valid, value).astype(losses.dtype)

    def update(prev_losses: ArrayLike, curr_losses: ArrayLike, state: STCHState) -> STCHState:
        prev_losses = _checks.check_losses("prev_losses", prev_losses, num_tasks)
        _checks.check_losses("curr_losses", curr_losses, num_tasks)
        check_state(state)
        losses = prev_losses.astype(_numerics.at_least_float32(prev_losses.dtype))
        valid = usable(losses)
        # The count-th loss vector of the averaging window (1-based) enters the mean.
        count = state.num_updates - warmup_steps + 1
        averaging = (count >= 1) & (count <= nadir_steps)
        nadir = state.nadir.astype(losses.dtype)
        running_mean = nadir + (losses - nadir) / jnp.maximum(count, 1).astype(losses.dtype)
        nadir = jnp.where(averaging, running_mean, nadir).astype(state.nadir.dtype)
        num_updates, num_skipped = _numerics.counters_after(
            valid, state.num_updates, state.num_skipped
        )
        return STCHState(
            nadir=_numerics.keep_if_valid(valid, nadir, state.nadir),
            num_updates=num_updates,
            num_skipped=num_skipped,
        )

    return _base.LossWeighting(init=init, weigh=weigh, update=update)
