"""Nash-MTL: multi-task learning as a bargaining game (Navon et al., ICML 2022)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from famo_jax import _checks, _numerics, _solvers
from famo_jax.aggregation import _base


class NashMTLState(NamedTuple):
    """State of :func:`nash_mtl`.

    Attributes:
      alpha: ``(num_tasks,)`` float32: the last bargaining weights (in the
        authors' units, for the Gram matrix divided by its Frobenius norm),
        used as the warm start, reused between weight updates and as the
        fallback when no solution is found. They start at ones, as in the
        authors' code. Shape ``(0,)`` when :func:`nash_mtl` was built without
        ``num_tasks``: every solve then starts from ones and falls back to ones.
      num_updates: ``()`` int32: updates whose weights were solved for (or
        reused between solves, with ``update_weights_every > 1``).
      num_skipped: ``()`` int32: updates for which no solution was found (no
        direction improves every task, a non-finite gradient, or no
        convergence within ``max_iters``), so the previous weights were used.
        The weights are recomputed when ``(num_updates + num_skipped) %
        update_weights_every == 0``.
    """

    alpha: jax.Array
    num_updates: jax.Array
    num_skipped: jax.Array


def nash_mtl_weights(
    gram: jax.Array,
    init: jax.Array | None = None,
    *,
    max_iters: int = _solvers.NEWTON_MAX_ITERS,
    tol: float = 1e-3,
) -> tuple[jax.Array, jax.Array]:
    r"""Nash-MTL's bargaining weights :math:`\alpha` from the Gram matrix.

    Solves :math:`\hat A \alpha = 1 / \alpha` (element-wise, :math:`\alpha >
    0`) for the Gram matrix divided by its Frobenius norm, :math:`\hat A = A /
    \|A\|_F`, as the authors normalise it, starting from ``init``. See
    :func:`famo_jax.aggregation.nash_mtl` for the method.

    Args:
      gram: ``(k, k)`` Gram matrix of the task gradients.
      init: ``(k,)`` positive starting point, usually the previous solution;
        default ones.
      max_iters: cap on the Newton iterations.
      tol: acceptance threshold on :math:`\max_i |\alpha_i (\hat A\alpha)_i - 1|`.

    Returns:
      ``(alpha, converged)``: when no solution was found (or ``gram`` is not
      finite) ``alpha`` is ``init`` and ``converged`` is False.

    Example:
      >>> import jax.numpy as jnp
      >>> from famo_jax.aggregation import nash_mtl_weights
      >>> alpha, converged = nash_mtl_weights(jnp.array([[1.0, 0.0], [0.0, 4.0]]))
      >>> [round(a, 4) for a in alpha.tolist()], bool(converged)  # 17 ** 0.25 * [1, 1/2]
      ([2.0305, 1.0153], True)
    """
    gram, k = _solvers.check_gram(gram)
    init = jnp.ones((k,), gram.dtype) if init is None else jnp.asarray(init, gram.dtype)
    frobenius = jnp.sqrt(jnp.sum(gram**2))
    normalized = gram / jnp.where(frobenius > 0, frobenius, 1.0)
    return _solvers.nash_bargaining_weights(normalized, init, max_iters=max_iters, tol=tol)


def nash_mtl(
    num_tasks: int | None = None,
    update_weights_every: int = 1,
    max_iters: int = 100,
    tol: float = 1e-3,
) -> optax.GradientTransformationExtraArgs:
    r"""Nash-MTL: the Nash bargaining solution between the tasks.

    Nash-MTL takes the direction :math:`d` in a small ball that maximises
    :math:`\sum_i \log \langle g_i, d\rangle` (the Nash bargaining solution:
    scale-invariant, every task improves). It is :math:`d = \sum_i \alpha_i
    g_i` with :math:`\alpha > 0` solving

    .. math::
        G G^\top \alpha = 1 / \alpha \quad \text{(element-wise)},

    with the Gram matrix divided by its Frobenius norm, as in the authors' code.
    The authors approximate the solution with up to 20 convex problems solved by
    cvxpy/ECOS (stopping when :math:`\|A\alpha - 1/\alpha\| < 10^{-3}`). Here
    the equation is solved in pure JAX as the minimiser of the strictly convex
    :math:`\tfrac12 \alpha^\top A \alpha - \sum_i \log\alpha_i` with damped
    Newton steps, warm-started from the previous weights (see
    :func:`famo_jax.aggregation.nash_mtl_weights`), and accepted when
    :math:`\max_i |\alpha_i (A\alpha)_i - 1| \le` ``tol``. As in the authors'
    code, if no solution is found (it does not exist when the convex hull of
    the gradients contains zero, for example with a zero or two exactly
    opposite task gradients) the previous weights are used.

    Supported options of the authors' ``NashMTL``: ``update_weights_every``
    (the weights are recomputed every that many updates and reused in
    between; this needs ``num_tasks``). Their ``max_norm=1.0`` clips the shared
    gradient of their trainer; add ``optax.clip_by_global_norm`` after the sum
    rescaling below. Their ``optim_niter`` (iterations of the convex
    approximations) has no counterpart: ``max_iters`` caps the Newton
    iterations instead.

    Scale convention: the output is :math:`\frac1k \sum_i \alpha_i g_i`, on the
    scale of the *mean* of the task gradients (equal task gradients give
    :math:`\alpha = 1` and exactly that gradient). The authors' trainer uses
    :math:`\sum_i \alpha_i g_i` (sum convention):
    ``optax.chain(famo_jax.nash_mtl(), optax.scale(num_tasks),
    optax.clip_by_global_norm(1.0))`` reproduces it. For ``k = 1`` the output is
    the task gradient.

    Non-finite task gradients: the output is NaN (so ``optax.apply_if_finite``
    skips the step) and ``alpha`` is kept; the update is counted in ``num_skipped``.

    Cost: :math:`O(k^2 m)` time and :math:`O(k^2)` extra memory for the Gram
    matrix of :math:`m` parameters (skipped between weight updates),
    :math:`O(k m)` for the weighted sum and :math:`O(k^3)` per Newton iteration.

    Args:
      num_tasks: the number of tasks :math:`k`. Needed to keep the weights in
        the state (warm starts, fallbacks to the previous weights,
        ``update_weights_every > 1``); without it every solve starts from, and
        falls back to, ones.
      update_weights_every: recompute the weights every that many updates
        (the authors' default is 1).
      max_iters: cap on the Newton iterations of a solve.
      tol: acceptance threshold on :math:`\max_i |\alpha_i (A\alpha)_i - 1|`.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update(updates, state,
      params=None)`` takes per-task gradients stacked on a leading axis of size
      ``k`` and returns one gradient pytree; state :class:`NashMTLState`.

    Example:
      >>> import jax.numpy as jnp
      >>> import famo_jax
      >>> task_grads = jnp.array([[1.0, 0.0], [0.0, 2.0]])
      >>> tx = famo_jax.nash_mtl(num_tasks=2)
      >>> d, state = tx.update(task_grads, tx.init(None))
      >>> [round(x, 4) for x in d.tolist()]  # orthogonal: alpha_i ~ 1 / |g_i|, equal contributions
      [1.0153, 1.0153]
      >>> [round(x, 4) for x in state.alpha.tolist()]  # 17 ** 0.25 * [1, 1/2]
      [2.0305, 1.0153]

    References:
      Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik and Fetaya,
      *Multi-Task Learning as a Bargaining Game*, ICML 2022.
      https://arxiv.org/abs/2202.01017 (code: https://github.com/AvivNavon/nash-mtl)
    """
    if num_tasks is not None:
        num_tasks = _checks.check_num_tasks(num_tasks)
    update_weights_every = _checks.check_int("update_weights_every", update_weights_every)
    max_iters = _checks.check_int("max_iters", max_iters)
    if update_weights_every > 1 and num_tasks is None:
        raise ValueError(
            f"update_weights_every={update_weights_every} reuses the weights between "
            "updates, so nash_mtl needs num_tasks to keep them in its state."
        )
    tol = float(_checks.check_nonnegative("tol", tol))
    keeps_alpha = num_tasks is not None

    def init():
        alpha = jnp.ones((num_tasks if keeps_alpha else 0,), jnp.float32)
        zero = jnp.zeros((), jnp.int32)
        return NashMTLState(alpha=alpha, num_updates=zero, num_skipped=zero)

    def next_weights(gram_fn, k, dtype, state):
        # gram_fn computes the Gram matrix only in the branch that solves, so
        # that updates reusing the weights skip its O(k^2 m) cost.
        if keeps_alpha and k != num_tasks:
            raise ValueError(
                f"nash_mtl was built for num_tasks={num_tasks}, got task gradients with a "
                f"leading axis of size {k}."
            )
        previous = state.alpha.astype(dtype) if keeps_alpha else jnp.ones((k,), dtype)

        def solve(previous):
            gram = gram_fn()
            alpha, converged = nash_mtl_weights(gram, previous, max_iters=max_iters, tol=tol)
            return _numerics.nan_unless_finite(gram, alpha / k), alpha, converged

        def reuse(previous):
            return previous / k, previous, jnp.ones((), bool)

        if update_weights_every == 1:
            weights, alpha, converged = solve(previous)
        else:
            step = state.num_updates + state.num_skipped
            weights, alpha, converged = jax.lax.cond(
                step % update_weights_every == 0, solve, reuse, previous
            )
        num_updates, num_skipped = _numerics.counters_after(
            converged, state.num_updates, state.num_skipped
        )
        new_state = NashMTLState(
            alpha=alpha.astype(state.alpha.dtype) if keeps_alpha else state.alpha,
            num_updates=num_updates,
            num_skipped=num_skipped,
        )
        return weights, new_state

    def init_fn(params):
        del params
        alpha = jnp.ones((num_tasks if keeps_alpha else 0,), jnp.float32)
        zero = jnp.zeros((), jnp.int32)
        return NashMTLState(alpha=alpha, num_updates=zero, num_skipped=zero)

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        k = _base.num_tasks_of(updates)
        dtype = _base.compute_dtype(updates)
        weights, state = next_weights(lambda: _base.gram_matrix(updates, dtype), k, dtype, state)
        return _base.combine(updates, weights), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
