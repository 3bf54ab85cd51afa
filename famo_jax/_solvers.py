"""Pure-JAX solvers for the small ``k x k`` subproblems of the gradient aggregators.

MGDA's min-norm point, CAGrad's dual and Nash-MTL's bargaining weights are
problems over ``k`` task weights defined by the Gram matrix ``A = G G^T`` of
the task gradients. They are solved here with Newton-type methods whose loops
are ``jax.lax.while_loop`` with a fixed iteration cap, so they run under
``jit`` and ``vmap`` (no scipy, cvxpy or host callbacks):

* :func:`min_norm_weights` and :func:`cagrad_weights` minimise a smooth convex
  function over the probability simplex with a primal-dual interior-point
  method (Mehrotra predictor-corrector on the KKT conditions, globalised by a
  line search on a barrier merit function). Each iteration factorises one
  ``k x k`` symmetric positive definite system (Cholesky after a diagonal
  rescaling), ``O(k^3)``; a solve takes about 5-30 iterations, at most 60 (the
  degenerate problems whose optimum is zero use the most).
* :func:`nash_mtl_weights` solves ``A alpha = 1 / alpha`` (``alpha > 0``) as the
  unique minimiser of the strictly convex, self-concordant function
  ``alpha^T A alpha / 2 - sum(log(alpha))`` with damped Newton steps.

All inputs are rescaled to a unit-sized problem first (the Gram matrix of
``1e15``-sized gradients gives the same weights as that of unit gradients), and
every solver returns finite weights for any finite Gram matrix, including the
degenerate ones (zero, identical or exactly opposing gradients).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

# Fraction of the distance to the boundary of the positive orthant that an
# interior-point step may cover (keeps iterates strictly positive).
_STEP_TO_BOUNDARY = 0.99
_IPM_MAX_ITERS = 60
_NEWTON_MAX_ITERS = 100
_LINE_SEARCH_STEPS = 30


def _unit_scale(gram: jax.Array) -> jax.Array:
    """The mean squared task-gradient norm (or 1 if all gradients are zero)."""
    scale = jnp.mean(jnp.diagonal(gram))
    return jnp.where(scale > 0, scale, jnp.ones_like(scale))


def _spd_factor(matrix: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Cholesky factor of ``D^-1/2 M D^-1/2`` (``D = diag(M)``) and ``D^1/2``.

    The diagonal rescaling makes the interior-point systems, whose diagonals span
    many orders of magnitude near convergence, well conditioned enough for a
    Cholesky factorisation. A ridge of a few ulps absorbs the rounding errors that
    make a positive semi-definite block look slightly indefinite; if that is not
    enough (nearly parallel gradients in float32) the factorisation is redone
    with a ridge of ``sqrt(eps)``, which only perturbs the Newton direction.
    """
    k = matrix.shape[-1]
    eps = jnp.finfo(matrix.dtype).eps
    root_diag = jnp.sqrt(jnp.diagonal(matrix))
    scaled = matrix / root_diag[:, None] / root_diag[None, :]
    scaled = 0.5 * (scaled + scaled.T)
    eye = jnp.eye(k, dtype=matrix.dtype)
    chol = jnp.linalg.cholesky(scaled + 16 * eps * eye)
    fallback = jnp.linalg.cholesky(scaled + jnp.sqrt(eps) * eye)
    chol = jnp.where(jnp.all(jnp.isfinite(chol)), chol, fallback)
    return chol, root_diag


def _spd_solve(factor: tuple[jax.Array, jax.Array], rhs: jax.Array) -> jax.Array:
    chol, root_diag = factor
    solution = jax.scipy.linalg.cho_solve((chol, True), rhs / root_diag)
    return solution / root_diag


def _max_step(x: jax.Array, dx: jax.Array) -> jax.Array:
    """The largest ``t <= 1`` with ``x + t dx >= 0`` (``x > 0``)."""
    ratios = jnp.where(dx < 0, -x / jnp.where(dx < 0, dx, -1), jnp.inf)
    return jnp.minimum(1.0, jnp.min(ratios)).astype(x.dtype)


