"""Trimmed mean: the coordinate-wise mean without the extreme values (Yin et al., ICML 2018)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from famo_jax import _checks, _numerics
from famo_jax.aggregation import _base


def trimmed_mean(trim_number: int) -> optax.GradientTransformationExtraArgs:
    r"""Trimmed mean: drop the ``trim_number`` largest and smallest values of every entry.

    For every parameter entry, the :math:`k` task-gradient values are sorted,
    the :math:`t` largest and :math:`t` smallest are dropped, and the
    remaining :math:`k - 2t` are averaged:

    .. math::
        d_p = \frac{1}{k - 2t} \sum_{r = t + 1}^{k - t} g_{(r), p} ,

    with :math:`g_{(1), p} \le \dots \le g_{(k), p}` the sorted values of
    entry :math:`p`. A robust aggregator from Byzantine-tolerant distributed
    learning (up to :math:`t` arbitrary gradients move no entry outside the
    range of the others); TorchJD ships it among its aggregators.

    Matches TorchJD 0.18's ``TrimmedMean`` (same requirement ``k >= 2t + 1``),
    except for non-finite values: ``torch.sort`` puts NaN last, so TorchJD
    trims NaN and infinite entries away when they are among the extremes and
    returns a finite output. Here any non-finite task-gradient entry makes
    that output entry NaN, as for every famo_jax aggregator, so that
    ``optax.apply_if_finite`` skips the step instead of silently dropping a
    diverged task.

    Scale convention: the output is on the scale of the *mean* of the task
    gradients (equal task gradients give exactly that gradient); ``t = 0`` is
    the mean. It is computed entry by entry, so it is not a function of the
    Gram matrix and does not accept ``ImplicitTaskGradients``.

    Cost: a sort of the :math:`k` values of every entry, :math:`O(k \log k\,
    m)` time and :math:`O(k m)` extra memory for :math:`m` parameters.

    Args:
      trim_number: the number :math:`t` of values trimmed at each end, a
        non-negative int.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update(updates, state,
      params=None)`` takes per-task gradients stacked on a leading axis of size
      ``k`` and returns one gradient pytree; state ``optax.EmptyState()``.

    Raises:
      ValueError, TypeError: for a bad ``trim_number``; at trace time if ``k <
        2 trim_number + 1``, or TypeError for ``ImplicitTaskGradients``.

    Example:
      >>> import jax.numpy as jnp
      >>> import famo_jax
      >>> task_grads = jnp.array([[1.0, -2.0], [2.0, 0.0], [100.0, 1.0]])
      >>> tx = famo_jax.trimmed_mean(trim_number=1)
      >>> d, _ = tx.update(task_grads, tx.init(None))
      >>> d  # the median of three, entry by entry
      Array([2., 0.], dtype=float32)

    References:
      Yin, Chen, Ramchandran and Bartlett, *Byzantine-Robust Distributed
      Learning: Towards Optimal Statistical Rates*, ICML 2018.
      https://proceedings.mlr.press/v80/yin18a.html (as implemented in TorchJD:
      https://github.com/TorchJD/torchjd)
    """
    trim_number = _checks.check_int("trim_number", trim_number, minimum=0)

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        if isinstance(updates, _base.ImplicitTaskGradients):
            raise TypeError(
                "trimmed_mean sorts every task gradient entry by entry; it cannot take "
                "ImplicitTaskGradients (use task_gradients for it)."
            )
        k = _base.num_tasks_of(updates)
        if k < 2 * trim_number + 1:
            raise ValueError(
                f"trimmed_mean with trim_number={trim_number} needs at least 2 * trim_number "
                f"+ 1 = {2 * trim_number + 1} tasks, got task gradients with a leading axis "
                f"of size {k}."
            )

        def trim(leaf: jax.Array) -> jax.Array:
            values = leaf.astype(_numerics.at_least_float32(leaf.dtype))
            kept = jnp.sort(values, axis=0)[trim_number : k - trim_number]
            out = jnp.mean(kept, axis=0)
            out = jnp.where(jnp.all(jnp.isfinite(values), axis=0), out, jnp.nan)
            return out.astype(leaf.dtype)

        return jax.tree.map(trim, updates), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
