"""Dynamic weight average (DWA, Liu et al. 2019), iteration-window variant."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from famo_jax import _checks, _numerics
from famo_jax.weighting import _base


class DWAState(NamedTuple):
    """State of :func:`dwa`.

    Attributes:
      costs: ``(2 * window, num_tasks)`` float32: FIFO history of the task losses,
        oldest first. It starts filled with ones, as in the reference.
      num_updates: ``()`` int32: losses pushed so far (the reference's
        ``running_iterations``).
      num_skipped: ``()`` int32: updates skipped because a loss was not finite
        (the history is then left unchanged).
    """

    costs: jax.Array
    num_updates: jax.Array
    num_skipped: jax.Array


def dwa(num_tasks: int, temperature: float = 2.0, window: int = 25) -> _base.LossWeighting:
    r"""Dynamic weight average (DWA) over windows of iterations.

    DWA weighs each task by how slowly its loss is falling. This is the variant
    of the Nash-MTL codebase, which FAMO's experiments use: the last
    :math:`2W` loss vectors are kept in a FIFO buffer :math:`C` (initially all
    ones); the rate of task :math:`i` is the mean of its losses over the newer
    half divided by the mean over the older half,

    .. math::
        r_i = \frac{\tfrac{1}{W}\sum_{t=W}^{2W-1} C_{t,i}}
                   {\tfrac{1}{W}\sum_{t=0}^{W-1} C_{t,i}}, \qquad
        w = \mathrm{softmax}(r / T), \qquad L(\ell) = \sum_i w_i \ell_i,

    with :math:`w` under ``stop_gradient``. For the first :math:`W + 1` steps
    (``num_updates <= window``) the weights are equal, :math:`w_i = 1/k`.

    Step order, reproduced from the reference without mutation: the reference
    pushes the current losses into :math:`C` *before* computing the rates from
    it, then counts the step. Here ``weigh(losses, state)`` computes the weights
    from ``state.costs`` with ``losses`` appended (the state is not changed),
    and ``update(prev_losses, curr_losses, state)`` pushes ``prev_losses`` (the
    losses ``weigh`` was called with) and counts the step, so that ``weigh``
    then ``update`` is exactly one step of the reference. ``curr_losses`` is not
    used (it is only checked for shape), so no extra forward pass is needed.

    Conventions and deviations: the reference returns
    ``mean(k * softmax(r / T) * losses)``, which is the loss above (weights on
    the simplex, like :func:`~famo_jax.linear_scalarization`'s mean). Where the
    reference divides by zero (an older-half mean of zero) it produces NaN or
    infinite weights; here a ratio ``0/0`` counts as 1 (unchanged loss) and
    ``x/0`` as the largest finite number, so the weights are always finite.
    ``update`` skips non-finite ``prev_losses`` (``num_skipped`` counts them)
    instead of writing them into the history.

    Args:
      num_tasks: number of tasks :math:`k` (a positive int).
      temperature: the softmax temperature :math:`T > 0`; larger is more uniform.
      window: the window :math:`W` (a positive int): rates compare the means of
        two consecutive windows of ``window`` steps. The reference's default is
        25 (``iteration_window``).

    Returns:
      A :class:`~famo_jax.LossWeighting` with ``init() -> DWAState``.

    Example:
      >>> import jax.numpy as jnp
      >>> import famo_jax
      >>> weighting = famo_jax.dwa(2, temperature=2.0, window=1)
      >>> state = weighting.init()
      >>> for losses in ([1.0, 1.0], [1.0, 1.0], [1.0, 0.5]):
      ...   losses = jnp.array(losses)
      ...   w = famo_jax.loss_weights(weighting, losses, state)
      ...   state = weighting.update(losses, losses, state)
      >>> jnp.round(w, 4)  # task 0 stalled, task 1 halved: task 0 gets more weight
      Array([0.5622, 0.4378], dtype=float32)

    References:
      Liu, Johns and Davison, *End-to-End Multi-Task Learning with Attention*,
      CVPR 2019 (DWA, epoch-based). Navon et al., *Multi-Task Learning as a
      Bargaining Game*, ICML 2022 (codebase: ``DynamicWeightAverage`` with
      ``iteration_window=25, temp=2.0``, used by FAMO's experiments).
      https://arxiv.org/abs/1803.10704
    """
    num_tasks = _checks.check_num_tasks(num_tasks)
    temperature = _checks.check_nonnegative("temperature", temperature)
    if temperature == 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    window = _checks.check_int("window", window)

    def init() -> DWAState:
        return DWAState(
            costs=jnp.ones((2 * window, num_tasks), jnp.float32),
            num_updates=jnp.zeros((), jnp.int32),
            num_skipped=jnp.zeros((), jnp.int32),
        )

    def push(costs: jax.Array, losses: jax.Array) -> jax.Array:
        return jnp.concatenate([costs[1:], losses[None].astype(costs.dtype)], axis=0)

    def weights(losses: jax.Array, state: DWAState) -> jax.Array:
        costs = push(state.costs, jax.lax.stop_gradient(losses))
        dtype = _numerics.at_least_float32(costs.dtype)
        costs = costs.astype(dtype)
        older = jnp.mean(costs[:window], axis=0)
        newer = jnp.mean(costs[window:], axis=0)
        ratio = newer / older
        # 0/0 (a loss that stayed at zero) is an unchanged loss; x/0 = inf is
        # clipped so that the softmax's max-shift gives that task all the weight
        # instead of inf - inf = NaN.
        ratio = jnp.where(jnp.isnan(ratio), 1.0, ratio)
        finite_max = jnp.finfo(dtype).max
        logits = jnp.clip(ratio / temperature, -finite_max, finite_max)
        dynamic = jax.nn.softmax(logits)
        uniform = jnp.full((num_tasks,), 1.0 / num_tasks, dtype)
        return jnp.where(state.num_updates > window, dynamic, uniform)

    def weigh(losses: ArrayLike, state: DWAState) -> jax.Array:
        losses = _checks.check_losses("losses", losses, num_tasks)
        return _base.weighted_sum(weights(losses, state), losses)

    def update(prev_losses: ArrayLike, curr_losses: ArrayLike, state: DWAState) -> DWAState:
        prev_losses = _checks.check_losses("prev_losses", prev_losses, num_tasks)
        _checks.check_losses("curr_losses", curr_losses, num_tasks)
        pushed = push(state.costs, prev_losses)
        valid = jnp.all(jnp.isfinite(pushed[-1]))
        num_updates, num_skipped = _numerics.counters_after(
            valid, state.num_updates, state.num_skipped
        )
        return DWAState(
            costs=_numerics.keep_if_valid(valid, pushed, state.costs),
            num_updates=num_updates,
            num_skipped=num_skipped,
        )

    return _base.LossWeighting(init=init, weigh=weigh, update=update)
