"""The loss-weighting protocol shared by FAMO and the loss-weighting baselines."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from famo_jax import _checks, _numerics

State = Any  # A pytree, usually a NamedTuple of arrays.


class InitFn(Protocol):
    def __call__(self) -> State:
        """Returns the initial state of the weighting."""


class WeighFn(Protocol):
    def __call__(self, losses: ArrayLike, state: State) -> jax.Array:
        """Returns the scalar weighted loss; differentiate it to train the model."""


class UpdateFn(Protocol):
    def __call__(self, prev_losses: ArrayLike, curr_losses: ArrayLike, state: State) -> State:
        """Returns the next state from the task losses before and after a step."""


class LossWeighting(NamedTuple):
    """A loss weighting: three pure functions, in the spirit of optax.

    A loss weighting turns the vector of task losses into one scalar loss whose
    gradient is a weighted combination of the task gradients, so the model needs
    a single backward pass whatever the number of tasks (O(1) in k).

    Attributes:
      init: ``init() -> state``.
      weigh: ``weigh(losses, state) -> scalar``; differentiable w.r.t.
        ``losses``, its gradient w.r.t. ``losses`` is the vector of effective
        task weights (see :func:`loss_weights`).
      update: ``update(prev_losses, curr_losses, state) -> state``: advances the
        weighting once the model has taken a step. ``prev_losses`` are the losses
        the step was computed from; ``curr_losses`` the losses after it.
    """

    init: InitFn
    weigh: WeighFn
    update: UpdateFn


def loss_weights(weighting: LossWeighting, losses: ArrayLike, state: State) -> jax.Array:
    r"""Returns the effective task weights :math:`\partial\,\mathrm{weigh}/\partial l`.

    The model's gradient of ``weighting.weigh(losses, state)`` equals
    :math:`\sum_i w_i \nabla l_i` with these :math:`w`. For FAMO they are
    :math:`w_i = c\,z_i / (l_i - m_i + \epsilon)` and sum to one.

    Args:
      weighting: a :class:`LossWeighting`.
      losses: shape ``(num_tasks,)`` task losses.
      state: the weighting's state.

    Returns:
      Shape ``(num_tasks,)`` weights, same dtype as ``losses``.

    Example:
      >>> import jax.numpy as jnp
      >>> import famo_jax
      >>> w = famo_jax.famo(2)
      >>> famo_jax.loss_weights(w, jnp.array([1.0, 4.0]), w.init())
      Array([0.8, 0.2], dtype=float32)
    """
    return jax.grad(weighting.weigh)(losses, state)


def stateless(
    num_tasks: int,
    weigh_fn: Callable[[jax.Array], jax.Array],
    valid_fn: Callable[[jax.Array], jax.Array] = jnp.isfinite,
) -> LossWeighting:
    """A :class:`LossWeighting` with no state from ``losses -> scalar``.

    ``weigh_fn`` receives the checked losses in at least float32 (sums and logs
    of bfloat16 losses would lose their small terms); the result is cast back
    to the losses' dtype. Where ``valid_fn`` is False for a loss, the value
    and its gradient are NaN (``famo_jax._numerics.nan_unless``). The state is
    ``optax.EmptyState()`` and ``update`` only checks its arguments' shapes and
    returns the state unchanged.

    Args:
      num_tasks: the number of tasks (already validated).
      weigh_fn: ``losses -> scalar``, differentiable.
      valid_fn: ``losses -> bools``: which losses ``weigh_fn`` can use
        (default: the finite ones).
    """

    def weigh(losses: ArrayLike, state: optax.EmptyState) -> jax.Array:
        del state
        losses = _checks.check_losses("losses", losses, num_tasks)
        computed = losses.astype(_numerics.at_least_float32(losses.dtype))
        valid = jnp.all(valid_fn(computed))
        return _numerics.nan_unless(valid, weigh_fn(computed)).astype(losses.dtype)

    def update(
        prev_losses: ArrayLike, curr_losses: ArrayLike, state: optax.EmptyState
    ) -> optax.EmptyState:
        _checks.check_losses("prev_losses", prev_losses, num_tasks)
        _checks.check_losses("curr_losses", curr_losses, num_tasks)
        return state

    return LossWeighting(init=optax.EmptyState, weigh=weigh, update=update)


def weighted_sum(weights: jax.Array, losses: jax.Array) -> jax.Array:
    r""":math:`\sum_i w_i \ell_i` with fixed weights: the loss of a weighting that picks weights.

    The weights are under ``stop_gradient``, so the gradient w.r.t. the losses
    is ``weights``. Computed in the promotion of both dtypes (at least
    float32) and returned in the losses' dtype. NaN, with a NaN gradient, if
    a loss is not finite (no silent wrong step).
    """
    dtype = _numerics.at_least_float32(jnp.promote_types(losses.dtype, weights.dtype))
    computed = losses.astype(dtype)
    value = jnp.sum(jax.lax.stop_gradient(weights).astype(dtype) * computed)
    return _numerics.nan_unless(jnp.all(jnp.isfinite(computed)), value).astype(losses.dtype)
