"""MoCo: multi-objective gradient correction (Fernando et al., ICLR 2023)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from famo_jax import _checks, _numerics
from famo_jax.aggregation import _base, _stacked


class MoCoState(NamedTuple):
    r"""State of :func:`moco`.

    Attributes:
      tracked: the tracked task gradients :math:`y`: a pytree with the
        structure of the parameters given to ``init``, every leaf of shape
        ``(num_tasks, *param.shape)`` in the parameter's dtype promoted to at
        least float32 (LibMTL's ``self.y``, ``(num_tasks, m)``). They start at
        zero. This is :math:`k` times the size of the parameters.
      weights: ``(num_tasks,)`` float32: the task weights :math:`\lambda`
        (LibMTL's ``self.lambd``), starting at :math:`1/k`.
      num_updates: ``()`` int32: applied updates; update :math:`t` (from 1)
        uses the step sizes :math:`\beta / t^{\sigma_\beta}` and :math:`\gamma
        / t^{\sigma_\gamma}` with :math:`t` = ``num_updates + 1``.
      num_skipped: ``()`` int32: updates with non-finite task gradients or
        losses, which left the state unchanged.
    """

    tracked: Any
    weights: jax.Array
    num_updates: jax.Array
    num_skipped: jax.Array


def moco(
    num_tasks: int,
    beta: float = 0.5,
    beta_sigma: float = 0.5,
    gamma: float = 0.1,
    gamma_sigma: float = 0.5,
    rho: float = 0.0,
) -> optax.GradientTransformationExtraArgs:
    r"""MoCo: MGDA-style weights on bias-corrected, tracked task gradients.

    MoCo tracks every task's gradient with a moving average :math:`y_i` (which
    corrects the bias of stochastic MGDA) and moves the task weights
    :math:`\lambda` by one step of a softmax-parametrised descent on
    :math:`\|Y^\top\lambda\|^2`. At update :math:`t = 1, 2, \dots`:

    .. math::
        \hat g_i &= \ell_i\, \frac{g_i}{\|g_i\| + 10^{-8}}, \\
        y_i &\leftarrow y_i - \frac{\beta}{t^{\sigma_\beta}}\,(y_i - \hat g_i), \\
        \lambda &\leftarrow \operatorname{softmax}\Big(\lambda -
            \frac{\gamma}{t^{\sigma_\gamma}}\,(Y Y^\top + \rho I)\,\lambda\Big), \\
        d &= Y^\top \lambda = \textstyle\sum_i \lambda_i y_i .

    This follows LibMTL's ``MoCo`` ("implemented based on the author's sharing
    code"; there is no public code from the authors, and TorchJD has no
    MoCo): the gradients are normalised and multiplied by their task's loss
    before tracking (the paper tracks the raw gradients), the softmax is
    applied to :math:`\lambda` itself (not to logits), :math:`y` starts at
    zero and :math:`\lambda` at :math:`1/k`, and the defaults are LibMTL's.
    The norm is that of the task's gradient over every aggregated parameter
    (LibMTL: every shared parameter).

    Inputs: ``updates`` (stacked task gradients) and ``losses=`` (the
    ``(k,)`` task losses, an extra argument forwarded by ``optax.chain``).
    MoCo is not Gram-based: its state holds the :math:`k` tracked gradients,
    :math:`O(k m)` memory for :math:`m` parameters (like stacked task
    gradients kept from one step to the next), and ``init`` needs the
    parameters (or a pytree of their shapes).

    Scale convention: the output :math:`\sum_i \lambda_i y_i` (weights on the
    simplex) is used as it is, as in LibMTL. It is *not* on the gradients'
    scale: the tracked gradients are loss-scaled unit vectors, so equal task
    gradients give a positive multiple of that gradient, not the gradient
    (for ``k = 1`` and a constant gradient :math:`g` and loss :math:`\ell`,
    :math:`\ell\,(1 - \prod_s (1 - \beta_s))\, g / \|g\|`).

    Non-finite task gradients or losses: the output is NaN
    (``optax.apply_if_finite`` then skips the step) and the state is kept
    (counted in ``num_skipped``).

    Cost: :math:`O(k m)` time for the normalisation and the tracking,
    :math:`O(k^2 m)` for :math:`Y Y^\top`, :math:`O(k m)` for the output;
    :math:`O(k m)` state.

    Args:
      num_tasks: the number of tasks :math:`k`.
      beta: tracking rate :math:`\beta \in (0, 1]` (``MoCo_beta``).
      beta_sigma: its decay exponent :math:`\sigma_\beta \ge 0`.
      gamma: step size :math:`\gamma \ge 0` of the weights (``MoCo_gamma``).
      gamma_sigma: its decay exponent :math:`\sigma_\gamma \ge 0`.
      rho: :math:`\ell_2` regularisation :math:`\rho \ge 0` of the weights'
        step (``MoCo_rho``).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update(updates, state,
      params=None, *, losses)`` takes per-task gradients stacked on a leading
      axis of size ``k`` and the task losses, and returns one gradient pytree;
      state :class:`MoCoState`.

    Example:
      >>> import jax.numpy as jnp
      >>> import famo_jax
      >>> tx = famo_jax.moco(num_tasks=2)
      >>> params = jnp.zeros(2)
      >>> grads = jnp.array([[3.0, 0.0], [0.0, 2.0]])
      >>> out, state = tx.update(grads, tx.init(params), losses=jnp.array([1.0, 4.0]))
      >>> state.tracked  # beta * loss * g / |g|
      Array([[0.5, 0. ],
             [0. , 2. ]], dtype=float32)
      >>> [round(x, 4) for x in out.tolist()]  # softmax-updated weights on y
      [0.2734, 0.9065]

    References:
      Fernando, Shen, Liu, Chaudhury, Murugesan and Chen, *Mitigating
      Gradient Bias in Multi-objective Learning: A Provably Convergent
      Approach*, ICLR 2023. https://openreview.net/forum?id=dLAYGdKTi2
      (LibMTL: https://github.com/median-research-group/LibMTL/blob/main/LibMTL/weighting/MoCo.py)
    """
    num_tasks = _checks.check_num_tasks(num_tasks)
    beta = float(_checks.check_nonnegative("beta", beta))
    if not 0 < beta <= 1:
        raise ValueError(f"beta must lie in (0, 1], got {beta}.")
    beta_sigma = float(_checks.check_nonnegative("beta_sigma", beta_sigma))
    gamma = float(_checks.check_nonnegative("gamma", gamma))
    gamma_sigma = float(_checks.check_nonnegative("gamma_sigma", gamma_sigma))
    rho = float(_checks.check_nonnegative("rho", rho))

    def init_fn(params):
        zero = jnp.zeros((), jnp.int32)
        return MoCoState(
            tracked=_stacked.zeros_like_stacked(params, num_tasks),
            weights=jnp.full((num_tasks,), 1.0 / num_tasks, jnp.float32),
            num_updates=zero,
            num_skipped=zero,
        )

    def update_fn(updates, state, params=None, *, losses: Any = None, **extra_args):
        del params, extra_args
        _stacked.reject_implicit(updates, "moco", "tracks every task gradient in its state")
        k = _base.num_tasks_of(updates)
        _base.check_built_num_tasks(k, num_tasks, "moco")
        losses = _base.check_losses_extra_arg(losses, k, "moco")
        _stacked.check_like_state(updates, state.tracked, "moco")
        dtype = _base.compute_dtype(updates)
        losses = losses.astype(dtype)
        norms = jnp.sqrt(_stacked.squared_norms(jax.tree.leaves(updates), k, dtype))
        scales = losses / (norms + 1e-8)
        t = (state.num_updates + 1).astype(dtype)
        rate = beta / t**beta_sigma

        def track(y, g):
            target = scales.reshape((k,) + (1,) * (g.ndim - 1)) * g.astype(y.dtype)
            return y - rate.astype(y.dtype) * (y - target)

        tracked = jax.tree.map(track, state.tracked, updates)
        gram = _base.gram_matrix(tracked, dtype)
        weights = state.weights.astype(dtype)
        step = gamma / t**gamma_sigma
        weights = jax.nn.softmax(
            weights - step * ((gram + rho * jnp.eye(k, dtype=dtype)) @ weights)
        )
        valid = jnp.all(jnp.isfinite(gram)) & jnp.all(jnp.isfinite(weights))
        weights = jnp.where(valid, weights, jnp.nan)
        out = jax.tree.map(
            lambda y, g: jnp.tensordot(weights.astype(y.dtype), y, axes=1).astype(g.dtype),
            tracked,
            updates,
        )
        num_updates, num_skipped = _numerics.counters_after(
            valid, state.num_updates, state.num_skipped
        )
        new_state = MoCoState(
            tracked=_numerics.keep_if_valid(valid, tracked, state.tracked),
            weights=jnp.where(valid, weights, state.weights).astype(state.weights.dtype),
            num_updates=num_updates,
            num_skipped=num_skipped,
        )
        return out, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
