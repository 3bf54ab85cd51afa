"""The pure-JAX simplex solvers against scipy on random, ill-conditioned and degenerate problems.

Every problem is defined by a Gram matrix ``A = G G^T`` of ``k`` task gradients.
Problems of the same size are solved in one ``jit(vmap(...))`` call, in float64
(inside ``jax.enable_x64``) and in float32. References: the exact min-norm point
by enumerating supports (``k <= 6``), scipy's SLSQP on the scaled problem from
several starts, and scipy's BFGS for Nash-MTL.

Tolerance on objectives: ``f - f_ref <= 1e-5 |f_ref| + floor * s`` with ``s`` the
mean squared gradient norm. The floor only matters when the optimum is zero
(a hull containing zero: opposing or zero gradients), where a relative test is
meaningless: ``1e-12`` in float64 and ``1e-6`` in float32, whose Gram matrix
itself is rounded at ``~1e-7 s``. Since our weights are feasible, ``f >= f*``
holds automatically, so a one-sided test against a feasible reference bounds
the distance to the optimum.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from famo_jax import _solvers
from famo_jax.aggregation._cagrad import _dual_weights as cagrad_dual_weights
from tests._compat import enable_x64

C = 0.4

# ---------------------------------------------------------------------------
# Problems.


def gradient_cases(k, seed=0):
    """Named (k, m) task-gradient matrices: random, ill-conditioned, degenerate."""
    rng = np.random.default_rng((seed, k))
    m = 20 if k < 20 else 2 * k
    cases = {
        "random": rng.standard_normal((k, m)),
        "norms_1e-3_to_1e3": rng.standard_normal((k, m)) * np.logspace(-3, 3, k)[:, None],
        "nearly_collinear": np.ones((k, m)) + 1e-3 * rng.standard_normal((k, m)),
        "more_tasks_than_dims": rng.standard_normal((k, 2)),
        "one_zero": rng.standard_normal((k, m)) * (np.arange(k) > 0)[:, None],
        "all_zero": np.zeros((k, m)),
        "identical": np.tile(rng.standard_normal((1, m)), (k, 1)),
        "opposing": np.concatenate(
            [rng.standard_normal((1, m)) * [[1.0], [-1.0]], rng.standard_normal((k - 2, m))]
        ),
        "one_dominant": rng.standard_normal((k, m)) * np.r_[1e4, np.ones(k - 1)][:, None],
    }
    if k == 2:
        del cases["more_tasks_than_dims"]  # the same as "random" in 2-D
    return cases


def gram_batch(cases, dtype):
    """Stacked Gram matrices rounded to dtype, as NumPy arrays, and as float64."""
    grams = np.stack([g @ g.T for g in cases.values()])
    rounded = np.asarray(grams, np.dtype(dtype))
    return rounded, rounded.astype(np.float64)


def scale_of(gram):
    return max(float(np.mean(np.diag(gram))), 1e-300)


SMALL_SIZES = [2, 5]
DTYPES = {"float64": (jnp.float64, 1e-12), "float32": (jnp.float32, 1e-6)}


@functools.cache
def batched(solver):
    """One jitted, vmapped function per solver (jit caches by function identity)."""
    return jax.jit(jax.vmap(solver))


def solve_batch(solver, *arrays):
    """Solves a NumPy batch in its dtype (float64 inside ``jax.enable_x64``)."""
    with enable_x64(arrays[0].dtype == np.float64):
        out = batched(solver)(*map(jnp.asarray, arrays))
        return jax.tree.map(np.asarray, out)


# ---------------------------------------------------------------------------
# References.


def min_norm_objective(gram, w):
    return float(w @ gram @ w)


def min_norm_gradient(gram, w):
    return 2.0 * gram @ w


def cagrad_terms(gram, c=C):
    return gram.mean(axis=1), c * np.sqrt(gram.mean() + 1e-8) + 1e-8


def cagrad_objective(gram, w):
    b, cc = cagrad_terms(gram)
    return float(b @ w + cc * np.sqrt(max(w @ gram @ w, 0.0) + 1e-8))


def cagrad_gradient(gram, w):
    b, cc = cagrad_terms(gram)
    return b + cc * gram @ w / np.sqrt(max(w @ gram @ w, 0.0) + 1e-8)


def exact_min_norm(gram):
    """Exact min-norm value by enumerating supports (equality-constrained KKT on each)."""
    k = gram.shape[0]
    best = np.inf
    for size in range(1, k + 1):
        for support in itertools.combinations(range(k), size):
            sub = gram[np.ix_(support, support)]
            kkt = np.block([[sub, -np.ones((size, 1))], [np.ones((1, size)), np.zeros((1, 1))]])
            rhs = np.r_[np.zeros(size), 1.0]
            w_s = np.linalg.lstsq(kkt, rhs, rcond=None)[0][:size]
            if np.all(w_s >= -1e-12) and abs(w_s.sum() - 1) < 1e-9:
                w = np.zeros(k)
                w[list(support)] = np.clip(w_s, 0, None) / np.clip(w_s, 0, None).sum()
                best = min(best, min_norm_objective(gram, w))
    return best


def slsqp_minimum(objective, gradient, gram):
    """Best SLSQP value over several starts, on the problem divided by its scale."""
    k = gram.shape[0]
    scale = scale_of(gram)
    starts = [np.full(k, 1.0 / k)] + [0.9 * np.eye(k)[i] + 0.1 / k for i in range(min(k, 3))]
    best = np.inf
    for start in starts:
        result = scipy.optimize.minimize(
            lambda w: objective(gram, w) / scale,
            start,
            jac=lambda w: gradient(gram, w) / scale,
            method="SLSQP",
            bounds=[(0.0, 1.0)] * k,
            constraints={"type": "eq", "fun": lambda w: np.sum(w) - 1.0},
            options={"ftol": 1e-15, "maxiter": 1000},
        )
        w = np.clip(result.x, 0.0, None)
        best = min(best, objective(gram, w / w.sum()))
    return best


@functools.cache
def reference_minima(kind, k, dtype_name):
    dtype, _ = DTYPES[dtype_name]
    _, grams = gram_batch(gradient_cases(k), dtype)
    if kind == "min_norm":
        if k <= 6:
            reference = exact_min_norm
        else:
            reference = functools.partial(slsqp_minimum, min_norm_objective, min_norm_gradient)
    else:
        reference = functools.partial(slsqp_minimum, cagrad_objective, cagrad_gradient)
    return np.array([reference(gram) for gram in grams])


def frank_wolfe_gap(gradient, w):
    """``f(w) - f*`` is at most this, for a convex ``f`` over the simplex."""
    return float(gradient @ w - np.min(gradient))


def nnls_min_norm(gram):
    """The min-norm value by scipy's NNLS with the simplex equality as a heavy row."""
    k = gram.shape[0]
    eigenvalues, eigenvectors = np.linalg.eigh(gram)
    factor = eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))  # gram = F F^T
    weight = 1e4 * np.sqrt(scale_of(gram))
    system = np.vstack([factor.T, weight * np.ones((1, k))])
    target = np.r_[np.zeros(k), weight]
    u, _ = scipy.optimize.nnls(system, target, maxiter=50 * k)
    w = u / u.sum()
    return min_norm_objective(gram, w)


