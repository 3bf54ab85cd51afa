"""Flax NNX: a loss weighting as an NNX object whose state updates in place.

Needs Flax (``pip install flax``, or the ``examples`` extra: ``pip install -e
".[examples]"`` in a checkout); the rest of famo_jax does not. In the style of
``nnx.Optimizer``: the object holds the weighting's state as NNX state, so it
goes through ``nnx.jit``, ``nnx.split`` / ``nnx.merge`` and checkpoints with the
model and its optimizer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
from jax.typing import ArrayLike

from famo_jax.weighting import _base, _famo

try:
    from flax import nnx
except ImportError as err:  # pragma: no cover - exercised only without flax
    raise ImportError("famo_jax.nnx needs Flax: pip install flax (or famo_jax[examples]).") from err

# nnx.Pytree is the base of NNX objects since Flax 0.11 (nnx.Object before).
if TYPE_CHECKING:
    from flax.nnx import Pytree as _NNXObject
else:
    _NNXObject = getattr(nnx, "Pytree", None) or nnx.Object


class WeightingState(nnx.Variable):
    """The NNX variable type that holds a loss weighting's state (a pytree).

    Filter on it like on ``nnx.OptState``: ``nnx.state(model, WeightingState)``.
    """


def _get(variable: nnx.Variable) -> Any:
    # Variable.get_value since Flax 0.12 (.value is deprecated there).
    return variable.get_value() if hasattr(variable, "get_value") else variable.value


def _set(variable: nnx.Variable, value: Any) -> None:
    if hasattr(variable, "set_value"):
        variable.set_value(value)
    else:  # Flax < 0.12
        variable.value = value


class Weighting(_NNXObject):
    """A :class:`~famo_jax.LossWeighting` (FAMO or any other) as an NNX object.

    ``weighting(losses)`` is the scalar to differentiate (``weigh`` with the
    current state); ``weighting.update(prev_losses, curr_losses)`` advances
    the state in place, so a step under ``nnx.jit`` needs no state threading:

    .. code-block:: python

        weighting = famo_jax.nnx.Weighting(famo_jax.famo(num_tasks))
        optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

        @nnx.jit
        def train_step(model, optimizer, weighting, x, y):
            def objective(model):
                losses = task_losses(model(x), y)
                return weighting(losses), losses
            (_, losses), grads = nnx.value_and_grad(objective, has_aux=True)(model)
            optimizer.update(model, grads)
            weighting.update(losses, task_losses(model(x), y))  # the authors' same-batch update

    Attributes:
      weighting: the functional :class:`~famo_jax.LossWeighting` (static).
      state: a :class:`WeightingState` variable holding its state.

    Example:
      >>> import jax.numpy as jnp
      >>> import famo_jax, famo_jax.nnx
      >>> weighting = famo_jax.nnx.Weighting(famo_jax.famo(2))
      >>> round(float(weighting(jnp.array([1.0, 4.0]))), 4)  # c z log(l) with z = (1/2, 1/2)
      1.109
      >>> weighting.update(jnp.array([1.0, 4.0]), jnp.array([0.5, 3.9]))
      >>> int(weighting.value.num_updates), bool(weighting.task_weights[1] > 0.5)
      (1, True)
    """

    def __init__(self, weighting: _base.LossWeighting):
        if not isinstance(weighting, _base.LossWeighting):
            raise TypeError(
                f"weighting must be a famo_jax.LossWeighting, got {type(weighting).__name__}."
            )
        self.weighting = weighting
        self.state = WeightingState(weighting.init())

    @property
    def value(self) -> Any:
        """The weighting's current state (for FAMO a :class:`~famo_jax.FAMOState`)."""
        return _get(self.state)

    def __call__(self, losses: ArrayLike) -> jax.Array:
        """``weighting.weigh(losses, state)``: the loss to differentiate."""
        return self.weighting.weigh(losses, self.value)

    def update(self, prev_losses: ArrayLike, curr_losses: ArrayLike) -> None:
        """Advances the state in place: ``weighting.update(prev, curr, state)``.

        The state must not depend on the model's parameters: only the values of
        the losses are used (``stop_gradient`` is applied).
        """
        prev_losses, curr_losses = jax.lax.stop_gradient((prev_losses, curr_losses))
        _set(self.state, self.weighting.update(prev_losses, curr_losses, self.value))

    def loss_weights(self, losses: ArrayLike) -> jax.Array:
        """The effective task weights of ``losses`` (:func:`famo_jax.loss_weights`)."""
        return _base.loss_weights(self.weighting, losses, self.value)

    @property
    def task_weights(self) -> jax.Array:
        """FAMO's task weights ``softmax(logits)`` (for states that have logits)."""
        return jax.nn.softmax(self.value.logits, axis=-1)


def famo(num_tasks: int, **kwargs: Any) -> Weighting:
    """``Weighting(famo_jax.famo(num_tasks, **kwargs))``: FAMO as an NNX object.

    Example:
      >>> import famo_jax.nnx
      >>> famo_jax.nnx.famo(3, gamma=0.01).value.logits.shape
      (3,)
    """
    return Weighting(_famo.famo(num_tasks, **kwargs))
