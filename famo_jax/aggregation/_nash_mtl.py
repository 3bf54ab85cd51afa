"""Nash-MTL: multi-task learning as a bargaining game (Navon et al., ICML 2022)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from famo_jax import _checks, _numerics, _solvers
from famo_jax.aggregation import _base


class NashMTLState(NamedTuple):
    r"""State of :func:`nash_mtl`.

    Attributes:
      alpha: ``(num_tasks,)`` float32: the last bargaining weights, in the
        authors' raw units (:math:`\alpha_i (G G^\top \alpha)_i = 1`; with
        ``normalize_gram=True``, for the Gram matrix divided by its Frobenius
        norm), used as the warm start, reused between weight updates and as the
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
    normalize_gram: bool = False,
) -> tuple[jax.Array, jax.Array]:
    r"""Nash-MTL's bargaining weights :math:`\alpha` from the Gram matrix.

    Solves :math:`A \alpha = 1 / \alpha` (element-wise, :math:`\alpha > 0`)
    for the raw Gram matrix :math:`A = G G^\top`, the condition the authors'
    constraints ``-log(alpha_i ||A||_F) - log((A / ||A||_F) alpha)_i <= 0``
    enforce, starting from ``init``. See :func:`famo_jax.aggregation.nash_mtl`
    for the method. Newton's method runs on :math:`\hat A = A / \|A\|_F` (well
    scaled whatever the size of the gradients): its solution :math:`\hat\alpha`
    gives :math:`\alpha = \hat\alpha / \|A\|_F^{1/2}`.

    Args:
      gram: ``(k, k)`` Gram matrix of the task gradients.
      init: ``(k,)`` positive starting point, usually the previous solution (in
        the units of the result); default ones.
      max_iters: cap on the Newton iterations.
      tol: acceptance threshold on :math:`\max_i |\alpha_i (A\alpha)_i - 1|`
        (the same for both units).
      normalize_gram: return :math:`\hat\alpha` (the solution for the Gram
        matrix divided by its Frobenius norm) instead of the authors'
        :math:`\alpha`.

    Returns:
      ``(alpha, converged)``: when no solution was found (or ``gram`` is not
      finite) ``alpha`` is ``init`` and ``converged`` is False.

    Example:
      >>> import jax.numpy as jnp
      >>> from famo_jax.aggregation import nash_mtl_weights
      >>> alpha, converged = nash_mtl_weights(jnp.array([[1.0, 0.0], [0.0, 4.0]]))
      >>> [round(a, 4) for a in alpha.tolist()], bool(converged)  # alpha_i = 1 / |g_i|
      ([1.0, 0.5], True)
      >>> alpha, _ = nash_mtl_weights(jnp.array([[1.0, 0.0], [0.0, 4.0]]), normalize_gram=True)
      >>> [round(a, 4) for a in alpha.tolist()]  # times ||A||_F^(1/2) = 17 ** 0.25
      [2.0305, 1.0153]
    """
    gram, k = _solvers.check_gram(gram)
    if not isinstance(normalize_gram, bool):
        raise TypeError(f"normalize_gram must be a bool, got {normalize_gram!r}.")
    init = jnp.ones((k,), gram.dtype) if init is None else jnp.asarray(init, gram.dtype)
    # ||A||_F with the entries scaled by their largest magnitude first, so that
    # the squares neither overflow nor underflow.
    largest = jnp.max(jnp.abs(gram))
    largest = jnp.where(largest > 0, largest, 1.0)
    frobenius = largest * jnp.sqrt(jnp.sum((gram / largest) ** 2))
    frobenius = jnp.where(frobenius > 0, frobenius, 1.0)
    normalized = gram / frobenius
    if normalize_gram:
        return _solvers.nash_bargaining_weights(normalized, init, max_iters=max_iters, tol=tol)
    # alpha solves A alpha = 1 / alpha iff sqrt(||A||_F) alpha solves the
    # normalised equation, and the residual alpha_i (A alpha)_i - 1 is the same.
    root = jnp.sqrt(frobenius)
    alpha, converged = _solvers.nash_bargaining_weights(
        normalized, init * root, max_iters=max_iters, tol=tol
    )
    return jnp.where(converged, alpha / root, init), converged


