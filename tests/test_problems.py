"""Tests of famo_jax.problems: the toy problem of the FAMO paper (Appendix D)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from famo_jax import problems
from tests._compat import enable_x64

# Points around the map: the authors' starts, both half-planes, the clamp of the
# first log (the "crease" 0.5(-x1 - 7) = tanh(-x2)), and the Pareto side.
POINTS = np.array(
    [
        [-8.5, 7.5],
        [0.0, 0.0],
        [9.0, 9.0],
        [-7.5, -0.5],
        [9.0, -1.0],
        [0.0, -8.0],
        [3.0, 1.0],
        [-5.0, 0.3],
        [-7.0 - 2.0 * np.tanh(-1.0), 1.0],
        [2.5, -8.36],
    ]
)


def paper_losses(theta):
    """Appendix D of the FAMO paper, written out in NumPy float64.

    The paper's f2 reads log(max(|0.5(-t1 + 3) + tanh(-t2) + 2|, 5e-6)) + 6 (the
    sign before tanh is lost in the extracted text; this is the authors' code).
    """
    t1, t2 = theta[..., 0], theta[..., 1]
    f1 = np.log(np.maximum(np.abs(0.5 * (-t1 - 7) - np.tanh(-t2)), 0.000005)) + 6
    f2 = np.log(np.maximum(np.abs(0.5 * (-t1 + 3) + np.tanh(-t2) + 2), 0.000005)) + 6
    g1 = ((-t1 + 7) ** 2 + 0.1 * (-t2 - 8) ** 2) / 10 - 20
    g2 = ((-t1 - 7) ** 2 + 0.1 * (-t2 - 8) ** 2) / 10 - 20
    c1 = np.maximum(np.tanh(0.5 * t2), 0)
    c2 = np.maximum(np.tanh(-0.5 * t2), 0)
    return np.stack([0.1 * (c1 * f1 + c2 * g1), c1 * f2 + c2 * g2], axis=-1)


def test_losses_match_the_paper_formulas():
    got = jax.jit(problems.toy_losses)(jnp.asarray(POINTS, jnp.float32))
    chex.assert_shape(got, (len(POINTS), 2))
    np.testing.assert_allclose(got, paper_losses(POINTS), rtol=2e-6, atol=2e-6)
    # The clamp at 5e-6 is active on the crease: f1 = log(5e-6) + 6 there.
    c1 = np.tanh(0.5)
    np.testing.assert_allclose(got[8, 0], 0.1 * c1 * (np.log(5e-6) + 6), rtol=1e-5)


def test_losses_in_float64_and_on_single_points():
    with enable_x64(True):
        got = problems.toy_losses(jnp.asarray(POINTS, jnp.float64))
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(got, paper_losses(POINTS), rtol=1e-12, atol=1e-12)
    for point in POINTS[:3]:
        np.testing.assert_allclose(
            problems.toy_losses(point.tolist()), paper_losses(point), rtol=2e-6, atol=2e-6
        )


@pytest.mark.parametrize("index", [0, 2, 3, 4, 5, 6, 7, 9])
def test_gradients_match_central_differences(index):
    point = POINTS[index]
    with enable_x64(True):
        jac = np.asarray(jax.jacrev(problems.toy_losses)(jnp.asarray(point)))
    step = 1e-6
    numeric = np.stack(
        [
            (paper_losses(point + step * e) - paper_losses(point - step * e)) / (2 * step)
            for e in np.eye(2)
        ],
        axis=-1,
    )
    np.testing.assert_allclose(jac, numeric, rtol=1e-6, atol=1e-8)


def test_gradient_at_the_origin_follows_torch_clamp():
    # At (0, 0) both tanh(+-theta_2 / 2) sit exactly on the clamp at 0. PyTorch's
    # clamp passes the gradient at a tie, so dc1/dtheta_2 = 0.5 and
    # dc2/dtheta_2 = -0.5, and dL/dtheta_2 = 0.5 * (f - g) with f, g at (0, 0).
    f1 = f2 = np.log(3.5) + 6
    g1 = g2 = (49 + 6.4) / 10 - 20
    expected = np.array([[0.0, 0.1 * 0.5 * (f1 - g1)], [0.0, 0.5 * (f2 - g2)]])
    jac = jax.jacrev(problems.toy_losses)(jnp.zeros(2))
    np.testing.assert_allclose(jac, expected, rtol=1e-6)


def test_batch_shape_and_errors():
    grid = jnp.zeros((3, 4, 2))
    chex.assert_shape(problems.toy_losses(grid), (3, 4, 2))
    chex.assert_shape(problems.toy_pareto_residual(grid), (3, 4))
    with pytest.raises(ValueError, match="theta"):
        problems.toy_losses(jnp.zeros(3))
    with pytest.raises(ValueError, match="task_grads"):
        problems.pareto_stationarity_residual(jnp.zeros((3, 2)))
    with pytest.raises(ValueError, match="num_points"):
        problems.toy_pareto_front(1)


def test_residual_is_the_min_norm_convex_combination():
    rng = np.random.default_rng(0)
    grads = rng.normal(size=(50, 2, 3))
    grads[0, 1] = grads[0, 0]  # equal gradients: the residual is their norm
    grads[1, 1] = -0.5 * grads[1, 0]  # opposite: residual 0
    w = np.linspace(0.0, 1.0, 100_001)[:, None, None]
    brute = np.min(
        np.linalg.norm(w * grads[None, :, 0] + (1 - w) * grads[None, :, 1], axis=-1), axis=0
    )
    got = jax.jit(problems.pareto_stationarity_residual)(jnp.asarray(grads, jnp.float32))
    np.testing.assert_allclose(got, brute, rtol=1e-4, atol=2e-5)  # grid step 1e-5
    assert float(got[1]) < 1e-6


def test_pareto_front_is_stationary_and_nondominated():
    thetas, losses = problems.toy_pareto_front(101)
    chex.assert_shape([thetas, losses], (101, 2))
    np.testing.assert_allclose(thetas[:, 0], np.linspace(-7, 7, 101))
    np.testing.assert_allclose(losses, paper_losses(thetas), rtol=1e-12)
    # The authors plot the front as the line theta_2 = -8.3552; the exact curve
    # meets it at theta_1 = 0 and bends down towards the ends.
    assert abs(thetas[50, 1] - (-8.3552)) < 1e-3
    assert np.all((thetas[:, 1] < -8.35) & (thetas[:, 1] > -8.44))
    with enable_x64(True):
        residual = np.asarray(problems.toy_pareto_residual(jnp.asarray(thetas)))
    assert residual.max() < 1e-9
    # Along the front one loss rises exactly as the other falls.
    assert np.all(np.diff(losses[:, 0]) < 0) and np.all(np.diff(losses[:, 1]) > 0)
    # Moving off the front (in theta_2, or beyond theta_1 = +-7) breaks
    # stationarity; the losses are flat there, so the residual grows slowly
    # (about 3e-3 per unit of theta_2).
    off = thetas[::10] + np.array([0.0, 0.3])
    assert float(jnp.min(problems.toy_pareto_residual(jnp.asarray(off, jnp.float32)))) > 5e-4
    outside = jnp.array([[-7.5, -8.43], [7.5, -8.43]])
    assert float(jnp.min(problems.toy_pareto_residual(outside))) > 1e-3


def test_min_losses_are_strict_lower_bounds():
    # The lower half-plane holds the minima (about -1.9989 and -19.989, at the
    # ends of the Pareto front), above the bounds the authors give FAMO.
    grid = np.stack(np.meshgrid(np.linspace(-10, 10, 201), np.linspace(-10, 10, 201)), -1)
    losses = paper_losses(grid.reshape(-1, 2))
    assert np.all(losses.min(axis=0) > np.asarray(problems.TOY_MIN_LOSSES))
    np.testing.assert_allclose(losses.min(axis=0), [-1.9989, -19.989], atol=1e-3)


def test_starting_points():
    np.testing.assert_array_equal(
        problems.TOY_STARTS, [[-8.5, 7.5], [0, 0], [9, 9], [-7.5, -0.5], [9, -1]]
    )
    assert problems.TOY_PAPER_STARTS.shape == (5, 2)
    # No start is on the front.
    assert float(jnp.min(problems.toy_pareto_residual(jnp.asarray(problems.TOY_STARTS)))) > 1e-3
