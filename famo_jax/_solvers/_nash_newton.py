"""Nash-MTL's bargaining weights: a damped Newton method on a self-concordant function."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from famo_jax._solvers._simplex import check_gram
from famo_jax._solvers._spd import spd_factor, spd_solve

NEWTON_MAX_ITERS = 100


def nash_bargaining_weights(
    gram: jax.Array,
    init: jax.Array,
    *,
    max_iters: int = NEWTON_MAX_ITERS,
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
    gram, k = check_gram(gram)
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
        factor = spd_factor(safe + jnp.diag(1.0 / alpha**2))
        newton = spd_solve(factor, grad)
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
