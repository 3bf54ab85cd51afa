"""Random loss weighting (RLW, Lin et al. 2021)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from famo_jax import _checks
from famo_jax.weighting import _base


class RLWState(NamedTuple):
    """State of :func:`random_loss_weighting`.

    Attributes:
      key: ``(2,)`` uint32: the PRNG key (``jax.random.PRNGKey``, or a typed
        key if one was given) from which
        ``weigh`` draws this step's weights; ``update`` replaces it by a fresh
        key. For a batch of independent runs under ``jax.vmap``, build the
        states as ``RLWState(key=jax.random.split(key, n))``.
    """

    key: jax.Array


def random_loss_weighting(
    num_tasks: int, seed: int = 0, *, key: jax.Array | None = None
) -> _base.LossWeighting:
    r"""Random loss weighting (RLW): weights drawn afresh at every step.

    .. math::
        \lambda \sim \mathcal{N}(0, I_k), \qquad w = \mathrm{softmax}(\lambda),
        \qquad L(\ell) = \sum_{i=1}^{k} w_i \ell_i,

    with :math:`w` under ``stop_gradient``. The weights lie on the simplex and
    their expectation is :math:`1/k` per task, so on average RLW is
    :func:`~famo_jax.linear_scalarization` (mean convention).

    ``weigh`` is pure: it draws the weights from ``state.key`` (a sub-key split
    off it, so the state's key itself is never used twice), so calling it
    several times with the same state gives the same weights. ``update``
    advances the key, so each training step gets new weights; it ignores the
    losses (the weights do not depend on them), hence non-finite losses cannot
    corrupt the state. A run is reproducible from ``seed``.

    Args:
      num_tasks: number of tasks :math:`k` (a positive int).
      seed: the seed of the initial PRNG key (a non-negative int); ignored
        when ``key`` is given.
      key: an explicit initial PRNG key.

    Returns:
      A :class:`~famo_jax.LossWeighting` with ``init() -> RLWState``.

    Example:
      >>> import jax.numpy as jnp
      >>> import famo_jax
      >>> rlw = famo_jax.random_loss_weighting(3, seed=0)
      >>> state = rlw.init()
      >>> losses = jnp.array([1.0, 2.0, 3.0])
      >>> w = famo_jax.loss_weights(rlw, losses, state)
      >>> bool(jnp.isclose(w.sum(), 1.0))
      True
      >>> state = rlw.update(losses, losses, state)
      >>> bool(jnp.any(famo_jax.loss_weights(rlw, losses, state) != w))
      True

    References:
      Lin, Ye, Xu, Shi and Zhang, *Reasonable Effectiveness of Random Weighting:
      A Litmus Test for Multi-Task Learning*, TMLR 2022.
      https://arxiv.org/abs/2111.10603
    """
    num_tasks = _checks.check_num_tasks(num_tasks)
    first_key = _checks.initial_key(seed, key)

    def init() -> RLWState:
        return RLWState(key=first_key())

    def weights(state: RLWState) -> jax.Array:
        sample_key = jax.random.split(state.key)[1]
        logits = jax.random.normal(sample_key, (num_tasks,), jnp.float32)
        return jax.nn.softmax(logits)

    def weigh(losses: ArrayLike, state: RLWState) -> jax.Array:
        losses = _checks.check_losses("losses", losses, num_tasks)
        return _base.weighted_sum(weights(state), losses)

    def update(prev_losses: ArrayLike, curr_losses: ArrayLike, state: RLWState) -> RLWState:
        _checks.check_losses("prev_losses", prev_losses, num_tasks)
        _checks.check_losses("curr_losses", curr_losses, num_tasks)
        return RLWState(key=jax.random.split(state.key)[0])

    return _base.LossWeighting(init=init, weigh=weigh, update=update)
