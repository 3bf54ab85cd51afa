"""GO4Align: group optimisation for multi-task alignment (Shen et al., NeurIPS 2024)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from famo_jax import _checks, _numerics
from famo_jax.weighting import _base

# Lloyd iterations of the grouping. From the evenly spread initial centres,
# k-means on the real line reached its fixed point within 20 iterations on 96.8%
# and within 39 on all of 20,000 random indicator vectors (k = 2..100, 2..10
# groups, losses spanning up to eight orders of magnitude, random probabilities).
# Iterations after the fixed point leave it unchanged, and each costs O(k * groups).
DEFAULT_NUM_ITERATIONS = 100


class GO4AlignState(NamedTuple):
    r"""State of :func:`go4align`.

    Attributes:
      log_probs: ``(num_tasks,)`` float32: the logarithms of the risk-guided
        probabilities :math:`\xi` (the authors' ``adv_probs``), normalised
        (``logsumexp(log_probs) == 0``). They start at :math:`\log(1/k)`.
      num_updates: ``()`` int32: updates applied.
      num_skipped: ``()`` int32: updates skipped because a loss was not finite
        or negative (``log_probs`` is then left unchanged).
    """

    log_probs: jax.Array
    num_updates: jax.Array
    num_skipped: jax.Array


def _spread_centers(values: jax.Array, num_groups: int) -> jax.Array:
    """The sorted values at ``num_groups`` evenly spaced ranks (min and max included)."""
    k = values.shape[0]
    if num_groups == 1:
        ranks = np.zeros((1,), np.int32)
    else:
        ranks = np.round(np.arange(num_groups) * (k - 1) / (num_groups - 1)).astype(np.int32)
    return jnp.sort(values)[ranks]


def go4align_groups(
    indicators: ArrayLike,
    num_groups: int,
    *,
    num_iterations: int = DEFAULT_NUM_ITERATIONS,
    initial_centers: ArrayLike | None = None,
) -> tuple[jax.Array, jax.Array]:
    r"""GO4Align's dynamical group assignment: k-means of the tasks' indicators.

    Lloyd's algorithm on the real line: ``num_iterations`` times, every task
    joins the nearest centre (the first one on a tie) and every centre moves to
    the mean of its tasks (a centre left without tasks stays where it was).
    The result is the last assignment and the means of its groups, so the group
    weights :math:`c_{g(i)}` preserve the indicators' sum.

    The initial centres are, by default, the sorted indicators at
    ``num_groups`` evenly spaced ranks (the smallest, the largest and evenly
    between), which makes the grouping deterministic and independent of the
    task order. The authors draw ``num_groups`` distinct tasks at random
    (``kmeans_pytorch``'s ``initialize``) and iterate until the centres move
    by less than 1e-2 in total; pass their draw as ``initial_centers`` to
    replay it.

    Args:
      indicators: ``(k,)`` the group indicators :math:`\gamma` (any real values).
      num_groups: the number of groups (an int in ``1..k``).
      num_iterations: the number of Lloyd iterations (a positive int).
      initial_centers: optional ``(num_groups,)`` initial centres.

    Returns:
      ``(groups, centers)``: ``(k,)`` int32 group of each task and
      ``(num_groups,)`` group means, in the indicators' dtype (at least float32).

    Example:
      >>> import jax.numpy as jnp
      >>> from famo_jax.weighting import go4align_groups
      >>> groups, centers = go4align_groups(jnp.array([0.9, 5.0, 1.1, 4.0]), 2)
      >>> groups
      Array([0, 1, 0, 1], dtype=int32)
      >>> centers
      Array([1. , 4.5], dtype=float32)
    """
    indicators = jnp.asarray(indicators)
    if indicators.ndim != 1 or not jnp.issubdtype(indicators.dtype, jnp.floating):
        raise ValueError(
            f"indicators must be a 1-d floating array, got shape {indicators.shape} and "
            f"dtype {indicators.dtype}."
        )
    k = indicators.shape[0]
    num_groups = _checks.check_int("num_groups", num_groups)
    if num_groups > k:
        raise ValueError(f"num_groups must be <= the number of tasks {k}, got {num_groups}.")
    num_iterations = _checks.check_int("num_iterations", num_iterations)
    values = indicators.astype(_numerics.at_least_float32(indicators.dtype))
    if initial_centers is None:
        centers = _spread_centers(values, num_groups)
    else:
        centers = jnp.asarray(initial_centers, values.dtype)
        if centers.shape != (num_groups,):
            raise ValueError(
                f"initial_centers must have shape (num_groups,) = ({num_groups},), got shape "
                f"{centers.shape}."
            )

    def assign(centers: jax.Array) -> jax.Array:
        return jnp.argmin((values[:, None] - centers[None, :]) ** 2, axis=1).astype(jnp.int32)

    def means(groups: jax.Array, centers: jax.Array) -> jax.Array:
        members = jax.nn.one_hot(groups, num_groups, dtype=values.dtype)
        counts = jnp.sum(members, axis=0)
        sums = members.T @ values
        return jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), centers)

    def lloyd(carry, _):
        _, centers = carry
        groups = assign(centers)
        return (groups, means(groups, centers)), None

    start = (jnp.zeros((k,), jnp.int32), centers)
    (groups, centers), _ = jax.lax.scan(lloyd, start, None, length=num_iterations)
    return groups, centers


def go4align(
    num_tasks: int,
    num_groups: int,
    robust_step_size: float = 1e-4,
    eps: float = 1e-8,
    *,
    num_iterations: int = DEFAULT_NUM_ITERATIONS,
) -> _base.LossWeighting:
    r"""GO4Align: adaptive group risk minimisation with risk-guided group indicators.

    GO4Align weighs the tasks by *group*: tasks whose indicators are close share
    one weight. At every step, from the (detached) losses :math:`\ell`:

    .. math::
        \xi &\leftarrow \mathrm{normalise}\big(\xi \odot e^{-\eta\,\ell}\big)
            &&\text{(risk-guided probabilities, } \xi^{(0)}_i = 1/k),\\
        \gamma_i &= \frac{\sum_j \ell_j}{\ell_i + \epsilon}\,\xi_i
            &&\text{(scale balance} \times \text{smooth alignment)},\\
        (g, c) &= \text{k-means}(\gamma, G)
            &&\text{(dynamical group assignment, } G \text{ groups)},\\
        L(\ell) &= \frac{1}{k}\sum_i c_{g(i)}\,\ell_i, &&w_i = c_{g(i)}/k,

    with :math:`w` under ``stop_gradient``. The group weights are the means of
    the indicators in each group (:func:`go4align_groups`), so they sum to
    :math:`\sum_i \gamma_i`; with one group every task gets the mean indicator,
    with :math:`G = k` every task its own. The cost is that of
    :func:`~famo_jax.linear_scalarization` plus :math:`O(k\,G)` per Lloyd
    iteration.

    ``weigh(losses, state)`` computes :math:`\xi` from ``state.log_probs`` and
    ``losses`` without changing the state, and ``update(prev_losses,
    curr_losses, state)`` stores it, so ``weigh`` then ``update`` is exactly
    one step of the reference (which updates :math:`\xi` inside its loss
    function). ``curr_losses`` is not used (only checked for shape).

    Conventions and differences from the authors' code
    (``methods/cluster_methods.py``, class ``GO4ALIGN``, which the paper's
    results come from):

    - the loss is the mean, :math:`1/k` times the authors' ``sum(losses *
      weight)`` (equal losses give weights :math:`1/k` here, one there): the
      mean scale of :func:`~famo_jax.linear_scalarization`;
    - the grouping is deterministic (evenly spread initial centres, a fixed
      number of Lloyd iterations, empty groups keep their centre): the authors
      call ``kmeans_pytorch.kmeans`` (its import is commented out in their
      file; PyPI's 0.3 is what runs), which starts from randomly drawn tasks
      and stops once the centres moved by less than 1e-2 in total. With the
      same initial centres the groups are the same (tested). From their
      random starts, the groups equal the deterministic ones on 77% of the
      steps of the parity fixtures (97% at k = 3 with 2 groups, 36% at k = 40);
      where they differ, the deterministic grouping has the lower k-means
      objective 194 times out of 307. ``kmeans_pytorch`` 0.3 gives a group
      left empty a NaN centre and then never returns (its stopping test stays
      false): on the fixtures' indicators, 1 random start in 32,800 (3e-4 at
      k = 10 with 3 groups) would hang the authors' training loop;
    - :math:`\xi` is kept as normalised log-probabilities, so it cannot
      underflow (the authors' ``adv_probs * exp(-eta * loss)`` becomes 0/0 =
      NaN once :math:`\eta\ell_i > 87` for every task in float32);
    - :math:`\epsilon` (default 1e-8) keeps a zero loss valid: the authors
      divide by the loss (NaN or infinite weights for a zero loss). Pass
      ``eps=0`` for their formula; zero losses are then invalid;
    - negative or non-finite losses are invalid: ``weigh`` is NaN with a NaN
      gradient, ``update`` skips them (``num_skipped``).

    The sign is the authors': :math:`\xi` *decreases* the probability of tasks
    with large losses (:math:`e^{-\eta\ell}`), unlike group DRO's
    :math:`e^{+\eta\ell}`; the scale-balance factor :math:`\sum_j\ell_j/\ell_i`
    already favours tasks with small losses.

    Args:
      num_tasks: number of tasks :math:`k` (a positive int).
      num_groups: the number of groups :math:`G` (an int in ``1..num_tasks``).
        The authors' trainer defaults to 1; their method has no default.
      robust_step_size: the step :math:`\eta \ge 0` of the risk-guided
        probabilities; the authors' default is 1e-4.
      eps: the constant :math:`\epsilon \ge 0` added to each loss in the
        scale-balance factor.
      num_iterations: Lloyd iterations of the grouping (a positive int).

    Returns:
      A :class:`~famo_jax.LossWeighting` with ``init() -> GO4AlignState``.

    Example:
      >>> import jax.numpy as jnp
      >>> import famo_jax
      >>> weighting = famo_jax.go4align(4, num_groups=2)
      >>> state = weighting.init()
      >>> losses = jnp.array([1.0, 1.1, 10.0, 12.0])
      >>> weights = famo_jax.loss_weights(weighting, losses, state)
      >>> [round(w, 3) for w in weights.tolist()]  # two groups
      [1.438, 1.438, 0.138, 0.138]

    References:
      Shen, Wang, Xiao, van Noord and Worring, *GO4Align: Group Optimization
      for Multi-Task Alignment*, NeurIPS 2024. https://arxiv.org/abs/2404.06486
      Code: https://github.com/autumn9999/GO4Align
    """
    num_tasks = _checks.check_num_tasks(num_tasks)
    num_groups = _checks.check_int("num_groups", num_groups)
    if num_groups > num_tasks:
        raise ValueError(f"num_groups must be <= num_tasks = {num_tasks}, got {num_groups}.")
    robust_step_size = _checks.check_nonnegative("robust_step_size", robust_step_size)
    eps = _checks.check_nonnegative("eps", eps)
    num_iterations = _checks.check_int("num_iterations", num_iterations)

    def init() -> GO4AlignState:
        return GO4AlignState(
            log_probs=jnp.full((num_tasks,), -np.log(num_tasks), jnp.float32),
            num_updates=jnp.zeros((), jnp.int32),
            num_skipped=jnp.zeros((), jnp.int32),
        )

    def check_state(state: GO4AlignState) -> None:
        if jnp.shape(state.log_probs) != (num_tasks,):
            raise ValueError(
                f"state.log_probs must have shape (num_tasks,) = ({num_tasks},), got shape "
                f"{jnp.shape(state.log_probs)}: was the state made by init() of this go4align()?"
            )

    def usable(losses: jax.Array) -> jax.Array:
        return jnp.all(jnp.isfinite(losses) & (losses >= 0) & ((losses > 0) | (eps > 0)))

    def next_log_probs(losses: jax.Array, log_probs: jax.Array) -> jax.Array:
        return jax.nn.log_softmax(log_probs - robust_step_size * losses)

    def weigh(losses: ArrayLike, state: GO4AlignState) -> jax.Array:
        losses = _checks.check_losses("losses", losses, num_tasks)
        check_state(state)
        dtype = _numerics.at_least_float32(jnp.promote_types(losses.dtype, state.log_probs.dtype))
        computed = losses.astype(dtype)
        detached = jax.lax.stop_gradient(computed)
        valid = usable(detached)
        # Harmless stand-ins keep the grouping's arithmetic finite; the result
        # is NaN anyway when the losses are invalid.
        safe = jnp.where(valid, detached, 1.0)
        probs = jnp.exp(next_log_probs(safe, state.log_probs.astype(dtype)))
        indicators = jnp.sum(safe) / (safe + eps) * probs
        groups, centers = go4align_groups(indicators, num_groups, num_iterations=num_iterations)
        weights = centers[groups] / num_tasks
        value = jnp.sum(jax.lax.stop_gradient(weights) * computed)
        return _numerics.nan_unless(valid, value).astype(losses.dtype)

    def update(
        prev_losses: ArrayLike, curr_losses: ArrayLike, state: GO4AlignState
    ) -> GO4AlignState:
        prev_losses = _checks.check_losses("prev_losses", prev_losses, num_tasks)
        _checks.check_losses("curr_losses", curr_losses, num_tasks)
        check_state(state)
        dtype = _numerics.at_least_float32(
            jnp.promote_types(prev_losses.dtype, state.log_probs.dtype)
        )
        losses = prev_losses.astype(dtype)
        valid = usable(losses)
        log_probs = next_log_probs(losses, state.log_probs.astype(dtype))
        log_probs = log_probs.astype(state.log_probs.dtype)
        num_updates, num_skipped = _numerics.counters_after(
            valid, state.num_updates, state.num_skipped
        )
        return GO4AlignState(
            log_probs=_numerics.keep_if_valid(valid, log_probs, state.log_probs),
            num_updates=num_updates,
            num_skipped=num_skipped,
        )

    return _base.LossWeighting(init=init, weigh=weigh, update=update)
