r"""The base of the gradient aggregators: stacked task gradients, Gram matrices, weights.

An aggregator's input ``updates`` is a pytree whose leaves all carry a leading
task axis of size ``k`` (what ``jax.jacrev`` of a vector of task losses gives);
its output is an ordinary gradient pytree with that axis reduced. Most methods
only need the ``k x k`` Gram matrix of the task gradients to pick combination
weights :math:`w`, and output :math:`\sum_i w_i g_i`. Such a method is a
:class:`GramWeighting` (its weights from the Gram matrix, and its state),
turned into an optax transformation by :func:`gram_weighted`.

The task gradients are never concatenated into one ``(k, m)`` matrix: the Gram
matrix is accumulated leaf by leaf and the weighted sum is taken leaf by leaf,
which keeps the memory at that of the input. An input may also be an
:class:`ImplicitTaskGradients`, which knows the Gram matrix and the weighted
sum without holding the task gradients at all (the Gramian engine's output).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import optax

from famo_jax import _numerics

TaskGradients = Any  # A pytree whose leaves have a leading task axis.
State = Any  # A pytree, usually a NamedTuple of arrays.


class ImplicitTaskGradients(NamedTuple):
    r"""Task gradients known only through their Gram matrix and their weighted sums.

    Every :func:`gram_weighted` aggregator accepts one in place of stacked task
    gradients and returns the same update, without the ``O(k m)`` memory of
    the stacked gradients.

    Attributes:
      gram: ``(k, k)`` Gram matrix :math:`G G^\top` of the task gradients, in at
        least float32.
      combine: ``weights -> sum_i weights[i] * g_i``: the weighted sum as a
        gradient pytree (for example one backward pass of the weighted loss).
    """

    gram: jax.Array
    combine: Callable[[jax.Array], Any]


class WeightsFn(Protocol):
    def __call__(
        self, gram: jax.Array, state: State, losses: jax.Array | None
    ) -> tuple[jax.Array, State]:
        """Returns the ``(k,)`` weights of the task gradients and the next state."""


class GramWeighting(NamedTuple):
    """A method that picks the combination weights from the Gram matrix.

    Attributes:
      init: ``init() -> state`` (``optax.EmptyState()`` for stateless methods).
      weights: ``weights(gram, state, losses) -> (weights, state)``: the ``(k,)``
        weights :math:`w` of the task gradients given their ``(k, k)`` Gram
        matrix and, for methods that need them, the task losses (None when the
        caller did not pass any).
    """

    init: Callable[[], State]
    weights: WeightsFn


def stateless(weights_fn: Callable[[jax.Array], jax.Array]) -> GramWeighting:
    """A :class:`GramWeighting` without state from ``gram -> weights``."""
    return GramWeighting(
        init=optax.EmptyState, weights=lambda gram, state, losses: (weights_fn(gram), state)
    )


def num_tasks_of(task_grads: TaskGradients, name: str = "updates") -> int:
    """Returns the size of the leading task axis, checking that all leaves agree."""
    if isinstance(task_grads, ImplicitTaskGradients):
        return int(jnp.shape(task_grads.gram)[0])
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


def check_built_num_tasks(k: int, num_tasks: int, method: str) -> None:
    """Raises unless the task gradients have the ``num_tasks`` the method was built for."""
    if k != num_tasks:
        raise ValueError(
            f"{method} was built for num_tasks={num_tasks}, got task gradients with a "
            f"leading axis of size {k}."
        )


def compute_dtype(task_grads: TaskGradients) -> jnp.dtype:
    """The dtype in which weights are computed: at least float32."""
    if isinstance(task_grads, ImplicitTaskGradients):
        return _numerics.at_least_float32(task_grads.gram.dtype)
    return _numerics.at_least_float32(jnp.result_type(*jax.tree.leaves(task_grads)))


def gram_matrix(task_grads: TaskGradients, dtype=None) -> jax.Array:
    """Returns ``G G^T`` (shape ``(k, k)``) of the task gradients, summed over leaves.

    Args:
      task_grads: pytree of per-task gradients with a leading task axis, or
        :class:`ImplicitTaskGradients`.
      dtype: accumulation dtype; default: the task gradients' dtype, at least float32.
    """
    dtype = compute_dtype(task_grads) if dtype is None else dtype
    if isinstance(task_grads, ImplicitTaskGradients):
        return task_grads.gram.astype(dtype)
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
    if isinstance(task_grads, ImplicitTaskGradients):
        return task_grads.combine(weights)

    def weighted_sum(leaf):
        w = weights.astype(jnp.promote_types(leaf.dtype, weights.dtype))
        return jnp.tensordot(w, leaf.astype(w.dtype), axes=1).astype(leaf.dtype)

    return jax.tree.map(weighted_sum, task_grads)


def check_losses_extra_arg(losses: Any, num_tasks: int, method: str) -> jax.Array:
    """The ``losses`` extra argument of a method that needs it, checked."""
    if losses is None:
        raise ValueError(
            f"{method} needs the task losses: call update(updates, state, params, "
            "losses=losses) (optax.chain forwards keyword arguments)."
        )
    losses = jnp.asarray(losses)
    if losses.shape != (num_tasks,):
        raise ValueError(
            f"losses must have shape (num_tasks,) = ({num_tasks},), got shape {losses.shape}."
        )
    return losses


def gram_weighted(weighting: GramWeighting) -> optax.GradientTransformationExtraArgs:
    r"""The optax aggregator :math:`\sum_i w_i g_i` with weights from the Gram matrix.

    ``update(updates, state, params=None, *, losses=None, **extra_args)`` takes
    per-task gradients stacked on a leading axis of size ``k`` (every leaf
    ``(k, ...)``) or an :class:`ImplicitTaskGradients`, computes their Gram
    matrix :math:`A = G G^\top` in at least float32, asks ``weighting`` for the
    weights, and returns :math:`\sum_i w_i g_i` leaf by leaf in each leaf's
    dtype. Other keyword arguments (which ``optax.chain`` forwards to every
    transformation) are ignored.

    Args:
      weighting: a :class:`GramWeighting`.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is the
      weighting's state.

    Example:
      >>> import jax.numpy as jnp
      >>> from famo_jax import aggregation
      >>> mean = aggregation.stateless(lambda gram: jnp.full(gram.shape[0], 1 / gram.shape[0]))
      >>> tx = aggregation.gram_weighted(mean)
      >>> out, _ = tx.update(jnp.array([[1.0, 0.0], [0.0, 3.0]]), tx.init(None))
      >>> out
      Array([0.5, 1.5], dtype=float32)
    """
    if not isinstance(weighting, GramWeighting):
        raise TypeError(f"weighting must be a GramWeighting, got {type(weighting).__name__}.")

    def init_fn(params):
        del params
        return weighting.init()

    def update_fn(updates, state, params=None, *, losses: Any = None, **extra_args):
        del params, extra_args
        gram = gram_matrix(updates)
        if losses is not None:
            losses = jnp.asarray(losses)
        weights, state = weighting.weights(gram, state, losses)
        return combine(updates, weights), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