def nash_mtl(
    num_tasks: int | None = None,
    update_weights_every: int = 1,
    max_iters: int = 100,
    tol: float = 1e-3,
    normalize_gram: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Nash-MTL: the Nash bargaining solution between the tasks.

    Nash-MTL takes the direction :math:`d` in a ball that maximises
    :math:`\sum_i \log \langle g_i, d\rangle` (the Nash bargaining solution:
    invariant to the scale of each task, every task improves). Its optimality
    condition :math:`\sum_i g_i / \langle g_i, d\rangle = \lambda d` makes
    :math:`d = \sum_i \alpha_i g_i` with :math:`\alpha_i = 1 / (\lambda
    \langle g_i, d\rangle)`, that is :math:`\alpha_i (G G^\top \alpha)_i =
    1/\lambda`. The authors fix :math:`\lambda = 1`: :math:`\alpha > 0` solves

    .. math::
        G G^\top \alpha = 1 / \alpha \quad \text{(element-wise, raw Gram matrix)},

    which is what their constraints ``-log(alpha_i * ||GG^T||_F) -
    log((GG^T / ||GG^T||_F) alpha)_i <= 0`` enforce once tight. Summing
    :math:`\alpha_i (G G^\top\alpha)_i = 1` over the tasks gives the size of
    their update: :math:`\|\sum_i \alpha_i g_i\|^2 = \alpha^\top G G^\top
    \alpha = k`, so :math:`\|\sum_i \alpha_i g_i\| = \sqrt{k}` whatever the size
    of the gradients, and scaling every gradient by :math:`s` scales
    :math:`\alpha` by :math:`1/s`. This is the default.

    ``normalize_gram=True`` instead solves the equation for :math:`G G^\top /
    \|G G^\top\|_F` (what famo_jax computed before it followed the authors'
    units): :math:`\alpha` is then :math:`\|G G^\top\|_F^{1/2}` times the
    authors', the direction is the same, and the update's size :math:`\sqrt{k}\,
    \|G G^\top\|_F^{1/2}` grows linearly with the gradients, as LS's, MGDA's or
    CAGrad's do.

    The authors approximate the solution with up to 20 linearised convex
    problems solved by cvxpy/ECOS. Here the equation is solved in pure JAX as
    the minimiser of the strictly convex :math:`\tfrac12 \alpha^\top A \alpha -
    \sum_i \log\alpha_i` with damped Newton steps, warm-started from the
    previous weights (see :func:`famo_jax.aggregation.nash_mtl_weights`), and
    accepted when :math:`\max_i |\alpha_i (A\alpha)_i - 1| \le` ``tol``. As in
    the authors' code, if no solution is found (it does not exist when the
    convex hull of the gradients contains zero, for example with a zero or two
    exactly opposite task gradients) the previous weights are used.

    Parity with the authors' ``NashMTL`` (``tests/aggregation/test_nash_mtl_parity.py``
    replays fixtures made by running their class): where their iteration
    reaches the bargaining solution (well-scaled random, conflicting, rank
    deficient and duplicated gradients, k = 2 to 20), the weights and the
    update agree to 4e-7 relative in float32, also with ``update_weights_every
    > 1`` and where no solution exists. Their class departs from the solution,
    and this port does not follow it: (i) when its linearisation at the previous
    weights is unbounded (when the previous direction hurts a task of the new
    gradients, when the gradients are small, norms of about 1e-3 and below, or
    when their size jumps by orders of magnitude), it keeps the previous
    weights; (ii) when the previous weights pass its stopping tests,
    which are in normalised units or absolute (equal task gradients keep
    :math:`\alpha = 1`; gradients so large that :math:`\alpha \approx 10^{-5}`
    move less than its ``1e-6``), it keeps them too; (iii) when the task
    gradient norms span a decade or more, its 20 linearised problems stop at
    points 1.2 to 30 times the solution's size and 30 to 72 degrees from its
    direction, which differ between ECOS and CLARABEL (by 1e-4 to 1e19
    relative), so they are an artefact of the approximation that no port can
    match.

    Supported options of the authors' ``NashMTL``: ``update_weights_every``
    (the weights are recomputed every that many updates and reused in
    between; this needs ``num_tasks``; the FAMO repository's copy of the class
    raises ``UnboundLocalError`` at the updates that reuse them, Navon et al.'s
    reuses them as here). Their ``max_norm=1.0`` clips the shared gradient
    after the backward pass in Navon et al.'s trainer (in the FAMO
    repository's copy the clip runs before the backward pass and has no
    effect); add ``optax.clip_by_global_norm`` after the sum rescaling below.
    Their ``optim_niter`` (iterations of the convex approximations) has no
    counterpart: ``max_iters`` caps the Newton iterations instead.

    Scale convention: the output is :math:`\frac1k \sum_i \alpha_i g_i`, on the
    scale of the *mean* of the task gradients, as for every aggregator of the
    library; with the default units its norm is :math:`1/\sqrt{k}` (for
    ``k = 1``, the unit vector of the task gradient). The authors' trainer uses
    :math:`\sum_i \alpha_i g_i` (sum convention, norm :math:`\sqrt{k}`):
    ``optax.chain(famo_jax.nash_mtl(), optax.scale(num_tasks))`` reproduces it
    (followed by ``optax.clip_by_global_norm(1.0)`` for Navon et al.'s clip).

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
      normalize_gram: solve for the Gram matrix divided by its Frobenius norm
        (an update that scales with the gradients) instead of the authors' raw
        units.

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
      >>> [round(x, 4) for x in state.alpha.tolist()]  # orthogonal: alpha_i = 1 / |g_i|
      [1.0, 0.5]
      >>> [round(x, 4) for x in d.tolist()]  # (alpha_1 g_1 + alpha_2 g_2) / 2, norm 1 / sqrt(2)
      [0.5, 0.5]
      >>> tx = famo_jax.nash_mtl(num_tasks=2, normalize_gram=True)
      >>> d, state = tx.update(task_grads, tx.init(None))
      >>> [round(x, 4) for x in d.tolist()]  # same direction, times 17 ** 0.25 = ||GG^T||_F^(1/2)
      [1.0153, 1.0153]

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
    if not isinstance(normalize_gram, bool):
        raise TypeError(f"normalize_gram must be a bool, got {normalize_gram!r}.")
    keeps_alpha = num_tasks is not None

    def next_weights(gram_fn, k, dtype, state):
        # gram_fn computes the Gram matrix only in the branch that solves, so
        # that updates reusing the weights skip its O(k^2 m) cost.
        if num_tasks is not None:
            _base.check_built_num_tasks(k, num_tasks, "nash_mtl")
        previous = state.alpha.astype(dtype) if keeps_alpha else jnp.ones((k,), dtype)

        def solve(previous):
            gram = gram_fn()
            alpha, converged = nash_mtl_weights(
                gram, previous, max_iters=max_iters, tol=tol, normalize_gram=normalize_gram
            )
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
