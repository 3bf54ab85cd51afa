"""Shared machinery of the gradient aggregators (O(k) methods).

An aggregator's input ``updates`` is a pytree whose leaves all carry a leading
task axis of size ``k`` (what ``jax.jacrev`` of a vector of task losses gives);
its output is an ordinary gradient pytree with that axis reduced. Most methods
only need the ``k x k`` Gram matrix of the task gradients to pick combination
weights, so the task gradients are never concatenated into one ``(k, m)``
matrix: the Gram matrix is accumulated leaf by leaf and the weighted sum is
taken leaf by leaf, which keeps the memory at that of the input.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

TaskGradients = Any  # A pytree whose leaves have a leading task axis.


def num_tasks_of(task_grads: TaskGradients, name: str = "updates") -> int:
    """Returns the size of the leading task axis, checking that all leaves agree."""
    leaves = jax.tree.leaves(task_grads)
    if not leaves:
        raise ValueError(f"{name} must contain at least one array, got an empty pytree.")
    sizes = set()
    for leaf in leaves:
        if jnp.ndim(leaf) < 1:
            raise ValueError(
                f"every leaf of {name} must have a leading task axis (shape (num_tasks, "
                f"...)), got a leaf of shape {jnp.shape(leaf)}."
            )
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise TypeError(
                f"{name} must hold floating-point task gradients, got dtype "
                f"{jnp.result_type(leaf)}."
            )
        sizes.add(jnp.shape(leaf)[0])
    if len(sizes) != 1:
        raise ValueError(
            f"every leaf of {name} must have the same leading task axis size, got sizes "
            f"{sorted(sizes)}."
        )
    return sizes.pop()


def compute_dtype(task_grads: TaskGradients) -> jnp.dtype:
    """The dtype in which weights are computed: at least float32."""
    dtype = jnp.result_type(*jax.tree.leaves(task_grads))
    return jnp.promote_types(dtype, jnp.float32)


def gram_matrix(task_grads: TaskGradients, dtype=None) -> jax.Array:
    """Returns ``G G^T`` (shape ``(k, k)``) of the task gradients, summed over leaves.

    Args:
      task_grads: pytree of per-task gradients with a leading task axis.
      dtype: accumulation dtype; default :func:`compute_dtype`.
    """
    dtype = compute_dtype(task_grads) if dtype is None else dtype
    k = num_tasks_of(task_grads)
    gram = jnp.zeros((k, k), dtype)
    for leaf in jax.tree.leaves(task_grads):
        flat = leaf.reshape(k, -1)
        # HIGHEST: the simplex solvers need the Gram matrix to full precision; the
        # default on TPU would round the inputs to bfloat16.
        gram = gram + jnp.matmul(
            flat, flat.T, precision=jax.lax.Precision.HIGHEST, preferred_element_type=dtype
        ).astype(dtype)
    return gram


def combine(task_grads: TaskGradients, weights: jax.Array) -> Any:
    """Returns ``sum_i weights[i] * task_grads[i]`` leaf by leaf, in each leaf's dtype."""

    def weighted_sum(leaf):
        w = weights.astype(jnp.promote_types(leaf.dtype, weights.dtype))
        return jnp.tensordot(w, leaf.astype(w.dtype), axes=1).astype(leaf.dtype)

    return jax.tree.map(weighted_sum, task_grads)
