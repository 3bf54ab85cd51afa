"""A loss weighting inside the optimizer: an optax transformation that keeps its state."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from famo_jax import _checks
from famo_jax.weighting import _base


class WeightingTransformState(NamedTuple):
    """State of :func:`as_optax`: the weighting's state and the last losses seen.

    Attributes:
      weighting_state: the loss weighting's own state (for FAMO a
        :class:`~famo_jax.FAMOState`); read it with :func:`weighting_state`.
      prev_losses: ``(num_tasks,)`` float32: the task losses passed to the
        last ``update`` (NaN before the first one, so that the first lagged
        update is skipped by the weighting's rule for non-finite losses).
    """

    weighting_state: Any
    prev_losses: jax.Array


def as_optax(
    weighting: _base.LossWeighting, num_tasks: int
) -> optax.GradientTransformationExtraArgs:
    r"""A loss weighting as an optax transformation, its state inside the optimizer's.

    The transformation leaves the gradients unchanged and advances the
    weighting with the task losses given as the keyword argument ``losses``
    (which ``optax.chain`` forwards to every transformation), in the lagged
    mode: at step :math:`t` it calls ``weighting.update(losses[t-1],
    losses[t], state)``, which needs no extra forward pass (the first step is
    skipped). Put it first in the chain and differentiate the weighted loss
    with the state found in the optimizer state:

    .. code-block:: python

        weighting = famo_jax.famo(num_tasks)
        tx = optax.chain(famo_jax.as_optax(weighting, num_tasks), optax.adam(1e-3))
        opt_state = tx.init(params)

        def objective(params):
            losses = task_losses(params, batch)
            return weighting.weigh(losses, famo_jax.weighting_state(opt_state)), losses

        (_, losses), grads = jax.value_and_grad(objective, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params, losses=losses)

    This is exactly the functional API's lagged step (``weigh`` with the
    current state, then ``update(prev, curr)``), so the weighting is saved,
    restored and vmapped with the optimizer state, and its hyperparameters
    are found there too: FAMO's default logits optimizer keeps
    ``learning_rate`` and ``gamma`` in its state, so
    ``optax.tree_utils.tree_set(opt_state, gamma=0.0)`` changes FAMO's decay
    during training. The whole chain may be built inside
    ``optax.inject_hyperparams`` (for the model's learning rate, say): the
    weighting's state is carried through. Inside ``optax.MultiSteps``
    the weighting's state stays fixed over the micro-steps (every micro-batch
    is weighed with it, each by its own losses, and their gradients are
    averaged, with no second pass over them) and is updated once per model
    update: ``MultiSteps`` forwards ``losses`` only on the micro-step that
    updates the model, so the lagged update compares the last micro-batches
    of two consecutive model updates. For big-batch weights exactly, see
    :func:`famo_jax.linearize_weigh`, which needs the micro-batches' losses
    first. The authors' same-batch update (losses re-computed after the step)
    is not a function of one optimizer call; use the functional API for it.

    Args:
      weighting: a :class:`~famo_jax.LossWeighting` (FAMO or any other).
      num_tasks: the number of tasks (the length of ``losses``).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state
      :class:`WeightingTransformState`; its ``update(updates, state,
      params=None, *, losses, **extra_args)`` returns ``updates`` unchanged.

    Raises:
      ValueError: at trace time if ``losses`` is missing or of the wrong shape.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import famo_jax
      >>> weighting = famo_jax.famo(2)
      >>> tx = optax.chain(famo_jax.as_optax(weighting, 2), optax.sgd(0.1))
      >>> params = jnp.zeros(3)
      >>> opt_state = tx.init(params)
      >>> for losses in ([1.0, 4.0], [0.5, 3.9]):
      ...   grads = jnp.ones(3)  # the gradient of weigh(losses, ...) in practice
      ...   _, opt_state = tx.update(grads, opt_state, params, losses=jnp.array(losses))
      >>> state = famo_jax.weighting_state(opt_state)
      >>> int(state.num_updates), int(state.num_skipped)  # the first lagged update is skipped
      (1, 1)
      >>> bool(state.task_weights[1] > state.task_weights[0])  # task 1's loss fell less
      True
    """
    if not isinstance(weighting, _base.LossWeighting):
        raise TypeError(
            f"weighting must be a famo_jax.LossWeighting, got {type(weighting).__name__}."
        )
    num_tasks = _checks.check_num_tasks(num_tasks)

    def init_fn(params):
        del params
        return WeightingTransformState(
            weighting_state=weighting.init(), prev_losses=jnp.full((num_tasks,), jnp.nan)
        )

    def update_fn(updates, state, params=None, *, losses: ArrayLike | None = None, **extra_args):
        del params, extra_args
        if losses is None:
            raise ValueError(
                "as_optax(...) needs the task losses: call update(updates, state, params, "
                "losses=losses)."
            )
        losses = _checks.check_losses("losses", losses, num_tasks)
        new_state = weighting.update(state.prev_losses, losses, state.weighting_state)
        prev = jax.lax.stop_gradient(losses).astype(state.prev_losses.dtype)
        return updates, WeightingTransformState(weighting_state=new_state, prev_losses=prev)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def weighting_state(opt_state: Any) -> Any:
    """The loss weighting's state inside an optimizer state made with :func:`as_optax`.

    Args:
      opt_state: an optax state (of a chain, ``MultiSteps``, ``inject_hyperparams``...)
        that contains exactly one :class:`WeightingTransformState`.

    Returns:
      Its ``weighting_state`` (a :class:`~famo_jax.FAMOState` for FAMO).

    Raises:
      ValueError: if there is no such state, or more than one.
    """
    found = [
        node
        for node in jax.tree.leaves(
            opt_state, is_leaf=lambda x: isinstance(x, WeightingTransformState)
        )
        if isinstance(node, WeightingTransformState)
    ]
    if len(found) != 1:
        raise ValueError(
            f"opt_state must contain exactly one WeightingTransformState (from "
            f"famo_jax.as_optax), found {len(found)}."
        )
    return found[0].weighting_state
