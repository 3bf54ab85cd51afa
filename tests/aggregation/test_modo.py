"""MoDo against LibMTL's and TorchJD's own code.

Fixtures: ``tests/reference/make_breadth_b_fixtures.py`` (LibMTL at 4336804,
TorchJD 0.18, float64): three batches per step (two for the weights' step,
the third combined), six steps with the weights carried, k in 2, 3, 5, 10 and
24; the ``same_batch`` cases (three equal batches) replay the single-batch
fallback. Bounds, relative to each step's largest entry (weights: absolute):
float32 1e-5 (seen 4.3e-7), float64 1e-10 (seen 1.3e-15 against LibMTL,
8.5e-16 against TorchJD). The float64 replays start from exactly 1/k (the
float32 initial state rounded to float64 is 3e-9 away).
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import famo_jax
from tests.aggregation import _breadth_b_fixtures as fixtures


@functools.cache
def jitted(k, gamma, rho):
    tx = famo_jax.modo(k, gamma=gamma, rho=rho)
    return tx, jax.jit(tx.update)


def check(peer, config, dtype, rtol):
    configs, cases = fixtures.load(peer, "modo")
    for case in fixtures.case_names(peer, "modo", config):
        arrays = cases[(config, case)]
        tx, update = jitted(
            arrays["grads"].shape[2], configs[config]["gamma"], configs[config]["rho"]
        )
        steps = fixtures.three_batch_steps(
            arrays, "modo", dtype, batches=not case.startswith("same_batch")
        )
        outputs, states = fixtures.replay(tx, update, steps, dtype)
        scales = fixtures.step_scales(arrays["grads"])
        fixtures.assert_steps_close(outputs, arrays["output"], rtol, scales, case)
        weights = np.stack([np.asarray(s.weights) for s in states])
        np.testing.assert_allclose(weights, arrays["weights"], rtol=0, atol=rtol, err_msg=case)


def test_modo_matches_libmtl_in_float32():
    check("libmtl", "default", jnp.float32, 1e-5)


@pytest.mark.parametrize("config", ["default", "gamma0.1"])
def test_modo_matches_libmtl_in_float64(config):
    with jax.enable_x64(True):
        check("libmtl", config, jnp.float64, 1e-10)


def test_modo_matches_torchjd_in_float64():
    with jax.enable_x64(True):
        check("torchjd", "gamma0.1", jnp.float64, 1e-10)


def test_modo_weights_step_is_a_projected_gradient_step():
    rng = np.random.default_rng(0)
    first, second = rng.standard_normal((2, 3, 5))
    cross = first @ second.T
    weights = np.array([0.5, 0.3, 0.2])
    step = weights - 0.05 * (cross @ weights + 0.1 * weights)
    # The projection: the nearest point of the simplex, by a fine search on the plane.
    out = famo_jax.aggregation.modo_weights(jnp.asarray(cross), jnp.asarray(weights), gamma=0.05)
    assert np.all(np.asarray(out) >= 0) and np.isclose(np.sum(out), 1.0, rtol=1e-6)
    for _ in range(200):
        other = rng.dirichlet(np.ones(3))
        assert np.sum((np.asarray(out) - step) ** 2) <= np.sum((other - step) ** 2) + 1e-6


def test_modo_huge_gradients_give_a_vertex_of_the_simplex():
    grads = jnp.array([[1e15, 0.0], [0.0, 2e15]])
    tx = famo_jax.modo(2)
    out, state = tx.update(grads, tx.init(None))
    chex.assert_trees_all_close(state.weights, jnp.array([1.0, 0.0]))
    assert np.all(np.isfinite(np.asarray(out)))


def test_modo_rejects_what_it_cannot_use():
    with pytest.raises(ValueError, match="gamma must be positive"):
        famo_jax.modo(2, gamma=0.0)
    tx = famo_jax.modo(2)
    with pytest.raises(TypeError, match="weight_batches must be a pair"):
        tx.update(jnp.ones((2, 3)), tx.init(None), weight_batches=[jnp.ones((2, 3))])
    with pytest.raises(ValueError, match="weight_batches\\[0\\] must hold task gradients"):
        tx.update(
            jnp.ones((2, 3)), tx.init(None), weight_batches=(jnp.ones((3, 3)), jnp.ones((3, 3)))
        )
