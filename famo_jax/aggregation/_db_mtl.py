"""DB-MTL: dual-balancing multi-task learning (Lin, Ye, Xu, Shi, Zhang and Kwok, 2023)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from famo_jax import _checks, _numerics
from famo_jax.aggregation import _base, _stacked


class DBMTLState(NamedTuple):
    r"""State of :func:`db_mtl`.

    Attributes:
      grad_buffer: the moving averages :math:`\bar g_i` of the log-loss
        gradients (LibMTL's ``grad_buffer``): a pytree with the structure of the
        parameters given to ``init``, every leaf of shape ``(num_tasks,
        *param.shape)`` in the parameter's dtype promoted to at least float32,
        starting at zero. :math:`k` times the size of the parameters.
      num_updates: ``()`` int32: applied updates; update :math:`t` (from 1)
        uses the rate :math:`\beta / t^{\sigma}` with :math:`t` =
        ``num_updates + 1``.
      num_skipped: ``()`` int32: updates with non-finite task gradients or
        invalid losses, which left the state unchanged.
    """

    grad_buffer: Any
    num_updates: jax.Array
    num_skipped: jax.Array


def db_mtl(
    num_tasks: int, beta: float = 0.9, beta_sigma: float = 0.0
) -> optax.GradientTransformationExtraArgs:
    r"""DB-MTL: log losses for the loss scales, gradients rescaled to the largest norm.

    DB-MTL balances the tasks twice: the losses by taking their logarithm
    (loss-scale balancing: the gradient of :math:`\log \ell_i` is
    :math:`g_i / \ell_i`), and the gradients by rescaling a moving average of
    each task's log-loss gradient to the largest of their norms:

    .. math::
        h_i &= \frac{g_i}{\ell_i + 10^{-8}}, \qquad
        \bar g_i \leftarrow h_i + \frac{\beta}{t^{\sigma}}\,(\bar g_i - h_i), \\
        d &= \frac1k \sum_i \frac{\max_j \|\bar g_j\|}{\|\bar g_i\| + 10^{-8}}\, \bar g_i .

    This follows LibMTL's ``DB_MTL`` (the authors' code): :math:`\bar g` starts
    at zero (no bias correction, so the first update is :math:`(1 - \beta)`
    times the balanced gradients), :math:`\beta = 0.9`, :math:`\sigma = 0`
    (``DB_beta``, ``DB_beta_sigma``), the norms over every aggregated
    parameter (LibMTL: every shared parameter) and the epsilons as there.
    TorchJD has no DB-MTL. The task heads: in LibMTL they get the gradient of
    :math:`\sum_i \log(\ell_i + 10^{-8})`, i.e. each head its own task's
    gradient divided by its loss; :func:`famo_jax.shared_trunk` gives them
    the raw loss gradients (``head_reduction``), so combine it with a
    log-loss objective (for example :func:`famo_jax.scale_invariant`) to
    reproduce that.

    Inputs: ``updates`` (stacked task gradients of the losses themselves) and
    ``losses=`` (the ``(k,)`` task losses, an extra argument forwarded by
    ``optax.chain``), by which the gradients are divided. DB-MTL is not
    Gram-based: its state holds the :math:`k` averaged gradients,
    :math:`O(k m)` memory for :math:`m` parameters, and ``init`` needs the
    parameters (or a pytree of their shapes).

    Scale convention: the output is :math:`\frac1k` times LibMTL's sum over
    tasks (divide by the *mean* over tasks; ``optax.chain(famo_jax.db_mtl(k),
    optax.scale(k))`` gives LibMTL's). It is on the scale of the *log-loss*
    gradients, not of the task gradients: equal task gradients :math:`g` with
    equal losses :math:`\ell` give :math:`(1 - \beta) g / \ell` at the first
    update.

    Invalid inputs (non-finite task gradients, losses that are not finite or
    not above :math:`-10^{-8}`): the output is NaN (``optax.apply_if_finite``
    then skips the step) and the state is kept (counted in ``num_skipped``).

    Cost: :math:`O(k m)` time and :math:`O(k m)` state.

    Args:
      num_tasks: the number of tasks :math:`k`.
      beta: the averaging rate :math:`\beta \in [0, 1]`.
      beta_sigma: its decay exponent :math:`\sigma \ge 0`.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update(updates, state,
      params=None, *, losses)`` takes per-task gradients stacked on a leading
      axis of size ``k`` and the task losses, and returns one gradient pytree;
      state :class:`DBMTLState`.

    Example:
      >>> import jax.numpy as jnp
      >>> import famo_jax
      >>> tx = famo_jax.db_mtl(num_tasks=2, beta=0.0)  # no averaging
      >>> grads = jnp.array([[10.0, 0.0], [0.0, 1.0]])
      >>> out, state = tx.update(grads, tx.init(jnp.zeros(2)), losses=jnp.array([5.0, 0.25]))
      >>> [round(x, 4) for x in out.tolist()]  # both log-loss gradients rescaled to norm 4
      [2.0, 2.0]

    References:
      Lin, Ye, Xu, Shi, Zhang and Kwok, *Dual-Balancing for Multi-Task
      Learning*, 2023. https://arxiv.org/abs/2308.12029 (code: LibMTL,
      https://github.com/median-research-group/LibMTL/blob/main/LibMTL/weighting/DB_MTL.py)
    """
    num_tasks = _checks.check_num_tasks(num_tasks)
    beta = float(_checks.check_nonnegative("beta", beta))
    if beta > 1:
        raise ValueError(f"beta must lie in [0, 1], got {beta}.")
    beta_sigma = float(_checks.check_nonnegative("beta_sigma", beta_sigma))

    def init_fn(params):
        zero = jnp.zeros((), jnp.int32)
        return DBMTLState(
            grad_buffer=_stacked.zeros_like_stacked(params, num_tasks),
            num_updates=zero,
            num_skipped=zero,
        )

    def update_fn(updates, state, params=None, *, losses: Any = None, **extra_args):
        del params, extra_args
        _stacked.reject_implicit(updates, "db_mtl", "averages every task gradient in its state")
        k = _base.num_tasks_of(updates)
        _base.check_built_num_tasks(k, num_tasks, "db_mtl")
        losses = _base.check_losses_extra_arg(losses, k, "db_mtl")
        _stacked.check_like_state(updates, state.grad_buffer, "db_mtl")
        dtype = _base.compute_dtype(updates)
        shifted = losses.astype(dtype) + 1e-8
        losses_valid = jnp.all(jnp.isfinite(shifted) & (shifted > 0))
        scales = 1.0 / jnp.where(losses_valid, shifted, 1.0)
        t = (state.num_updates + 1).astype(dtype)
        rate = beta / t**beta_sigma

        def average(buffer, g):
            h = scales.reshape((k,) + (1,) * (g.ndim - 1)).astype(buffer.dtype) * g.astype(
                buffer.dtype
            )
            return h + rate.astype(buffer.dtype) * (buffer - h)

        buffer = jax.tree.map(average, state.grad_buffer, updates)
        norms = jnp.sqrt(_stacked.squared_norms(jax.tree.leaves(buffer), k, dtype))
        weights = jnp.max(norms) / (norms + 1e-8) / k
        valid = losses_valid & jnp.all(jnp.isfinite(norms))
        weights = jnp.where(valid, weights, jnp.nan)
        out = jax.tree.map(
            lambda b, g: jnp.tensordot(weights.astype(b.dtype), b, axes=1).astype(g.dtype),
            buffer,
            updates,
        )
        num_updates, num_skipped = _numerics.counters_after(
            valid, state.num_updates, state.num_skipped
        )
        new_state = DBMTLState(
            grad_buffer=_numerics.keep_if_valid(valid, buffer, state.grad_buffer),
            num_updates=num_updates,
            num_skipped=num_skipped,
        )
        return out, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
