"""Per-task gradients without boilerplate: ``jax.jacrev`` of a vector of task losses."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from famo_jax import _checks


def split_losses_and_aux(out: Any, has_aux: bool) -> tuple[jax.Array, Any]:
    """``loss_fn``'s output as ``(losses, aux)``, checked: a pair if ``has_aux``, 1-D losses."""
    if has_aux:
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError(
                "with has_aux=True, loss_fn must return a pair (losses, aux), "
                f"got {type(out).__name__}."
            )
        losses, aux = out
    else:
        losses, aux = out, None
    losses = jnp.asarray(losses)
    if losses.ndim != 1:
        raise ValueError(
            "loss_fn must return a 1-D array of task losses, shape (num_tasks,), "
            f"got shape {losses.shape}."
        )
    _checks.check_losses("the losses returned by loss_fn", losses, losses.shape[0])
    return losses, aux


def task_gradients(
    loss_fn: Callable[..., Any],
    argnums: int | Sequence[int] = 0,
    has_aux: bool = False,
) -> Callable[..., Any]:
    r"""Turns a function returning task losses into one returning them and their gradients.

    For ``loss_fn(params, ...) -> losses`` of shape ``(num_tasks,)``, the
    returned function computes, with one forward pass and ``num_tasks``
    vectorised backward passes (``jax.jacrev``),

    .. math::
        \big(\ell(\theta),\ [\nabla_\theta \ell_1; \dots; \nabla_\theta \ell_k]\big),

    the task gradients stacked on a leading axis of size ``num_tasks`` in every
    leaf of ``params``: the input the gradient aggregators (``famo_jax.cagrad``,
    ``famo_jax.mgda``, ...) expect. The mean over that axis is the gradient of
    the mean loss. The call signature mirrors ``jax.value_and_grad``.

    Args:
      loss_fn: function whose output is a 1-D floating array of task losses
        (or a pair ``(losses, aux)`` when ``has_aux``).
      argnums: which positional argument(s) to differentiate, as in
        ``jax.grad``; with a sequence, the gradients are a tuple.
      has_aux: whether ``loss_fn`` returns ``(losses, aux)``.

    Returns:
      A function with ``loss_fn``'s signature returning ``(losses, task_grads)``,
      or ``((losses, aux), task_grads)`` when ``has_aux``. Each leaf of
      ``task_grads`` has shape ``(num_tasks,) + leaf.shape`` and the leaf's dtype.

    Raises:
      ValueError, TypeError: at trace time if the losses are not a 1-D floating
        array.

    Example:
      >>> import jax.numpy as jnp
      >>> import famo_jax
      >>> def losses(params, x):
      ...   return jnp.stack([jnp.sum(params * x), jnp.sum(params ** 2)])
      >>> values, grads = famo_jax.task_gradients(losses)(jnp.array([1.0, 2.0]), 3.0)
      >>> values
      Array([9., 5.], dtype=float32)
      >>> grads
      Array([[3., 3.],
             [2., 4.]], dtype=float32)
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}.")
    if not isinstance(has_aux, bool):
        raise TypeError(f"has_aux must be a bool, got {has_aux!r}.")

    def checked(*args, **kwargs):
        out = loss_fn(*args, **kwargs)
        losses, aux = split_losses_and_aux(out, has_aux)
        # The losses ride along as auxiliary output so the forward pass runs once.
        return losses, (losses, aux)

    jacobian_fn = jax.jacrev(checked, argnums=argnums, has_aux=True)

    @functools.wraps(loss_fn)
    def value_and_task_grads(*args, **kwargs):
        grads, (losses, aux) = jacobian_fn(*args, **kwargs)
        return ((losses, aux) if has_aux else losses), grads

    return value_and_task_grads
