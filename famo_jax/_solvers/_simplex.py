"""Minimising a smooth convex function over the probability simplex, in pure JAX.

MGDA's min-norm point, CAGrad's dual and other aggregators' subproblems are
problems over ``k`` task weights defined by the Gram matrix ``A = G G^T`` of
the task gradients. :func:`simplex_interior_point` solves them with a
primal-dual interior-point method whose loop is a ``jax.lax.while_loop`` with
a fixed iteration cap, so it runs under ``jit`` and ``vmap`` (no scipy, cvxpy
or host callbacks): Mehrotra predictor-corrector on the KKT conditions,
globalised by a line search on a barrier merit function. Each iteration
factorises one ``k x k`` symmetric positive definite system (Cholesky after a
diagonal rescaling), ``O(k^3)``; a solve takes about 5-30 iterations, at most
60 (the degenerate problems whose optimum is zero use the most).

Inputs are rescaled to a unit-sized problem first (the Gram matrix of
``1e15``-sized gradients gives the same weights as that of unit gradients), and
the solvers return finite weights for any finite Gram matrix, including the
degenerate ones (zero, identical or exactly opposing gradients).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from famo_jax import _numerics
from famo_jax._solvers._spd import spd_factor, spd_solve

# Fraction of the distance to the boundary of the positive orthant that an
# interior-point step may cover (keeps iterates strictly positive).
_STEP_TO_BOUNDARY = 0.99
IPM_MAX_ITERS = 60
_LINE_SEARCH_STEPS = 30


def unit_scale(gram: jax.Array) -> jax.Array:
    """The mean squared task-gradient norm (or 1 if all gradients are zero)."""
    scale = jnp.mean(jnp.diagonal(gram))
    return jnp.where(scale > 0, scale, jnp.ones_like(scale))


def _max_step(x: jax.Array, dx: jax.Array) -> jax.Array:
    """The largest ``t <= 1`` with ``x + t dx >= 0`` (``x > 0``)."""
    ratios = jnp.where(dx < 0, -x / jnp.where(dx < 0, dx, -1), jnp.inf)
    return jnp.minimum(1.0, jnp.min(ratios)).astype(x.dtype)


def simplex_interior_point(
    value_grad_hessian: Callable[[jax.Array], tuple[jax.Array, jax.Array, jax.Array]],
    value: Callable[[jax.Array], jax.Array],
    num_tasks: int,
    dtype,
    max_iters: int = IPM_MAX_ITERS,
) -> jax.Array:
    r"""Minimises a smooth convex ``f`` over the probability simplex.

    Primal-dual interior-point method on the KKT conditions

    .. math::
        \nabla f(w) - z - \nu \mathbf 1 = 0, \quad \mathbf 1^\top w = 1, \quad
        w \odot z = 0, \quad w, z \ge 0.

    Each iteration takes Mehrotra's predictor-corrector direction towards the
    centring target :math:`\sigma\mu` and backtracks along it until the barrier
    merit :math:`f(w) - \sigma\mu \sum_i \log w_i` decreases enough (Armijo);
    when the corrector is not a descent direction of the merit the plain Newton
    direction (always one) is used. The line search makes the method converge on
    non-quadratic objectives whose curvature changes quickly (CAGrad's square
    root near zero), where the undamped iteration can cycle.

    Args:
      value_grad_hessian: ``w -> (f(w), grad f(w), hess f(w))``.
      value: ``w -> f(w)`` (used by the line search on a batch of points).
      num_tasks: ``k``.
      dtype: the floating dtype of the iterates.
      max_iters: cap on the number of iterations.

    Returns:
      ``w`` of shape ``(k,)`` on the simplex (entries ``>= 0`` summing to one).
    """
    k = num_tasks
    eps = jnp.finfo(dtype).eps
    gap_tol = eps**3
    residual_tol = 32 * eps
    shrink = 0.5 ** jnp.arange(_LINE_SEARCH_STEPS, dtype=dtype)

    w0 = jnp.full((k,), 1.0 / k, dtype)
    _, grad0, _ = value_grad_hessian(w0)
    z0 = jnp.ones((k,), dtype)
    nu0 = jnp.mean(grad0) - 1.0

    def cond(carry):
        it, _, _, _, done = carry
        return (it < max_iters) & ~done

    def body(carry):
        it, w, z, nu, _ = carry
        f, grad, hess = value_grad_hessian(w)
        dual_residual = grad - z - nu
        primal_residual = jnp.sum(w) - 1.0
        gap = jnp.dot(w, z) / k
        scale = 1.0 + jnp.max(jnp.abs(grad))
        converged = (gap <= gap_tol * scale) & (
            jnp.max(jnp.abs(dual_residual)) <= residual_tol * scale
        )
        factor = spd_factor(hess + jnp.diag(z / w))
        inv_ones = spd_solve(factor, jnp.ones_like(w))

        def direction(complementarity):
            # Newton step with dz eliminated: (H + Z/W) dw - dnu 1 = rhs.
            rhs = -dual_residual - complementarity / w
            x = spd_solve(factor, rhs)
            dnu = (-primal_residual - jnp.sum(x)) / jnp.sum(inv_ones)
            dw = x + dnu * inv_ones
            dz = (-complementarity - z * dw) / w
            return dw, dz, dnu

        dw_aff, dz_aff, _ = direction(w * z)
        step_w, step_z = _max_step(w, dw_aff), _max_step(z, dz_aff)
        gap_aff = jnp.dot(w + step_w * dw_aff, z + step_z * dz_aff) / k
        sigma = jnp.clip((gap_aff / gap) ** 3, 0.0, 1.0)
        target = sigma * gap
        plain = direction(w * z - target)
        corrected = direction(w * z + dw_aff * dz_aff - target)
        # Directional derivatives along directions that sum to zero: centring the
        # gradient removes its common part, whose rounding errors would swamp them.
        merit_grad = grad - target / w
        merit_grad = merit_grad - jnp.mean(merit_grad)
        use_corrected = jnp.dot(merit_grad, corrected[0]) < 0
        dw, dz, dnu = jax.tree.map(lambda a, b: jnp.where(use_corrected, a, b), corrected, plain)
        slope = jnp.dot(merit_grad, dw)
        step_max = _STEP_TO_BOUNDARY * jnp.minimum(_max_step(w, dw), _max_step(z, dz))
        steps = step_max * shrink
        candidates = w[None, :] + steps[:, None] * dw[None, :]
        positive = jnp.all(candidates > 0, axis=1)
        safe_candidates = jnp.where(positive[:, None], candidates, w[None, :])

        def merit(x):
            return value(x) - target * jnp.sum(jnp.log(x))

        merit_now = f - target * jnp.sum(jnp.log(w))
        merits = jax.vmap(merit)(safe_candidates)
        # Accept rounding-level increases so that the last digits can still move.
        slack = 16 * eps * (jnp.abs(merit_now) + jnp.abs(f) + target * jnp.sum(jnp.abs(jnp.log(w))))
        accept = positive & (merits <= merit_now + 1e-4 * steps * slope + slack)
        accept = accept & jnp.isfinite(merits)
        first = jnp.argmax(accept)
        step = steps[first]
        ok = jnp.any(accept) & (slope < 0)
        w_new, z_new, nu_new = w + step * dw, z + step * dz, nu + step * dnu
        # Rounding in the (near-singular) Newton systems lets sum(w) drift, which
        # would corrupt the merit comparisons; dividing keeps w on the simplex.
        w_new = w_new / jnp.sum(w_new)
        ok = (
            ok
            & jnp.all(jnp.isfinite(w_new))
            & jnp.all(jnp.isfinite(z_new))
            & jnp.isfinite(nu_new)
            & jnp.all(w_new > 0)
            & jnp.all(z_new > 0)
        )
        w = jnp.where(ok, w_new, w)
        z = jnp.where(ok, z_new, z)
        nu = jnp.where(ok, nu_new, nu)
        # No acceptable step (rounding breakdown at the end of the path) stops the
        # loop at the last good iterate.
        return it + 1, w, z, nu, ~ok | converged

    init = (jnp.zeros((), jnp.int32), w0, z0, nu0, jnp.zeros((), bool))
    _, w, _, _, _ = jax.lax.while_loop(cond, body, init)
    # Exact feasibility: the entries that the barrier kept at ~1e-10 go to zero.
    w = jnp.where(w > eps * jnp.max(w), w, 0.0)
    return w / jnp.sum(w)


def check_gram(gram: jax.Array) -> tuple[jax.Array, int]:
    gram = jnp.asarray(gram)
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be a square (k, k) matrix, got shape {gram.shape}.")
    if not jnp.issubdtype(gram.dtype, jnp.floating):
        raise TypeError(f"gram must have a floating dtype, got {gram.dtype}.")
    gram = gram.astype(jnp.promote_types(gram.dtype, jnp.float32))
    return gram, gram.shape[0]


def min_norm_weights(gram: jax.Array, *, max_iters: int = IPM_MAX_ITERS) -> jax.Array:
    r"""The weights of the min-norm point of the convex hull of the task gradients.

    Solves MGDA's subproblem (Sener & Koltun, 2018)

    .. math::
        \min_{w \in \Delta_k} \; w^\top A w = \Big\|\sum_i w_i g_i\Big\|^2 .

    Args:
      gram: the ``(k, k)`` Gram matrix ``A`` (symmetric positive semi-definite).
      max_iters: cap on the interior-point iterations.

    Returns:
      ``(k,)`` weights on the simplex, in at least float32. NaN if ``gram`` is
      not finite.
    """
    gram, k = check_gram(gram)
    if k == 1:
        return _numerics.nan_unless_finite(gram, jnp.ones((1,), gram.dtype))
    safe = _numerics.finite_or_identity(gram)
    scaled = safe / unit_scale(safe)

    def value(w):
        return 0.5 * jnp.dot(w, scaled @ w)

    def value_grad_hessian(w):
        aw = scaled @ w
        return 0.5 * jnp.dot(w, aw), aw, scaled

    w = simplex_interior_point(value_grad_hessian, value, k, gram.dtype, max_iters)
    return _numerics.nan_unless_finite(gram, w)
