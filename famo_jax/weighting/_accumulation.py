"""Gradient accumulation (``optax.MultiSteps``) with a loss weighting such as FAMO."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from famo_jax.weighting import _base


def linearize_weigh(
    weighting: _base.LossWeighting, losses: ArrayLike, state: _base.State
) -> Callable[[ArrayLike], jax.Array]:
    r"""The weighted loss linearised at the losses of a whole (accumulated) batch.

    With gradient accumulation, one model update averages the gradients of
    :math:`K` equal-size micro-batches. The weighted loss is not linear in the
    task losses (FAMO's weights :math:`w_i = c z_i / (\ell_i - m_i + \epsilon)`
    depend on them), so averaging ``weigh`` over micro-batches would weigh
    each micro-batch by its own losses: not what training on the whole batch
    does. The first-order expansion at the big batch's task losses
    :math:`\bar\ell = \frac1K \sum_j \ell^{(j)}`,

    .. math::
        L_{\bar\ell}(\ell) = \mathrm{weigh}(\bar\ell) + \langle w(\bar\ell),
        \ell - \bar\ell\rangle, \qquad w(\bar\ell) =
        \frac{\partial\,\mathrm{weigh}}{\partial \ell}(\bar\ell) \text{ (no gradient)},

    is linear, so averaging it over the micro-batches gives exactly the value
    :math:`\mathrm{weigh}(\bar\ell)` and the model gradient
    :math:`\sum_i w_i(\bar\ell) \nabla\bar\ell_i` of the big batch.

    Gradient accumulation with a loss weighting, defined this way, equals the
    same training on the big batch (to float rounding):

    1. forward passes only: :math:`\bar\ell` = mean of the micro-batches' task
       losses under the current parameters;
    2. ``micro_weigh = linearize_weigh(weighting, mean_losses, state)``, then for
       each micro-batch the gradient of ``micro_weigh(task_losses(params,
       micro_batch))`` goes to ``optax.MultiSteps(tx, every_k_schedule=K)``,
       which averages them and updates the model on the :math:`K`-th;
    3. ``weighting.update`` once per model update, with big-batch losses: the
       authors' same-batch mode re-evaluates :math:`\bar\ell` on the same
       micro-batches under the new parameters; the lagged mode passes the
       previous update's :math:`\bar\ell` and this one's.

    The weighting's state stays fixed during the :math:`K` micro-steps. Step 1
    costs :math:`K` forward passes (as many as the same-batch mode's extra pass).

    Args:
      weighting: a :class:`~famo_jax.LossWeighting` (FAMO or any other).
      losses: shape ``(num_tasks,)``: the task losses of the whole batch, i.e.
        the mean over its equal-size micro-batches.
      state: the weighting's state.

    Returns:
      ``micro_weigh(micro_losses) -> scalar``: differentiable w.r.t.
      ``micro_losses`` (shape ``(num_tasks,)``), with gradient the fixed
      weights :math:`w(\bar\ell)`; the result has the dtype of ``micro_losses``.

    Raises:
      ValueError, TypeError: at trace time for losses of the wrong shape or
        dtype.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import famo_jax
      >>> weighting = famo_jax.famo(2)
      >>> state = weighting.init()
      >>> micro = jnp.array([[1.0, 10.0], [3.0, 30.0]])  # two micro-batches
      >>> micro_weigh = famo_jax.linearize_weigh(weighting, micro.mean(0), state)
      >>> grads = [jax.grad(micro_weigh)(m) for m in micro]
      >>> (grads[0] + grads[1]) / 2  # = the weights of the big batch's losses
      Array([0.9090909 , 0.09090909], dtype=float32)
      >>> famo_jax.loss_weights(weighting, micro.mean(0), state)
      Array([0.9090909 , 0.09090909], dtype=float32)
    """
    losses = jnp.asarray(losses)
    value, weights = jax.value_and_grad(weighting.weigh)(losses, state)
    value, weights = jax.lax.stop_gradient((value, weights))

    def micro_weigh(micro_losses: ArrayLike) -> jax.Array:
        micro_losses = jnp.asarray(micro_losses)
        if micro_losses.shape != losses.shape:
            raise ValueError(
                f"micro_losses must have the shape of the batch losses {losses.shape}, "
                f"got shape {micro_losses.shape}."
            )
        if not jnp.issubdtype(micro_losses.dtype, jnp.floating):
            raise TypeError(
                f"micro_losses must have a real floating dtype, got {micro_losses.dtype}."
            )
        dtype = jnp.promote_types(micro_losses.dtype, weights.dtype)
        change = micro_losses.astype(dtype) - losses.astype(dtype)
        return (value.astype(dtype) + jnp.dot(weights.astype(dtype), change)).astype(
            micro_losses.dtype
        )

    return micro_weigh
