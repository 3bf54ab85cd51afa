"""Aggregating only a shared trunk: task heads get their own task's gradient."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

_SHARED = "shared"
_TASK_SPECIFIC = "task_specific"


def _reduce_task_axis(reduction: str) -> optax.GradientTransformation:
    """Sums or averages the leading task axis of every leaf."""
    reduce = jnp.mean if reduction == "mean" else jnp.sum

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        return jax.tree.map(lambda g: reduce(g, axis=0).astype(g.dtype), updates), state

    return optax.GradientTransformation(init_fn, update_fn)


def shared_trunk(
    aggregator: optax.GradientTransformation,
    is_shared: Any,
    head_reduction: str = "mean",
) -> optax.GradientTransformationExtraArgs:
    r"""Aggregates the shared parameters' task gradients; task heads get their own.

    Gradient aggregators resolve conflicts between tasks, which only exist on
    parameters that several tasks use (the shared trunk). A task head is used
    by one task only, so its rows of the stacked task gradients are zero except
    its own task's. This transformation takes stacked task gradients for *all*
    parameters (from :func:`task_gradients`) and returns one gradient:

    - leaves marked shared go through ``aggregator`` (together, as one pytree,
      so norms and Gram matrices span the whole trunk);
    - every other leaf is reduced over the task axis: with
      ``head_reduction="mean"`` (default) it gets :math:`\frac1k\sum_i
      \nabla\ell_i`, the gradient of the mean loss, which for a head of task
      :math:`j` is :math:`\frac1k \nabla\ell_j`; with ``"sum"`` it gets its own
      task's gradient :math:`\nabla\ell_j` exactly.

    Scale convention: the aggregators output the mean scale (the plain mean
    of the task gradients in the degenerate case), so ``"mean"`` keeps trunk
    and heads on the same scale: with an aggregator that returns the mean, the
    result is exactly the gradient of the mean of the losses (linear
    scalarization). The authors' trainers use the sum convention everywhere
    (trunk multiplied by :math:`k`, heads get the gradient of the summed loss);
    ``optax.chain(shared_trunk(agg, is_shared), optax.scale(num_tasks))``
    reproduces it, since then heads get their own gradient and the trunk
    :math:`k` times the aggregate. ``"sum"`` with no rescaling makes heads
    :math:`k` times larger relative to the trunk than in the reference.

    Built on ``optax.partition``; its state is an ``optax.PartitionState``.
    Extra arguments given to ``update`` reach the aggregator.

    Args:
      aggregator: an optax transformation over stacked task gradients (e.g.
        ``famo_jax.cagrad()``).
      is_shared: a pytree of bools with the structure of the parameters (or a
        prefix of it), or a function ``params -> such a pytree``; ``True``
        marks shared leaves. A function is called with the parameters at
        ``init`` and with the stacked task gradients at ``update`` (same
        structure), so it should look at the tree paths, not the shapes.
      head_reduction: ``"mean"`` or ``"sum"``: how the task axis of the other
        leaves is reduced.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> import famo_jax
      >>> params = {"trunk": jnp.ones(2), "heads": jnp.ones(2)}
      >>> def losses(p):  # task i uses the trunk and its own head p["heads"][i]
      ...   return jnp.stack([p["heads"][0] * p["trunk"].sum(),
      ...                     3.0 * p["heads"][1] * p["trunk"].sum()])
      >>> _, grads = famo_jax.task_gradients(losses)(params)
      >>> mean = optax.GradientTransformation(  # stands in for e.g. cagrad()
      ...     lambda p: optax.EmptyState(),
      ...     lambda g, s, p=None: (jax.tree.map(lambda x: x.mean(0), g), s))
      >>> tx = famo_jax.shared_trunk(mean, {"trunk": True, "heads": False},
      ...                            head_reduction="sum")
      >>> updates, _ = tx.update(grads, tx.init(params), params)
      >>> updates["heads"]  # each head: its own task's gradient
      Array([2., 6.], dtype=float32)
      >>> updates["trunk"]  # the aggregate of [1, 1] and [3, 3]
      Array([2., 2.], dtype=float32)

    References:
      Sener and Koltun, *Multi-Task Learning as Multi-Objective Optimization*,
      NeurIPS 2018 (aggregating over shared parameters only).
      https://arxiv.org/abs/1810.04650
    """
    if not isinstance(aggregator, optax.GradientTransformation):
        raise TypeError(
            f"aggregator must be an optax.GradientTransformation, got {type(aggregator).__name__}."
        )
    if head_reduction not in ("mean", "sum"):
        raise ValueError(f"head_reduction must be 'mean' or 'sum', got {head_reduction!r}.")

    def to_labels(mask):
        return jax.tree.map(lambda shared: _SHARED if shared else _TASK_SPECIFIC, mask)

    if callable(is_shared):
        param_labels = lambda tree: to_labels(is_shared(tree))
    else:
        param_labels = to_labels(is_shared)

    return optax.partition(
        {_SHARED: aggregator, _TASK_SPECIFIC: _reduce_task_axis(head_reduction)},
        param_labels,
    )
