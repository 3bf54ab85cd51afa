"""Linear scalarization (LS): the mean of the task losses, the baseline of every comparison."""

from __future__ import annotations

import jax.numpy as jnp

from famo_jax import _checks
from famo_jax.weighting import _base


def linear_scalarization(num_tasks: int) -> _base.LossWeighting:
    r"""Linear scalarization (LS): the average of the task losses.

    .. math::
        L(\ell) = \frac{1}{k} \sum_{i=1}^{k} \ell_i, \qquad w_i = \frac{1}{k}.

    This is the baseline every multitask method is compared with. It is stated
    as the *mean* (weights on the simplex, like FAMO's, RLW's and DWA's) where
    the authors' codebases use the sum (weights one); the two differ by the
    constant factor ``num_tasks``, to which Adam-type optimizers are invariant.
    Multiply the loss by ``num_tasks`` to recover the sum.

    The state is :class:`optax.EmptyState` and ``update`` returns it unchanged.

    Args:
      num_tasks: number of tasks :math:`k` (a positive int).

    Returns:
      A :class:`~famo_jax.LossWeighting`; ``weigh(losses, state)`` returns a
      scalar in the dtype of ``losses``.

    Example:
      >>> import jax.numpy as jnp
      >>> import famo_jax
      >>> ls = famo_jax.linear_scalarization(2)
      >>> state = ls.init()
      >>> ls.weigh(jnp.array([1.0, 3.0]), state)
      Array(2., dtype=float32)
      >>> famo_jax.loss_weights(ls, jnp.array([1.0, 3.0]), state)
      Array([0.5, 0.5], dtype=float32)

    References:
      Navon et al., *Multi-Task Learning as a Bargaining Game*, ICML 2022 (the
      ``ls`` baseline of the codebase FAMO's experiments build on).
      https://arxiv.org/abs/2202.01017
    """
    num_tasks = _checks.check_num_tasks(num_tasks)

    return _base.stateless(num_tasks, jnp.mean)