def assert_on_simplex(weights, atol):
    assert np.all(np.isfinite(weights))
    assert np.all(weights >= 0)
    np.testing.assert_allclose(weights.sum(axis=-1), 1.0, atol=atol)


# ---------------------------------------------------------------------------
# MGDA's min-norm point and CAGrad's dual.

SOLVERS = {
    "min_norm": (_solvers.min_norm_weights, min_norm_objective, min_norm_gradient),
    "cagrad": (functools.partial(cagrad_dual_weights, c=C), cagrad_objective, cagrad_gradient),
}


@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
@pytest.mark.parametrize("k", SMALL_SIZES)
@pytest.mark.parametrize("kind", sorted(SOLVERS))
def test_simplex_solvers_reach_the_reference_optimum(kind, k, dtype_name):
    dtype, floor = DTYPES[dtype_name]
    solver, objective, _ = SOLVERS[kind]
    cases = gradient_cases(k)
    grams, grams64 = gram_batch(cases, dtype)
    weights = solve_batch(solver, grams).astype(np.float64)
    assert_on_simplex(weights, atol=10 * np.finfo(dtype).eps)
    references = reference_minima(kind, k, dtype_name)
    for name, gram, w, reference in zip(cases, grams64, weights, references, strict=True):
        value = objective(gram, w)
        tolerance = 1e-5 * abs(reference) + floor * scale_of(gram)
        assert value - reference <= tolerance, (name, value, reference)


