"""ExcessMTL against LibMTL's own code (identical to the authors').

Fixtures: ``tests/reference/make_breadth_b_fixtures.py`` (LibMTL at 4336804,
float64), six steps per case with the squared-gradient sums, reference
estimates and weights carried, k in 2, 3, 5, 10 and 24, random, conflicting,
scaled and degenerate inputs (the degenerate steps start after the first, where
LibMTL would divide by a zero estimate). Bounds, relative to each step's
largest entry (weights: relative): float32 1e-5 (seen 3.2e-7), float64 1e-10
(seen 1.9e-15).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import famo_jax
from famo_jax import aggregation
from tests.aggregation import _breadth_b_fixtures as fixtures


@functools.cache
def jitted(k, robust_step_size):
    tx = famo_jax.excess_mtl(k, robust_step_size=robust_step_size)
    return tx, jax.jit(tx.update)


def check(config, dtype, rtol):
    configs, cases = fixtures.load("libmtl", "excess_mtl")
    for case in fixtures.case_names("libmtl", "excess_mtl", config):
        arrays = cases[(config, case)]
        k = arrays["grads"].shape[1]
        tx, update = jitted(k, configs[config]["robust_step_size"])
        steps = [{"grads": g} for g in arrays["grads"]]
        outputs, states = fixtures.replay(tx, update, steps, dtype)
        scales = fixtures.step_scales(arrays["grads"])
        # LibMTL: sum_i alpha_i g_i with the weights summing to k.
        fixtures.assert_steps_close(k * outputs, arrays["output"], rtol, scales, case)
        weights = np.stack([np.asarray(s.loss_weights) for s in states])
        np.testing.assert_allclose(weights, arrays["weights"], rtol=rtol, err_msg=case)
        sums = np.stack([fixtures.to_flat(s.squared_grad_sum) for s in states])
        np.testing.assert_allclose(sums, arrays["squared_grad_sum"], rtol=rtol, err_msg=case)


def test_excess_mtl_matches_libmtl_in_float32():
    check("default", jnp.float32, 1e-5)


@pytest.mark.parametrize("config", ["default", "step1"])
def test_excess_mtl_matches_libmtl_in_float64(config):
    with jax.enable_x64(True):
        check(config, jnp.float64, 1e-10)


def test_excess_mtl_waits_for_a_positive_first_estimate():
    """LibMTL divides by a zero first estimate (NaN weights from then on)."""
    tx = famo_jax.excess_mtl(2, robust_step_size=1.0)
    update = jax.jit(tx.update)
    state = tx.init(jnp.zeros(2))
    out, state = update(jnp.array([[1.0, 0.0], [0.0, 0.0]]), state)
    np.testing.assert_allclose(state.initial_excess, [1 / np.sqrt(1 + 1e-7), 0.0], rtol=1e-6)
    _, state = update(jnp.array([[1.0, 0.0], [0.0, 3.0]]), state)
    np.testing.assert_allclose(state.initial_excess, [1 / np.sqrt(1 + 1e-7), 3.0], rtol=1e-6)
    assert np.all(np.isfinite(np.asarray(state.loss_weights)))
    # From then on task 2's estimates are relative to its first positive one.
    _, later = update(jnp.array([[1.0, 0.0], [0.0, 3.0]]), state)
    ratio = (9.0 / np.sqrt(18.0 + 1e-7)) / 3.0
    first = 1.0 / np.sqrt(3.0 + 1e-7)
    expected = np.log(state.loss_weights) + np.array([first, ratio])
    expected = 2 * np.exp(expected - expected.max()) / np.sum(np.exp(expected - expected.max()))
    np.testing.assert_allclose(later.loss_weights, expected, rtol=1e-5)


def test_excess_mtl_large_steps_saturate_instead_of_overflowing():
    tx = famo_jax.excess_mtl(2, robust_step_size=1e4)
    update = jax.jit(tx.update)
    state = tx.init(jnp.zeros(2))
    for scale in (1.0, 50.0, 50.0):
        out, state = update(jnp.array([[scale, 0.0], [0.0, 1.0]]), state)
    assert np.all(np.isfinite(np.asarray(out)))
    np.testing.assert_allclose(state.loss_weights, [2.0, 0.0], atol=1e-6)


def test_excess_mtl_rejects_what_it_cannot_use():
    with pytest.raises(ValueError, match="init\\(params\\)"):
        famo_jax.excess_mtl(2).init(None)
    tx = famo_jax.excess_mtl(2)
    implicit = aggregation.ImplicitTaskGradients(gram=jnp.eye(2), combine=lambda w: w)
    with pytest.raises(TypeError, match="ImplicitTaskGradients"):
        tx.update(implicit, tx.init(jnp.zeros(2)))
