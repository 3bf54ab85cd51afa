"""FairGrad against TorchJD 0.18's, LibMTL's and the authors' scipy solutions."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import famo_jax
from famo_jax import aggregation
from tests.aggregation._flat import PROPERTY_SETTINGS
from tests.aggregation._peer_fixtures import cases_by_num_tasks, grams, load

ALPHAS = (0.5, 1.0, 2.0, 5.0)


@functools.cache
def batched_weights(alpha, k, dtype_name):
    del k, dtype_name  # one compilation per shape and dtype
    return jax.jit(jax.vmap(lambda gram: aggregation.fairgrad_weights(gram, alpha)))


def residuals(weights, gram, alpha):
    """|(A w)_i - w_i^(-1/alpha)| relative to w_i^(-1/alpha), for tasks with w_i > 0."""
    weights = np.asarray(weights, np.float64)
    positive = weights > 0
    target = np.where(positive, np.where(positive, weights, 1.0) ** (-1.0 / alpha), 1.0)
    return np.where(positive, np.abs(gram @ weights - target) / target, 0.0)


def solved(weights, gram, alpha, tol):
    """The equation holds for every task with a non-zero gradient."""
    nonzero = np.diagonal(gram) > 0
    return bool(np.all(residuals(weights, gram, alpha)[nonzero] <= tol))


def replay(alpha, dtype_name):
    """(name, matrix, ours, data) for every fixture case, ours computed in that dtype."""
    data = load("fairgrad")
    with jax.enable_x64(dtype_name == "float64"):
        for k, names in cases_by_num_tasks(data).items():
            gram_batch = grams(data, names, jnp.dtype(dtype_name))
            weights = np.asarray(batched_weights(alpha, k, dtype_name)(gram_batch), np.float64)
            for name, w in zip(names, weights, strict=True):
                yield name, data[f"{name}/J"].astype(np.float64), w, data


@pytest.mark.parametrize("alpha", ALPHAS)
def test_fairgrad_matches_torchjd_in_float64_wherever_scipy_converged(alpha):
    config = f"alpha{alpha:g}"
    compared = 0
    for name, matrix, ours, data in replay(alpha, "float64"):
        gram = matrix @ matrix.T
        nonzero = np.diagonal(gram) > 0
        reference = data[f"{name}/{config}/torchjd_f64_weights"]
        if not solved(reference, gram, alpha, 1e-6):
            continue  # no solution (opposite gradients...) or scipy stopped early
        # Ours solves the equation to rounding; TorchJD's scipy stops at ftol = 1e-8.
        assert solved(ours, gram, alpha, 1e-9), name
        np.testing.assert_allclose(ours[nonzero], reference[nonzero], rtol=1e-6, err_msg=name)
        np.testing.assert_array_equal(ours[~nonzero], 0.0)  # a zero gradient: weight 0
        compared += 1
    assert compared >= 25


@pytest.mark.parametrize("alpha", ALPHAS)
def test_fairgrad_matches_torchjd_in_float32_wherever_scipy_converged(alpha):
    # float32 Newton steps on Hessians with condition numbers up to ~1e4 here
    # (the badly scaled and nearly parallel cases): measured output errors up
    # to 1e-5 of the terms summed (2e-4 relative on the weights of alpha = 5).
    config = f"alpha{alpha:g}"
    for name, matrix, ours, data in replay(alpha, "float32"):
        gram = np.asarray(data[f"{name}/J"] @ data[f"{name}/J"].T, np.float64)
        reference = data[f"{name}/{config}/torchjd_f32_weights"].astype(np.float64)
        if not solved(reference, gram, alpha, 1e-5):
            continue
        nonzero = np.diagonal(gram) > 0
        reference = np.where(nonzero, reference, 0.0)  # the zero gradient's weight is moot
        scale = (np.abs(reference) * np.abs(matrix).max(axis=1)).sum()
        error = np.abs(ours @ matrix - reference @ matrix).max() / scale
        assert error <= 5e-5, (name, error)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_fairgrad_where_the_equation_has_no_solution(alpha):
    # Two opposite gradients, or zero in the convex hull: no direction improves
    # every task, so no solution. Ours: finite non-negative weights that grow
    # along the conflict while the component of the output against any task
    # shrinks; after the capped iterations it is (measured, relative to |g_i|
    # max_j |g_j|) at most 3e-10, 4e-8, 7e-6 and 2e-3 for alpha = 0.5, 1, 2, 5.
    tol = {0.5: 1e-8, 1.0: 1e-6, 2.0: 1e-4, 5.0: 1e-2}[alpha]
    unsolved = 0
    for name, matrix, ours, _ in replay(alpha, "float64"):
        gram = matrix @ matrix.T
        if solved(ours, gram, alpha, 1e-6):
            continue
        unsolved += 1
        assert np.all(np.isfinite(ours)) and np.all(ours >= 0), name
        inner = matrix @ (ours @ matrix)
        norms = np.linalg.norm(matrix, axis=1)
        assert np.all(inner >= -tol * norms * norms.max()), (name, inner)
    assert unsolved >= 5, unsolved  # the opposite cases of every k


@pytest.mark.parametrize("alpha", ALPHAS)
def test_libmtl_and_the_authors_solve_the_same_equation(alpha):
    # LibMTL's FairGrad and the authors' (whose trainer multiplies the output by k)
    # call scipy exactly as TorchJD does: where all three converged they agree.
    config = f"alpha{alpha:g}"
    for name, matrix, ours, data in replay(alpha, "float64"):
        gram = matrix @ matrix.T
        nonzero = np.diagonal(gram) > 0
        for peer in ("libmtl", "authors"):
            reference = data[f"{name}/{config}/{peer}_f64_weights"]
            if solved(reference, gram, alpha, 1e-6):
                np.testing.assert_allclose(ours[nonzero], reference[nonzero], rtol=1e-6)
        # Their direction is the gradients times torch.Tensor(w): float32 weights
        # (measured 3e-9 relative after rounding ours so).
        direction = data[f"{name}/{config}/authors_f64_out"]
        authors = data[f"{name}/{config}/authors_f64_weights"].astype(np.float32)
        np.testing.assert_allclose(direction, authors.astype(np.float64) @ matrix, rtol=1e-7)


@PROPERTY_SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    alpha=st.sampled_from(ALPHAS),
    log_norm=st.floats(-3.0, 3.0),
)
def test_fairgrad_of_one_task_and_of_orthogonal_tasks(seed, alpha, log_norm):
    rng = np.random.default_rng(seed)
    norms = 10.0 ** (log_norm + rng.uniform(-1, 1, 3))
    gram = jnp.asarray(np.diag(norms**2), jnp.float32)
    expected = norms ** (-2 * alpha / (1 + alpha))  # (A w)_i = |g_i|^2 w_i = w_i^(-1/alpha)
    weights = batched_weights(alpha, 3, "float32")(gram[None])[0]
    np.testing.assert_allclose(np.asarray(weights), expected, rtol=1e-5)
    one = aggregation.fairgrad_weights(gram[:1, :1], alpha)
    np.testing.assert_allclose(np.asarray(one), expected[:1], rtol=1e-5)


def test_fairgrad_alpha_zero_is_the_mean_and_options_are_checked():
    grads = jnp.array([[1.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    out, _ = famo_jax.fairgrad(alpha=0.0).update(grads, None)
    np.testing.assert_allclose(np.asarray(out), np.asarray(jnp.mean(grads, axis=0)), rtol=1e-6)
    with pytest.raises(ValueError, match="alpha"):
        famo_jax.fairgrad(alpha=-1.0)
    with pytest.raises(TypeError, match="max_iters"):
        famo_jax.fairgrad(max_iters=1.5)