@pytest.mark.parametrize("kind", sorted(SOLVERS))
def test_simplex_solvers_on_100_tasks(kind):
    # SLSQP takes minutes at this size. The float64 solution is certified by its
    # Frank-Wolfe gap, a rigorous bound on f - f*; the float32 solution of the
    # same (rounded) problem is compared with the lower bound f - gap it gives;
    # MGDA's value is also checked against scipy's NNLS.
    solver, objective, gradient = SOLVERS[kind]
    cases = gradient_cases(100)
    grams32, _ = gram_batch(cases, jnp.float32)
    grams = np.stack([g @ g.T for g in cases.values()])
    weights64 = solve_batch(solver, grams)
    weights32 = solve_batch(solver, grams32).astype(np.float64)
    assert_on_simplex(weights64, atol=1e-12)
    assert_on_simplex(weights32, atol=1e-5)
    for name, gram, w64, w32 in zip(cases, grams, weights64, weights32, strict=True):
        scale = scale_of(gram)
        value = objective(gram, w64)
        gap = frank_wolfe_gap(gradient(gram, w64), w64)
        assert gap <= 1e-5 * abs(value) + 1e-12 * scale, (name, value, gap)
        lower_bound = value - gap
        # w32 solves the float32-rounded problem, within ~1e-7 s of this one.
        assert objective(gram, w32) - lower_bound <= 1e-5 * abs(lower_bound) + 1e-6 * scale, name
        if kind == "min_norm":
            reference = nnls_min_norm(gram)
            assert value - reference <= 1e-5 * abs(reference) + 1e-12 * scale, (name, reference)


def test_min_norm_matches_the_two_task_closed_form():
    # For two tasks the min-norm weight on g1 is clip(<g2 - g1, g2> / |g1 - g2|^2, 0, 1).
    rng = np.random.default_rng(3)
    grads = rng.standard_normal((8, 2, 5)) * rng.uniform(0.1, 10.0, (8, 2, 1))
    grams = np.einsum("bim,bjm->bij", grads, grads)
    diff = grams[:, 0, 0] - 2 * grams[:, 0, 1] + grams[:, 1, 1]
    expected = np.clip((grams[:, 1, 1] - grams[:, 0, 1]) / diff, 0.0, 1.0)
    weights = solve_batch(_solvers.min_norm_weights, grams)
    np.testing.assert_allclose(weights[:, 0], expected, rtol=1e-7, atol=1e-9)


CAGRAD_C0 = functools.partial(cagrad_dual_weights, c=0.0)


def test_cagrad_with_c_zero_picks_the_gradient_least_aligned_with_the_mean():
    # With c = 0 the dual is linear (up to the 1e-8 terms): min_w <w, A 1/k>.
    rng = np.random.default_rng(4)
    grads = rng.standard_normal((8, 4, 6))
    grams = np.einsum("bim,bjm->bij", grads, grads)
    weights = solve_batch(CAGRAD_C0, grams)
    np.testing.assert_array_equal(np.argmax(weights, axis=1), np.argmin(grams.mean(axis=2), axis=1))


