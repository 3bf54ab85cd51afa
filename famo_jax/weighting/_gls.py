"""Geometric loss strategy (GLS, Chennupati et al. 2019): the geometric mean of the losses."""

from __future__ import annotations

import jax.numpy as jnp

from famo_jax import _checks
from famo_jax.weighting import _base


def gls(num_tasks: int, eps: float = 1e-8) -> _base.LossWeighting:
    r"""Geometric loss strategy (GLS): the geometric mean of the task losses.

    .. math::
        L(\ell) = \Big(\prod_{i=1}^{k} (\ell_i + \epsilon)\Big)^{1/k}
                = \exp\Big(\frac{1}{k}\sum_{i=1}^{k} \log(\ell_i + \epsilon)\Big),
        \qquad w_i = \frac{L(\ell)}{k\,(\ell_i + \epsilon)} .

    The weights are those of :func:`~famo_jax.scale_invariant` times the
    geometric mean: the direction of the model's gradient does not change when a
    task's loss is multiplied by a constant (up to :math:`\epsilon`), and equal
    losses get equal weights :math:`1/k` (the mean scale of
    :func:`~famo_jax.linear_scalarization`, and of the reference). There is no
    state; ``update`` returns it unchanged.

    Conventions and differences from LibMTL's ``GLS`` (the reference, ``loss =
    torch.pow(losses.prod(), 1. / task_num)``):

    - the product is computed in the log domain, so it neither overflows nor
      underflows (in float32 LibMTL's product is ``inf`` once it exceeds 3e38,
      e.g. ten losses of 1e4, and ``0`` below 1e-45; its gradient is then NaN);
    - :math:`\epsilon` (default 1e-8, FAMO's constant) keeps a zero loss valid:
      its factor is :math:`\epsilon` and its weight :math:`L/(k\epsilon)`,
      finite. LibMTL has no :math:`\epsilon` (a zero loss gives a NaN
      gradient); pass ``eps=0`` for its formula exactly. The relative effect of
      :math:`\epsilon` on a weight is at most :math:`\epsilon/\ell_i`;
    - a loss at or below :math:`-\epsilon` has no logarithm: ``weigh`` is NaN
      (with a NaN gradient). LibMTL accepts negative losses and, for an even
      number of them, silently optimises a positive product;
    - LibMTL's ``backward`` returns ``losses / (task_num * losses.prod())`` as
      the "batch weights" it logs; that is not the gradient of its own loss
      (which is :math:`w` above) and is not reproduced.

    Args:
      num_tasks: number of tasks :math:`k` (a positive int).
      eps: the constant :math:`\epsilon \ge 0` added to every loss.

    Returns:
      A :class:`~famo_jax.LossWeighting`; ``weigh(losses, state)`` returns a
      scalar in the dtype of ``losses`` (computed in at least float32).

    Example:
      >>> import jax.numpy as jnp
      >>> import famo_jax
      >>> weighting = famo_jax.gls(2, eps=0.0)
      >>> losses = jnp.array([1.0, 4.0])
      >>> weighting.weigh(losses, weighting.init())  # sqrt(1 * 4)
      Array(2., dtype=float32)
      >>> famo_jax.loss_weights(weighting, losses, weighting.init())  # 2 / (2 * l)
      Array([1.  , 0.25], dtype=float32)

    References:
      Chennupati, Sistu, Yogamani and Rawashdeh, *MultiNet++: Multi-Stream
      Feature Aggregation and Geometric Loss Strategy for Multi-Task Learning*,
      CVPR Workshops 2019. Code: LibMTL, ``LibMTL/weighting/GLS.py``,
      https://github.com/median-research-group/LibMTL
    """
    num_tasks = _checks.check_num_tasks(num_tasks)
    eps = _checks.check_nonnegative("eps", eps)

    return _base.stateless(
        num_tasks,
        lambda losses: jnp.exp(jnp.mean(jnp.log(losses + eps))),
        valid_fn=lambda losses: jnp.isfinite(losses) & (losses + eps > 0),
    )
