r"""FairGrad: alpha-fair resource allocation between tasks (Ban & Ji, ICML 2024)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from famo_jax import _checks, _numerics, _solvers
from famo_jax._solvers import spd_solve_in_xla_ops
from famo_jax.aggregation import _base

FAIRGRAD_MAX_ITERS = 100
_LINE_SEARCH_STEPS = 30
_STEP_TO_BOUNDARY = 0.99


def fairgrad_weights(
    gram: jax.Array, alpha: float = 1.0, *, max_iters: int = FAIRGRAD_MAX_ITERS
) -> jax.Array:
    r"""FairGrad's weights :math:`w > 0` with :math:`A w = w^{-1/\alpha}` (element-wise).

    The equation is the stationarity condition of the strictly convex

    .. math::
        F(w) = \tfrac12 w^\top A w - \sum_i \phi(w_i), \qquad
        \phi'(w) = w^{-1/\alpha}

    (:math:`\phi = \log` for :math:`\alpha = 1`, where FairGrad is Nash-MTL
    without its normalisation), minimised here by Newton's method with a
    backtracking line search, in the coordinates :math:`w_i = z_i
    \|g_i\|^{-2\alpha/(1+\alpha)}` (:math:`z = 1` solves orthogonal
    gradients), in which the problem is scaled alike for every task whatever
    the gradients' norms. Two safeguards make every finite Gram matrix give
    finite weights:

    - tasks with a zero gradient (or whose contribution is below the compute
      dtype's rounding next to the others') get weight 0; the others solve the
      equation without them, which is the limit TorchJD's solver approaches
      (it drives such a weight to large values without changing the output);
    - :math:`16\varepsilon\, \mathrm{diag}(A)` is added to :math:`A`
      (:math:`\varepsilon` the machine epsilon), so that the equation has a
      solution when it has none otherwise (two opposite gradients, or zero in
      the convex hull of the gradients); the weights then grow to about
      :math:`\varepsilon^{-\alpha/(1+\alpha)}` times their usual size, their
      output tending to its limit (zero for two opposite gradients). For
      other inputs this moves the weights by about :math:`\varepsilon` relative.

    Args:
      gram: ``(k, k)`` Gram matrix.
      alpha: the fairness parameter :math:`\alpha \ge 0`; 0 gives the mean
        weights :math:`1/k` (as in TorchJD).
      max_iters: cap on the Newton iterations.

    Returns:
      ``(k,)`` non-negative weights (NaN if the Gram matrix is not finite).

    Example:
      >>> import jax.numpy as jnp
      >>> from famo_jax.aggregation import fairgrad_weights
      >>> gram = jnp.array([[1.0, 0.0], [0.0, 4.0]])  # orthogonal: |g_i|^(-2a / (1 + a))
      >>> [round(w, 4) for w in fairgrad_weights(gram, alpha=1.0).tolist()]
      [1.0, 0.5]
      >>> [round(w, 3) for w in fairgrad_weights(gram, alpha=2.0).tolist()]
      [1.0, 0.397]
    """
    alpha = float(_checks.check_nonnegative("alpha", alpha))
    max_iters = _checks.check_int("max_iters", max_iters)
    gram, k = _solvers.check_gram(gram)
    if alpha == 0:
        return _numerics.nan_unless_finite(gram, jnp.full((k,), 1.0 / k, gram.dtype))
    dtype = gram.dtype
    eps = jnp.finfo(dtype).eps
    safe = _numerics.finite_or_identity(gram)
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(safe), 0.0))
    nonzero = norms > 0
    log_norms = jnp.log(jnp.where(nonzero, norms, 1.0))
    # r_i = |g_i|^((1 - alpha)/(1 + alpha)) is task i's contribution |w_i g_i| for
    # orthogonal gradients; rho = r / max(r), computed in logs against overflow.
    log_r = (1.0 - alpha) / (1.0 + alpha) * log_norms
    log_rho = log_r - jnp.max(jnp.where(nonzero, log_r, -jnp.inf))
    rho = jnp.where(nonzero, jnp.exp(log_rho), 0.0)
    active = rho > eps
    rho = jnp.where(active, rho, 0.0)
    inv_norms = jnp.where(active, 1.0 / jnp.where(active, norms, 1.0), 0.0)
    cosines = safe * inv_norms[:, None] * inv_norms[None, :]
    ridge = 16 * eps
    quadratic = rho[:, None] * (cosines + ridge * jnp.eye(k, dtype=dtype)) * rho[None, :]
    barrier = rho**2  # the weights of phi(z_i) in F(z) / max(r)^2
    inactive = (~active).astype(dtype)
    power = 1.0 - 1.0 / alpha

    def phi(z):
        return jnp.log(z) if alpha == 1.0 else z**power / power

    def value(z):
        return 0.5 * jnp.dot(z, quadratic @ z) - jnp.sum(barrier * phi(z))

    # The best multiple of ones: F(s 1) is minimised at s = (b / a)^(alpha / (1 + alpha)).
    a = jnp.sum(quadratic)
    b = jnp.sum(barrier)
    start = (b / jnp.where(a > 0, a, 1.0)) ** (alpha / (1.0 + alpha))
    z0 = jnp.full((k,), jnp.where((a > 0) & jnp.isfinite(start), start, 1.0), dtype)
    shrink = 0.5 ** jnp.arange(_LINE_SEARCH_STEPS, dtype=dtype)
    decrement_tol = eps**1.5 * jnp.maximum(b, 1.0)

    def cond(carry):
        it, _, done = carry
        return (it < max_iters) & ~done

    def body(carry):
        it, z, _ = carry
        grad = quadratic @ z - barrier * z ** (-1.0 / alpha)
        curvature = barrier / alpha * z ** (-1.0 / alpha - 1.0)
        hessian = quadratic + jnp.diag(curvature + inactive)
        # Not spd_factor: two batched LAPACK Cholesky calls at once can deadlock
        # XLA's CPU thread pool under vmap (see famo_jax._solvers._nonnegative_qp).
        newton = -spd_solve_in_xla_ops(hessian, grad)
        newton = jnp.where(active, newton, 0.0)
        slope = jnp.dot(grad, newton)
        # Largest step keeping z > 0, then halvings until F decreases enough (Armijo).
        ratios = jnp.where(newton < 0, -z / jnp.where(newton < 0, newton, -1.0), jnp.inf)
        step_max = jnp.minimum(1.0, _STEP_TO_BOUNDARY * jnp.min(ratios))
        steps = step_max * shrink
        candidates = z[None, :] + steps[:, None] * newton[None, :]
        positive = jnp.all(candidates > 0, axis=1)
        safe_candidates = jnp.where(positive[:, None], candidates, z[None, :])
        values = jax.vmap(value)(safe_candidates)
        current = value(z)
        slack = 16 * eps * (jnp.abs(current) + b)
        accept = (
            positive & jnp.isfinite(values) & (values <= current + 1e-4 * steps * slope + slack)
        )
        step = steps[jnp.argmax(accept)]
        ok = jnp.any(accept) & (slope < 0)
        new = z + step * newton
        ok = ok & jnp.all(jnp.isfinite(new)) & jnp.all(new > 0)
        z = jnp.where(ok, new, z)
        return it + 1, z, ~ok | (-slope <= decrement_tol)

    _, z, _ = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), z0, jnp.zeros((), bool)))
    # Back to the original units: w_i = z_i |g_i|^(-2 alpha / (1 + alpha)).
    log_scale = -2.0 * alpha / (1.0 + alpha) * log_norms
    weights = jnp.where(active, z * jnp.exp(log_scale), 0.0)
    return _numerics.nan_unless_finite(gram, weights)


def fairgrad(
    alpha: float = 1.0, *, max_iters: int = FAIRGRAD_MAX_ITERS
) -> optax.GradientTransformationExtraArgs:
    r"""FairGrad: the update direction of alpha-fair utility maximisation.

    FairGrad treats the first-order improvement :math:`\langle g_i, d\rangle`
    of every task as a utility and picks the direction maximising their
    :math:`\alpha`-fair sum over a ball. Its direction is :math:`d = \sum_i w_i
    g_i` with weights :math:`w > 0` solving

    .. math::
        (A w)_i = w_i^{-1/\alpha} \quad (i = 1, \dots, k), \qquad A = J J^\top ,

    so that :math:`\langle g_i, d\rangle = w_i^{-1/\alpha}`. :math:`\alpha = 0`
    is linear scalarisation, :math:`\alpha = 1` proportional fairness (the
    Nash-MTL equation), :math:`\alpha \to \infty` max-min fairness. The
    equation is solved in pure JAX by Newton's method on a convex function
    whose minimiser it characterises (see
    :func:`famo_jax.aggregation.fairgrad_weights`).

    The authors' code (``FairGrad`` in OptMN-Lab/fairgrad), LibMTL's and
    TorchJD 0.18's ``FairGrad`` solve the equation with
    ``scipy.optimize.least_squares`` from :math:`w = 1/k`, bounds :math:`w \ge
    0`, at scipy's default tolerances (TorchJD passes ``max_nfev``, default
    scipy's ``100 k``); the three agree with each other. Where the equation
    has a solution, the weights here are that solution to the compute dtype's
    precision (scipy's stop at ``ftol=1e-8`` leaves about 1e-6 relative);
    where it has none (a zero gradient, two opposite gradients) scipy's
    answer depends on where its iterations stop, and this port returns the
    limit described in :func:`famo_jax.aggregation.fairgrad_weights` (for
    the checked cases the same output). :math:`\alpha = 0` gives the mean, as
    in TorchJD (the authors' formula divides by zero there).

    Scale convention: the output is :math:`\sum_i w_i g_i`, as in TorchJD and
    LibMTL. It is not homogeneous in the gradients (scaling them by
    :math:`c` scales the output by :math:`c^{(1 - \alpha)/(1 + \alpha)}`, so
    equal task gradients do not give their mean); for ``k = 1`` the output is
    :math:`\|g\|^{-2\alpha/(1+\alpha)} g`. The authors' trainer multiplies the
    output by :math:`k` and clips the shared gradient to norm 1:
    ``optax.chain(famo_jax.fairgrad(alpha), optax.scale(num_tasks),
    optax.clip_by_global_norm(1.0))``.

    Non-finite task gradients: the output is NaN (``optax.apply_if_finite``
    then skips the step); there is no state.

    Cost: :math:`O(k^2 m)` time and :math:`O(k^2)` extra memory for the Gram
    matrix of :math:`m` parameters, :math:`O(k m)` for the weighted sum and
    :math:`O(k^3)` per Newton iteration (about 5-15 iterations; at most
    ``max_iters``, reached only when the equation has no solution).

    Args:
      alpha: the fairness parameter :math:`\alpha \ge 0` (the authors' class
        default 1; their NYU-v2 and Cityscapes scripts use 2, LibMTL and
        TorchJD require it).
      max_iters: cap on the Newton iterations.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update(updates, state,
      params=None)`` takes per-task gradients stacked on a leading axis of size
      ``k`` (or ``ImplicitTaskGradients``) and returns one gradient pytree;
      state ``optax.EmptyState()``.

    Raises:
      ValueError, TypeError: for a negative or non-finite ``alpha`` or a bad
        ``max_iters``.

    Example:
      >>> import jax.numpy as jnp
      >>> import famo_jax
      >>> task_grads = jnp.array([[1.0, 0.0], [0.0, 2.0]])
      >>> tx = famo_jax.fairgrad(alpha=1.0)
      >>> d, _ = tx.update(task_grads, tx.init(None))
      >>> [round(x, 4) for x in d.tolist()]  # <g_i, d> = 1 / w_i: equal contributions
      [1.0, 1.0]

    References:
      Ban and Ji, *Fair Resource Allocation in Multi-Task Learning*, ICML 2024.
      https://arxiv.org/abs/2402.15638 (code: https://github.com/OptMN-Lab/fairgrad)
    """
    alpha = float(_checks.check_nonnegative("alpha", alpha))
    max_iters = _checks.check_int("max_iters", max_iters)
    return _base.gram_weighted(
        _base.stateless(lambda gram: fairgrad_weights(gram, alpha, max_iters=max_iters))
    )