def test_simplex_solvers_give_nan_for_a_non_finite_gram_matrix():
    gram = jnp.eye(3).at[1, 2].set(jnp.nan).at[2, 1].set(jnp.nan)
    for solver, _, _ in SOLVERS.values():
        assert np.all(np.isnan(np.asarray(jax.jit(solver)(gram))))
    inf_gram = jnp.eye(3).at[0, 0].set(jnp.inf)
    assert np.all(np.isnan(np.asarray(jax.jit(_solvers.min_norm_weights)(inf_gram))))


def test_simplex_solvers_accept_one_task_and_reject_bad_shapes():
    one = jnp.array([[4.0]])
    for solver, _, _ in SOLVERS.values():
        np.testing.assert_array_equal(solver(one), [1.0])
        with pytest.raises(ValueError, match="square"):
            solver(jnp.ones((2, 3)))
    with pytest.raises(TypeError, match="floating"):
        _solvers.min_norm_weights(jnp.eye(2, dtype=jnp.int32))


# ---------------------------------------------------------------------------
# Nash-MTL: A alpha = 1 / alpha.


def nash_reference(gram):
    """BFGS on phi(exp(y)) = exp(y).A.exp(y) / 2 - sum(y), or None if unbounded."""
    k = gram.shape[0]

    def phi(y):
        alpha = np.exp(y)
        return 0.5 * alpha @ gram @ alpha - np.sum(y)

    def grad(y):
        alpha = np.exp(y)
        return alpha * (gram @ alpha) - 1.0

    result = scipy.optimize.minimize(
        phi, np.zeros(k), jac=grad, method="BFGS", options={"gtol": 1e-11}
    )
    alpha = np.exp(result.x)
    return alpha if np.max(np.abs(alpha * (gram @ alpha) - 1.0)) < 1e-6 else None


NASH_SOLVABLE = ["random", "norms_1e-3_to_1e3", "identical", "one_dominant"]
NASH_UNSOLVABLE = ["one_zero", "all_zero", "opposing"]


@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
@pytest.mark.parametrize("k", [2, 5, 100])
def test_nash_mtl_weights_solve_the_bargaining_equation(k, dtype_name):
    dtype, _ = DTYPES[dtype_name]
    cases = gradient_cases(k)
    names = NASH_SOLVABLE + NASH_UNSOLVABLE
    grams = np.stack([cases[name] @ cases[name].T for name in names])
    # As in the authors' code, the Gram matrix is divided by its Frobenius norm.
    norms = np.linalg.norm(grams, axis=(1, 2), keepdims=True)
    grams = np.asarray(grams / np.where(norms > 0, norms, 1.0), np.dtype(dtype))
    init = np.tile(np.linspace(0.5, 2.0, k), (len(names), 1)).astype(grams.dtype)
    alpha, converged = solve_batch(_solvers.nash_bargaining_weights, grams, init)
    alpha, grams = alpha.astype(np.float64), grams.astype(np.float64)
    assert np.all(np.isfinite(alpha)) and np.all(alpha > 0)
    residual_tol, rtol = (1e-8, 1e-7) if dtype == jnp.float64 else (1e-5, 1e-4)
    for i, name in enumerate(names):
        if name in NASH_SOLVABLE:
            assert converged[i], name
            # The optimality condition alpha_i (A alpha)_i = 1, and scipy's solution.
            np.testing.assert_allclose(alpha[i] * (grams[i] @ alpha[i]), 1.0, rtol=residual_tol)
            np.testing.assert_allclose(alpha[i], nash_reference(grams[i]), rtol=rtol, err_msg=name)
        else:
            # No solution (the hull of the gradients contains zero): the previous
            # weights come back untouched, as in the authors' code.
            assert not converged[i], name
            np.testing.assert_array_equal(alpha[i], init[i])


def test_nash_mtl_weights_reject_non_finite_input_and_keep_the_start():
    init = jnp.array([1.0, 2.0])
    bad = jnp.array([[1.0, jnp.nan], [jnp.nan, 1.0]])
    alpha, converged = jax.jit(_solvers.nash_bargaining_weights)(bad, init)
    assert not bool(converged)
    np.testing.assert_array_equal(alpha, init)
