r"""Convex quadratic programs over the non-negative orthant, in pure JAX.

UPGrad's and DualProj's projections onto the dual cone of the task gradients
(and PCD-type constrained directions) are, in the coordinates of the Gram
matrix, problems of the form

.. math::
    \min_{x \ge 0} \; \tfrac12 x^\top H x + c^\top x ,

with :math:`H = A A^\top` a Gram matrix. :func:`nonnegative_qp` solves them
exactly (up to rounding) with the active-set method of Lawson and Hanson: the
variables are split into a free set, on which the problem is solved without
constraints, and a set held at zero; a variable whose gradient is negative
enters the free set, and a free variable that would turn negative leaves it.
Each iteration factorises one masked ``k x k`` system (``O(k^3)``); the method
stops after finitely many iterations (in practice about as many as there are
free variables at the solution), capped at ``3 k + 10``. The loop is a
``jax.lax.while_loop``, so it runs under ``jit`` and ``vmap``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# The factorisation and the triangular solves are written with XLA's own ops
# (k static steps of a fori_loop each) rather than jnp.linalg.cholesky and
# cho_solve: on the CPU those are LAPACK custom calls that, under vmap, split
# their batch over XLA's intra-op thread pool and block a pool thread until the
# parts are done. Two such calls running at once (a while loop's body has
# independent ones) deadlocked a 2-core machine: both pool threads waited for
# work queued behind them. The QPs here are k x k with small k, so the loops
# cost little.


def _cholesky(matrix: jax.Array, ridge: jax.Array) -> jax.Array:
    """Lower Cholesky factor of ``matrix + ridge I``, pivots floored at ``ridge``."""
    k = matrix.shape[0]
    index = jnp.arange(k)

    def column(j, lower):
        # Columns >= j of `lower` are still zero: lower @ lower[j] sums over p < j.
        residual = matrix[:, j] - lower @ lower[j]
        pivot = jnp.sqrt(jnp.maximum(residual[j] + ridge, ridge))
        values = jnp.where(index > j, residual / pivot, jnp.where(index == j, pivot, 0.0))
        return lower.at[:, j].set(values)

    return jax.lax.fori_loop(0, k, column, jnp.zeros_like(matrix))


def _cholesky_solve(lower: jax.Array, rhs: jax.Array) -> jax.Array:
    """Solves ``L L^T x = rhs`` by forward and backward substitution."""
    k = lower.shape[0]

    def forward(i, y):
        return y.at[i].set((rhs[i] - lower[i] @ y) / lower[i, i])

    y = jax.lax.fori_loop(0, k, forward, jnp.zeros_like(rhs))

    def backward(step, x):
        i = k - 1 - step
        return x.at[i].set((y[i] - lower[:, i] @ x) / lower[i, i])

    return jax.lax.fori_loop(0, k, backward, jnp.zeros_like(rhs))


def spd_solve_in_xla_ops(matrix: jax.Array, rhs: jax.Array) -> jax.Array:
    """Solves a small symmetric positive (semi-)definite system without LAPACK.

    The Cholesky factor of the unit-diagonal rescaling ``D^-1/2 M D^-1/2`` (a
    ridge of 16 eps, pivots floored at it), two triangular solves and one step
    of iterative refinement, all in XLA ops (see above why not LAPACK).
    """
    dtype = matrix.dtype
    root_diag = jnp.sqrt(jnp.maximum(jnp.diagonal(matrix), jnp.finfo(dtype).tiny))
    scaled = matrix / root_diag[:, None] / root_diag[None, :]
    scaled = 0.5 * (scaled + scaled.T)
    # A ridge of a few ulps absorbs rounding that makes a semi-definite block look
    # indefinite; floored pivots keep nearly dependent rows finite.
    lower = _cholesky(scaled, 16 * jnp.finfo(dtype).eps)
    rhs = rhs / root_diag
    solution = _cholesky_solve(lower, rhs)
    # One step of iterative refinement removes the bias of the ridge (a relative
    # 16 eps on every entry otherwise).
    solution = solution + _cholesky_solve(lower, rhs - scaled @ solution)
    return solution / root_diag


def _masked_solve(hessian: jax.Array, rhs: jax.Array, free: jax.Array) -> jax.Array:
    """Solves ``H_FF x_F = rhs_F`` and returns ``x`` with zeros outside ``F``."""
    k = hessian.shape[0]
    both = free[:, None] & free[None, :]
    eye = jnp.eye(k, dtype=hessian.dtype)
    # Outside F the system is the identity, so the solve is one fixed-size Cholesky.
    system = jnp.where(both, hessian, eye)
    solution = spd_solve_in_xla_ops(system, jnp.where(free, rhs, 0.0))
    return jnp.where(free, solution, 0.0)


def nonnegative_qp(
    hessian: jax.Array, linear: jax.Array, *, max_iters: int | None = None
) -> jax.Array:
    r"""Minimises :math:`\tfrac12 x^\top H x + c^\top x` over :math:`x \ge 0`.

    Lawson and Hanson's active-set method (their NNLS algorithm, which is this
    problem for :math:`H = A A^\top`): starting from :math:`x = 0` with no free
    variable, repeatedly

    1. if every variable held at zero has a gradient :math:`(Hx + c)_i \ge
       -\tau`, stop (the KKT conditions hold up to the rounding tolerance
       :math:`\tau`);
    2. otherwise free the variable with the most negative gradient and solve
       the problem restricted to the free set without constraints; while that
       solution :math:`s` has a non-positive free entry, move from :math:`x`
       towards :math:`s` until the first free entry reaches zero, hold it
       there, and solve again.

    In exact arithmetic a freed variable is positive in the next solution and
    the free set's rows of :math:`A` stay linearly independent, so every
    restricted system is positive definite and the method terminates. In
    floating point a freed variable can come out non-positive when its
    gradient was negative only by rounding; the method then stops at the
    current point.

    Args:
      hessian: ``(k, k)`` symmetric positive semi-definite :math:`H`, finite.
      linear: ``(k,)`` :math:`c`.
      max_iters: cap on the iterations (one linear solve each); default
        ``3 k + 10``.

    Returns:
      ``(k,)`` minimiser :math:`x \ge 0`, in the dtype of ``hessian``.
    """
    hessian = jnp.asarray(hessian)
    k = hessian.shape[0]
    dtype = hessian.dtype
    linear = jnp.asarray(linear, dtype)
    max_iters = 3 * k + 10 if max_iters is None else max_iters
    eps = jnp.finfo(dtype).eps
    diagonal = jnp.maximum(jnp.diagonal(hessian), 0.0)
    root_diag = jnp.sqrt(diagonal)

    def tolerance(x):
        # Rounding level of (Hx + c)_i: |c_i| and sum_j |H_ij x_j| <= |g_i| sum_j |g_j| x_j.
        # A variable with a smaller negative gradient is taken as optimal (one with
        # a larger one whose entry fails is caught by the rounding stop below).
        magnitude = jnp.abs(linear) + root_diag * jnp.dot(root_diag, jnp.abs(x))
        return 4 * k * eps * magnitude

    def cond(carry):
        it, _, _, _, done = carry
        return (it < max_iters) & ~done

    def body(carry):
        it, x, free, entered, _ = carry
        s = _masked_solve(hessian, -linear, free)
        feasible = jnp.all(jnp.where(free, s > 0, True)) & jnp.all(jnp.isfinite(s))

        # Feasible: move to s, then free the most violated variable held at zero.
        gradient = hessian @ s + linear
        violation = jnp.where(free, 0.0, -gradient - tolerance(s))
        best = jnp.argmax(violation)
        optimal = violation[best] <= 0
        free_feasible = free.at[best].set(free[best] | ~optimal)

        # Infeasible: step towards s until a free entry reaches zero and hold it.
        blocking = free & (s <= 0)
        gap = x - s  # > 0 where blocking, unless x is at zero too (then the step is 0)
        ratios = jnp.where(
            blocking, jnp.where(gap > 0, x / jnp.where(gap > 0, gap, 1.0), 0.0), jnp.inf
        )
        first = jnp.argmin(ratios)
        step = jnp.clip(ratios[first], 0.0, 1.0)
        x_step = jnp.where(free, x + step * (s - x), 0.0)
        held = (~free) | (x_step <= 0) | (jnp.arange(k) == first)
        free_infeasible = free & ~held
        x_step = jnp.where(free_infeasible, x_step, 0.0)
        # The variable just freed came out non-positive: its negative gradient was
        # rounding. Stop at the last feasible point (x, before it was freed).
        rounding = (entered >= 0) & ~feasible & (s[jnp.maximum(entered, 0)] <= 0)

        x_new = jnp.where(feasible, s, jnp.where(rounding, x, x_step))
        free_new = jnp.where(
            feasible,
            free_feasible,
            jnp.where(rounding, free.at[jnp.maximum(entered, 0)].set(False), free_infeasible),
        )
        entered_new = jnp.where(feasible & ~optimal, best, -1).astype(jnp.int32)
        done = (feasible & optimal) | rounding
        return it + 1, x_new, free_new, entered_new, done

    init = (
        jnp.zeros((), jnp.int32),
        jnp.zeros((k,), dtype),
        jnp.zeros((k,), bool),
        -jnp.ones((), jnp.int32),
        jnp.zeros((), bool),
    )
    _, x, _, _, _ = jax.lax.while_loop(cond, body, init)
    return x


def dual_cone_weights(
    gram: jax.Array, preferences: jax.Array, *, norm_eps: float, reg_eps: float
) -> jax.Array:
    r"""Weights of the projections of :math:`J^\top u` onto the dual cone of the rows of :math:`J`.

    The dual cone of the task gradients is :math:`\{d : \langle g_i, d\rangle
    \ge 0 \ \forall i\}`. By Proposition 1 of Quinton and Rey (2024), the
    projection of :math:`J^\top u` onto it is :math:`J^\top v` with

    .. math::
        v = \arg\min_{v \ge u} v^\top A v ,

    where :math:`A = J J^\top` is the Gram matrix. As in TorchJD's
    ``QuadprogProjector``, :math:`A` is first divided by its trace (replaced by
    zero when the trace is below ``norm_eps``, which leaves :math:`v = u`) and
    ``reg_eps`` is added to its diagonal, giving :math:`A'`. With :math:`v = u
    + x` the problem is the non-negative QP :math:`\min_{x \ge 0} \tfrac12
    x^\top A' x + (A' u)^\top x`, solved by :func:`nonnegative_qp` in the
    coordinates :math:`y_i = x_i \sqrt{A'_{ii}}`, whose matrix has a unit
    diagonal (the cosine matrix when ``reg_eps = 0``), so that a constraint
    counts the same whatever the norm of its gradient (the constraint of a
    task gradient of norm 1e-15 next to one of norm 1e15 is as binding as any
    other, though its diagonal entry of :math:`A'` underflows in float32).

    Args:
      gram: ``(k, k)`` Gram matrix, finite.
      preferences: ``(..., k)`` vectors :math:`u` (one projection each).
      norm_eps: traces below it make the normalised Gram matrix zero.
      reg_eps: added to the diagonal of the normalised Gram matrix.

    Returns:
      ``(..., k)`` weights :math:`v` (same shape as ``preferences``).
    """
    k = gram.shape[0]
    dtype = gram.dtype
    squared_norms = jnp.maximum(jnp.diagonal(gram), 0.0)
    trace = jnp.sum(squared_norms)
    usable = (trace >= norm_eps) & (trace > 0)
    trace = jnp.where(usable, trace, 1.0)
    # sqrt(A'_ii) = q_i / sqrt(trace), computed without forming A'_ii (which
    # underflows for gradients much smaller than the largest).
    q = jnp.sqrt(squared_norms + reg_eps * trace)
    movable = q > 0  # a zero gradient without ridge constrains nothing
    inv_q = jnp.where(movable, 1.0 / jnp.where(movable, q, 1.0), 0.0)
    scaled = gram * inv_q[:, None] * inv_q[None, :]
    eye = jnp.eye(k, dtype=dtype)
    mask = movable[:, None] & movable[None, :]
    scaled = jnp.where(eye > 0, 1.0, jnp.where(mask, scaled, 0.0))
    root_trace = jnp.sqrt(trace)
    flat = preferences.reshape(-1, k)

    def project(u):
        linear = jnp.where(movable, scaled @ (u * q / root_trace), 0.0)
        y = nonnegative_qp(scaled, linear)
        v = u + jnp.where(movable, y * root_trace * inv_q, 0.0)
        # Below norm_eps TorchJD's matrix is reg_eps * I: v = max(u, 0) (u if no ridge).
        fallback = jnp.maximum(u, 0.0) if reg_eps > 0 else u
        return jnp.where(usable, v, fallback)

    return jax.vmap(project)(flat).reshape(preferences.shape)
