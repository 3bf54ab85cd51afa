"""The non-negative QP solver (Lawson-Hanson) against scipy's NNLS and the KKT conditions."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from famo_jax import _solvers


@functools.cache
def solver(dtype_name):
    del dtype_name  # one compilation per dtype
    return jax.jit(jax.vmap(_solvers.nonnegative_qp))


def gram_problems(seed, k, kind):
    """``(A, u)``: rows of ``A`` are task gradients; the QP is UPGrad's, ``c = H u``."""
    rng = np.random.default_rng(seed)
    if kind == "random":
        a = rng.standard_normal((k, 2 * k + 3))
    elif kind == "ill_conditioned":  # norms over six orders of magnitude, near-parallel pairs
        a = rng.standard_normal((k, 2 * k + 3)) * 10.0 ** rng.uniform(-3, 3, (k, 1))
        a[1] = a[0] * 2.0 + 1e-3 * rng.standard_normal(a.shape[1]) * np.linalg.norm(a[0])
    elif kind == "rank_deficient":  # more tasks than dimensions
        a = rng.standard_normal((k, max(1, k // 3)))
    else:  # degenerate: a zero, a parallel and an opposite gradient
        a = rng.standard_normal((k, 2 * k + 3))
        a[1] = 0.0
        a[2 % k] = -0.5 * a[0]
        a[-1] = 3.0 * a[0]
    u = rng.uniform(0.0, 1.0, k)
    return a, u


def nnls_reference(a, u):
    """min_{x >= 0} 1/2 |A^T (x + u)|^2 = 1/2 x^T H x + (H u)^T x by scipy's NNLS, float64."""
    x, _ = scipy.optimize.nnls(a.T, -a.T @ u, maxiter=50 * len(u))
    return x


KINDS = ["random", "ill_conditioned", "rank_deficient", "degenerate"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [2, 5, 12])
def test_nonnegative_qp_matches_scipy_nnls_in_float64(kind, k):
    problems = [gram_problems(seed, k, kind) for seed in range(6)]
    with jax.enable_x64(True):
        hessians = np.stack([a @ a.T for a, _ in problems])
        linear = np.stack([h @ u for h, (_, u) in zip(hessians, problems, strict=True)])
        xs = np.asarray(solver("float64")(jnp.asarray(hessians), jnp.asarray(linear)))
    for (a, u), x in zip(problems, xs, strict=True):
        reference = nnls_reference(a, u)
        # The minimiser is unique in A^T x (not in x when A is rank deficient).
        scale = np.linalg.norm(a.T @ (u + reference)) + np.linalg.norm(a) * np.abs(u).max()
        np.testing.assert_allclose(a.T @ x, a.T @ reference, atol=1e-9 * scale)
        assert np.all(x >= 0)


@pytest.mark.parametrize("kind", KINDS)
def test_nonnegative_qp_satisfies_the_kkt_conditions_in_float32(kind):
    k = 8
    problems = [gram_problems(100 + seed, k, kind) for seed in range(8)]
    # Unit-diagonal coordinates, as the dual-cone projections use them.
    hessians, linear = [], []
    for a, u in problems:
        norms = np.linalg.norm(a, axis=1)
        norms = np.where(norms > 0, norms, 1.0)
        h = (a @ a.T) / np.outer(norms, norms) + 1e-4 * np.eye(k)
        hessians.append(h)
        linear.append(h @ (u * norms / np.linalg.norm(norms)))
    hessians, linear = np.asarray(hessians, np.float32), np.asarray(linear, np.float32)
    xs = np.asarray(solver("float32")(jnp.asarray(hessians), jnp.asarray(linear)), np.float64)
    for h, c, x in zip(hessians.astype(np.float64), linear.astype(np.float64), xs, strict=True):
        gradient = h @ x + c
        tol = 1e-4 * (1.0 + np.abs(x).sum())
        assert np.all(x >= 0)
        assert np.all(gradient >= -tol), gradient  # dual feasibility
        np.testing.assert_allclose(x * gradient, 0.0, atol=tol)  # complementarity
        reference = scipy.optimize.minimize(
            lambda v, h=h, c=c: 0.5 * v @ h @ v + c @ v,
            np.zeros(k),
            jac=lambda v, h=h, c=c: h @ v + c,
            bounds=[(0, None)] * k,
            method="L-BFGS-B",
            options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 10_000},
        ).x
        objective = lambda v, h=h, c=c: 0.5 * v @ h @ v + c @ v
        assert objective(x) <= objective(reference) + 1e-5 * (1 + abs(objective(reference)))


def test_nonnegative_qp_of_a_zero_or_non_conflicting_problem_is_zero():
    h = jnp.array([[1.0, 0.2], [0.2, 1.0]])
    chex.assert_trees_all_equal(_solvers.nonnegative_qp(h, jnp.array([0.5, 0.1])), jnp.zeros(2))
    chex.assert_trees_all_equal(
        _solvers.nonnegative_qp(jnp.zeros((3, 3)), jnp.zeros(3)), jnp.zeros(3)
    )


def test_nonnegative_qp_closed_form_for_two_variables():
    # min 1/2 x^T H x + c^T x: with c = (-1, 1) only x_1 moves, to -c_1 / H_11.
    h = jnp.array([[4.0, 1.0], [1.0, 2.0]])
    x = _solvers.nonnegative_qp(h, jnp.array([-1.0, 1.0]))
    np.testing.assert_allclose(np.asarray(x), [0.25, 0.0], rtol=1e-6)
    # Both move: x = -H^-1 c when that is positive.
    c = jnp.array([-1.0, -1.0])
    np.testing.assert_allclose(
        np.asarray(_solvers.nonnegative_qp(h, c)),
        np.linalg.solve(np.asarray(h), [1.0, 1.0]),
        rtol=1e-6,
    )