def simplex_interior_point(
    value_grad_hessian: Callable[[jax.Array], tuple[jax.Array, jax.Array, jax.Array]],
    value: Callable[[jax.Array], jax.Array],
    num_tasks: int,
    dtype,
    max_iters: int = _IPM_MAX_ITERS,
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
        factor = _spd_factor(hess + jnp.diag(z / w))
        inv_ones = _spd_solve(factor, jnp.ones_like(w))

        def direction(complementarity):
            # Newton step with dz eliminated: (H + Z/W) dw - dnu 1 = rhs.
            rhs = -dual_residual - complementarity / w
            x = _spd_solve(factor, rhs)
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


def _check_gram(gram: jax.Array) -> tuple[jax.Array, int]:
    gram = jnp.asarray(gram)
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be a square (k, k) matrix, got shape {gram.shape}.")
    if not jnp.issubdtype(gram.dtype, jnp.floating):
        raise TypeError(f"gram must have a floating dtype, got {gram.dtype}.")
    gram = gram.astype(jnp.promote_types(gram.dtype, jnp.float32))
    return gram, gram.shape[0]


def nan_unless_finite(gram: jax.Array, weights: jax.Array) -> jax.Array:
    """NaN weights when the Gram matrix is not finite (a non-finite gradient)."""
    return jnp.where(jnp.all(jnp.isfinite(gram)), weights, jnp.nan)


def finite_or_identity(gram: jax.Array) -> jax.Array:
    # Solve a harmless problem in place of a non-finite one so that loops stay
    # bounded and no NaN reaches the iterates; the result is masked afterwards.
    return jnp.where(jnp.all(jnp.isfinite(gram)), gram, jnp.eye(gram.shape[0], dtype=gram.dtype))


def min_norm_weights(gram: jax.Array, *, max_iters: int = _IPM_MAX_ITERS) -> jax.Array:
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
    gram, k = _check_gram(gram)
    if k == 1:
        return nan_unless_finite(gram, jnp.ones((1,), gram.dtype))
    safe = finite_or_identity(gram)
    scaled = safe / _unit_scale(safe)

    def value(w):
        return 0.5 * jnp.dot(w, scaled @ w)

    def value_grad_hessian(w):
        aw = scaled @ w
        return 0.5 * jnp.dot(w, aw), aw, scaled

    w = simplex_interior_point(value_grad_hessian, value, k, gram.dtype, max_iters)
    return nan_unless_finite(gram, w)


def cagrad_objective_terms(gram: jax.Array, c: float) -> tuple[jax.Array, jax.Array]:
    r"""``(b, cc)`` of CAGrad's dual ``min_w b^T w + cc sqrt(w^T A w + 1e-8)``.

    As in the authors' code: ``b = A 1 / k`` and ``cc = c sqrt(mean(A) + 1e-8)
    + 1e-8``.
    """
    b = jnp.mean(gram, axis=1)
    cc = c * jnp.sqrt(jnp.mean(gram) + 1e-8) + 1e-8
    return b, cc


def cagrad_weights(gram: jax.Array, c: float, *, max_iters: int = _IPM_MAX_ITERS) -> jax.Array:
    r"""The minimiser of CAGrad's dual over the simplex, as in the authors' code.

    .. math::
        \min_{w \in \Delta_k} \; w^\top A \mathbf 1 / k
            + c_c \sqrt{w^\top A w + 10^{-8}}, \qquad
        c_c = c \sqrt{\mathrm{mean}(A) + 10^{-8}} + 10^{-8}.

    The objective is divided by ``s = mean(diag(A))`` before solving (the
    minimiser is unchanged): ``b/s``, ``cc/sqrt(s)`` and ``1e-8/s`` in the square
    root.

    Args:
      gram: the ``(k, k)`` Gram matrix ``A``.
      c: CAGrad's ``c >= 0``.
      max_iters: cap on the interior-point iterations.

    Returns:
      ``(k,)`` weights on the simplex. NaN if ``gram`` is not finite.
    """
    gram, k = _check_gram(gram)
    if k == 1:
        return nan_unless_finite(gram, jnp.ones((1,), gram.dtype))
    safe = finite_or_identity(gram)
    b, cc = cagrad_objective_terms(safe, c)
    scale = _unit_scale(safe)
    scaled = safe / scale
    b = b / scale
    cc = cc / jnp.sqrt(scale)
    offset = 1e-8 / scale

    def value(w):
        return jnp.dot(b, w) + cc * jnp.sqrt(jnp.maximum(jnp.dot(w, scaled @ w), 0.0) + offset)

    def value_grad_hessian(w):
        aw = scaled @ w
        root = jnp.sqrt(jnp.maximum(jnp.dot(w, aw), 0.0) + offset)
        grad = b + cc * aw / root
        hess = (cc / root) * (scaled - jnp.outer(aw, aw) / root**2)
        return jnp.dot(b, w) + cc * root, grad, hess

    w = simplex_interior_point(value_grad_hessian, value, k, gram.dtype, max_iters)
    return nan_unless_finite(gram, w)


def nash_mtl_weights(
    gram: jax.Array,
    init: jax.Array,
    *,
    max_iters: int = _NEWTON_MAX_ITERS,
    tol: float = 1e-3,
) -> tuple[jax.Array, jax.Array]:
    r"""Nash-MTL's bargaining weights: ``alpha > 0`` with ``A alpha = 1 / alpha``.

    The equation is the stationarity condition of the strictly convex,
    self-concordant function

    .. math::
        \phi(\alpha) = \tfrac12 \alpha^\top A \alpha - \sum_i \log \alpha_i ,

    which is minimised with damped Newton steps (step ``1 / (1 + lambda)`` while
    the Newton decrement ``lambda >= 1/4``, full steps after; the damped step
    keeps ``alpha > 0``), starting from ``init``. A solution exists iff ``phi``
    is bounded below; it does not, for example, when two task gradients are
    exactly opposite or one is zero (then no direction improves every task).

    Args:
      gram: the ``(k, k)`` Gram matrix, usually already normalised (Nash-MTL's
        authors divide it by its Frobenius norm).
      init: ``(k,)`` positive starting point (the previous solution).
      max_iters: cap on the Newton iterations.
      tol: acceptance threshold on ``max_i |alpha_i (A alpha)_i - 1|``.

    Returns:
      ``(alpha, converged)``. When the iteration did not reach ``tol`` (no
      solution, or not within ``max_iters``) or ``gram`` is not finite,
      ``alpha`` is ``init`` and ``converged`` is False.
    """
    gram, k = _check_gram(gram)
    init = jnp.asarray(init, gram.dtype)
    finite = jnp.all(jnp.isfinite(gram)) & jnp.all(jnp.isfinite(init)) & jnp.all(init > 0)
    safe = jnp.where(finite, gram, jnp.eye(k, dtype=gram.dtype))
    start = jnp.where(finite, init, jnp.ones_like(init))

    def phi(alpha):
        return 0.5 * jnp.dot(alpha, safe @ alpha) - jnp.sum(jnp.log(alpha))

    def rescaled(alpha):
        # The best multiple of alpha: phi(s alpha) is minimised at s^2 = k / alpha.A.alpha.
        quadratic = jnp.dot(alpha, safe @ alpha)
        factor = jnp.sqrt(k / jnp.where(quadratic > 0, quadratic, k))
        return alpha * factor

    # Start from the better of the previous solution and the solution for
    # orthogonal gradients, 1 / |g_i|: the damped phase of Newton's method takes
    # about (phi(start) - phi*) / 0.08 steps, which the latter keeps small when
    # the gradient norms differ by orders of magnitude.
    diagonal = jnp.diagonal(safe)
    orthogonal = jnp.where(
        diagonal > 0, 1.0 / jnp.sqrt(jnp.where(diagonal > 0, diagonal, 1.0)), 1.0
    )
    candidates = (rescaled(start), rescaled(orthogonal))
    start = jnp.where(phi(candidates[0]) <= phi(candidates[1]), candidates[0], candidates[1])
    decrement_tol = jnp.finfo(gram.dtype).eps ** 1.5

    def cond(carry):
        it, _, done = carry
        return (it < max_iters) & ~done

    def body(carry):
        it, alpha, _ = carry
        grad = safe @ alpha - 1.0 / alpha
        factor = _spd_factor(safe + jnp.diag(1.0 / alpha**2))
        newton = _spd_solve(factor, grad)
        decrement = jnp.sqrt(jnp.maximum(jnp.dot(grad, newton), 0.0))
        step = jnp.where(decrement >= 0.25, 1.0 / (1.0 + decrement), 1.0)
        new = alpha - step * newton
        ok = jnp.all(jnp.isfinite(new)) & jnp.all(new > 0)
        alpha = jnp.where(ok, new, alpha)
        return it + 1, alpha, ~ok | (decrement**2 <= decrement_tol)

    _, alpha, _ = jax.lax.while_loop(
        cond, body, (jnp.zeros((), jnp.int32), start, jnp.zeros((), bool))
    )
    residual = jnp.max(jnp.abs(alpha * (safe @ alpha) - 1.0))
    converged = finite & (residual <= tol) & jnp.all(jnp.isfinite(alpha))
    return jnp.where(converged, alpha, init), converged
