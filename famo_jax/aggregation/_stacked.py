"""Helpers for the aggregators that read the stacked task gradients themselves.

Most aggregators need only the Gram matrix and weighted sums (``_base``). The
ones here also need per-task norms of some leaves, element-wise statistics
kept in their state (``O(k m)``), or the cross-Gram matrix of task gradients
from two further batches.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from famo_jax.aggregation import _base


def reject_implicit(updates: Any, method: str, why: str) -> None:
    """Raises a ``TypeError`` if ``updates`` is an :class:`ImplicitTaskGradients`."""
    if isinstance(updates, _base.ImplicitTaskGradients):
        raise TypeError(
            f"{method} {why}; it cannot take ImplicitTaskGradients (pass the stacked task "
            "gradients, e.g. from task_gradients)."
        )


def squared_norms(leaves: list[jax.Array], num_tasks: int, dtype) -> jax.Array:
    """``(k,)`` squared norms of the task gradients restricted to ``leaves``."""
    total = jnp.zeros((num_tasks,), dtype)
    for leaf in leaves:
        total = total + jnp.sum(jnp.square(leaf.astype(dtype)).reshape(num_tasks, -1), axis=1)
    return total


def zeros_like_stacked(params: Any, num_tasks: int) -> Any:
    """Per-task zeros ``(k, *leaf.shape)`` in at least float32 for every leaf of ``params``."""
    if params is None:
        raise ValueError(
            "this aggregator keeps per-task statistics of every parameter in its state: "
            "call init(params) with the parameters (or a pytree of their shapes)."
        )

    def zeros(leaf):
        dtype = jnp.promote_types(jnp.result_type(leaf), jnp.float32)
        return jnp.zeros((num_tasks,) + tuple(jnp.shape(leaf)), dtype)

    return jax.tree.map(zeros, params)


def check_like_state(updates: Any, stacked_state: Any, method: str) -> None:
    """Raises unless ``updates`` has the structure and shapes of the state's statistics."""
    # Any: jax's stubs type PyTreeDef comparisons loosely.
    structure: Any = jax.tree.structure(updates)
    if structure != jax.tree.structure(stacked_state) or any(
        jnp.shape(u) != jnp.shape(s)
        for u, s in zip(jax.tree.leaves(updates), jax.tree.leaves(stacked_state), strict=True)
    ):
        raise ValueError(
            f"{method}: the task gradients do not match the parameters given to init "
            f"(structure {jax.tree.structure(updates)} with shapes "
            f"{[jnp.shape(u) for u in jax.tree.leaves(updates)]}, expected "
            f"{jax.tree.structure(stacked_state)} with shapes "
            f"{[jnp.shape(s) for s in jax.tree.leaves(stacked_state)]})."
        )


def aligned_leaves(updates: Any, batch: Any, name: str) -> list[jax.Array]:
    """The leaves of ``batch`` at the positions of ``updates``' leaves.

    ``batch`` is a pytree of stacked task gradients with the structure of
    ``updates``, or of the full parameters when the aggregator runs inside
    :func:`famo_jax.shared_trunk` (``optax.partition`` then replaces the other
    leaves of ``updates`` by ``optax.MaskedNode``, and those leaves of ``batch``
    are dropped), so that the same full-model gradients can be passed through
    ``optax.chain`` to an aggregator of the trunk.
    """
    if isinstance(updates, _base.ImplicitTaskGradients):
        return jax.tree.leaves(batch)
    try:
        picked = jax.tree.map(
            lambda value, slot: None if isinstance(slot, optax.MaskedNode) else value,
            batch,
            updates,
            is_leaf=lambda node: isinstance(node, optax.MaskedNode),
        )
    except ValueError as err:
        raise ValueError(
            f"{name} must have the structure of the task gradients (or of the full "
            f"parameters inside shared_trunk): {err}"
        ) from err
    leaves = jax.tree.leaves(picked)
    expected = jax.tree.leaves(updates)
    if len(leaves) != len(expected) or any(
        jnp.shape(a) != jnp.shape(b) for a, b in zip(leaves, expected, strict=True)
    ):
        raise ValueError(
            f"{name} must hold task gradients of the shapes of updates "
            f"{[jnp.shape(b) for b in expected]}, got {[jnp.shape(a) for a in leaves]}."
        )
    return leaves


def cross_gram(first: list[jax.Array], second: list[jax.Array], dtype) -> jax.Array:
    r"""``(k, k)`` matrix :math:`G_1 G_2^\top` of two batches' task gradients, leaf by leaf."""
    k = jnp.shape(first[0])[0]
    total = jnp.zeros((k, k), dtype)
    for a, b in zip(first, second, strict=True):
        total = total + jnp.matmul(
            a.reshape(k, -1),
            b.reshape(k, -1).T,
            precision=jax.lax.Precision.HIGHEST,
            preferred_element_type=dtype,
        ).astype(dtype)
    return total


def tree_all_finite(tree: Any) -> jax.Array:
    """A scalar bool: every entry of every leaf is finite."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.ones((), bool)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))


def weight_matrix(updates: Any, weight_batches: Any, dtype, method: str) -> jax.Array:
    """The matrix the weights are solved from: the two batches' cross-Gram, or the Gram.

    Shared by SDMGrad and MoDo, which both take ``weight_batches``.
    """
    if weight_batches is None:
        return _base.gram_matrix(updates, dtype)
    if not isinstance(weight_batches, (tuple, list)) or len(weight_batches) != 2:
        raise TypeError(
            f"{method}: weight_batches must be a pair (grads_1, grads_2) of stacked task "
            f"gradients from two independent batches, got {type(weight_batches).__name__}."
        )
    k = _base.num_tasks_of(updates)
    pairs = []
    for index, batch in enumerate(weight_batches):
        name = f"weight_batches[{index}]"
        leaves = aligned_leaves(updates, batch, name)
        if _base.num_tasks_of(leaves, name) != k:
            raise ValueError(
                f"{name} must have a leading task axis of size {k}, got "
                f"{_base.num_tasks_of(leaves, name)}."
            )
        pairs.append([leaf.astype(dtype) for leaf in leaves])
    return cross_gram(pairs[0], pairs[1], dtype)
