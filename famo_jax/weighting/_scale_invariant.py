"""Scale-invariant weighting (SI): the mean of the log task losses."""

from __future__ import annotations

import jax.numpy as jnp

from famo_jax import _checks
from famo_jax.weighting import _base


def scale_invariant(num_tasks: int, eps: float = 1e-8) -> _base.LossWeighting:
    r"""Scale-invariant weighting (SI): the average of the log task losses.

    .. math::
        L(\ell) = \frac{1}{k} \sum_{i=1}^{k} \log(\ell_i + \epsilon), \qquad
        w_i = \frac{1}{k\,(\ell_i + \epsilon)}.

    With :math:`\epsilon = 0` the model's gradient :math:`\sum_i \nabla\ell_i /
    (k\,\ell_i)` does not change when a task's loss is multiplied by a positive
    constant. It is the static counterpart of FAMO: FAMO with fixed, equal
    logits and no ``min_losses`` moves the model along SI's direction, with the
    weights normalised to sum to one.

    Conventions: the authors' codebases (Nash-MTL, FAMO) compute
    ``sum(log(losses))`` without :math:`\epsilon`. Here the sum is divided by
    :math:`k` (the mean convention shared with :func:`linear_scalarization`;
    multiply by ``num_tasks`` for the sum) and :math:`\epsilon` (default 1e-8,
    FAMO's constant) keeps a zero loss finite: its log is ``log(eps)`` and its
    weight ``1 / (k * eps)``. Pass ``eps=0`` for the reference exactly. Losses
    at or below ``-eps`` (negative log-likelihoods, say) have no finite
    logarithm: ``weigh`` returns NaN for them, as the reference does, and so
    does its gradient, where the reference's would be finite with a flipped
    sign (so ``optax.apply_if_finite`` skips such a step); use
    :func:`famo_jax.check_famo_losses` (``min_losses=0``, same ``eps``) to
    turn them into an error. The relative error of the invariance caused by
    :math:`\epsilon` is at most :math:`\epsilon / \ell_i`.

    The state is :class:`optax.EmptyState` and ``update`` returns it unchanged.

    Args:
      num_tasks: number of tasks :math:`k` (a positive int).
      eps: the constant :math:`\epsilon \ge 0` added to every loss before the log.

    Returns:
      A :class:`~famo_jax.LossWeighting`; ``weigh(losses, state)`` returns a
      scalar in the dtype of ``losses`` (computed in at least float32).

    Example:
      >>> import jax.numpy as jnp
      >>> import famo_jax
      >>> si = famo_jax.scale_invariant(2, eps=0.0)
      >>> famo_jax.loss_weights(si, jnp.array([0.5, 100.0]), si.init())
      Array([1.   , 0.005], dtype=float32)

    References:
      Navon et al., *Multi-Task Learning as a Bargaining Game*, ICML 2022 (the
      ``scaleinvls`` baseline); Liu et al., *FAMO: Fast Adaptive Multitask
      Optimization*, NeurIPS 2023 (SI in Tables 2-4).
      https://arxiv.org/abs/2306.03792
    """
    num_tasks = _checks.check_num_tasks(num_tasks)
    eps = _checks.check_nonnegative("eps", eps)

    return _base.stateless(
        num_tasks,
        lambda losses: jnp.mean(jnp.log(losses + eps)),
        valid_fn=lambda losses: jnp.isfinite(losses) & (losses + eps > 0),
    )
