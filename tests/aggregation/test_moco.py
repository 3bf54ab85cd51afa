"""MoCo against LibMTL's own code (the only implementation: the authors shared theirs
with LibMTL; TorchJD has none).

Fixtures: ``tests/reference/make_breadth_b_fixtures.py`` (LibMTL at 4336804,
float64), six steps per case with the tracked gradients and weights carried, k
in 2, 3, 5, 10 and 24, random, conflicting, scaled and degenerate inputs.
Bounds, relative to each step's largest entry (weights: absolute): float32 1e-5
(seen 9.8e-9), float64 1e-10 (seen 1.3e-16).
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
def jitted(k, **hyper):
    tx = famo_jax.moco(k, **hyper)
    return tx, jax.jit(tx.update)


def check(config, dtype, rtol):
    configs, cases = fixtures.load("libmtl", "moco")
    for case in fixtures.case_names("libmtl", "moco", config):
        arrays = cases[(config, case)]
        tx, update = jitted(arrays["grads"].shape[1], **configs[config])
        steps = [
            {"grads": g, "losses": jnp.asarray(losses, dtype)}
            for g, losses in zip(arrays["grads"], arrays["losses"], strict=True)
        ]
        outputs, states = fixtures.replay(tx, update, steps, dtype)
        scales = fixtures.step_scales(arrays["grads"])
        # LibMTL uses y^T lambda as it is, as famo_jax does.
        fixtures.assert_steps_close(outputs, arrays["output"], rtol, scales, case)
        weights = np.stack([np.asarray(s.weights) for s in states])
        np.testing.assert_allclose(weights, arrays["weights"], rtol=0, atol=rtol, err_msg=case)
        tracked = np.stack([fixtures.to_flat(s.tracked) for s in states])
        for t in range(len(states)):
            scale = max(np.abs(arrays["tracked"][t]).max(), 1e-30)
            np.testing.assert_allclose(
                tracked[t], arrays["tracked"][t], rtol=rtol, atol=rtol * scale, err_msg=case
            )


def test_moco_matches_libmtl_in_float32():
    check("default", jnp.float32, 1e-5)


@pytest.mark.parametrize("config", ["default", "rho0.1"])
def test_moco_matches_libmtl_in_float64(config):
    with jax.enable_x64(True):
        check(config, jnp.float64, 1e-10)


def test_moco_keeps_k_times_the_parameters_and_skips_invalid_losses():
    params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(4)}
    tx = famo_jax.moco(2)
    state = tx.init(params)
    assert jax.tree.map(jnp.shape, state.tracked) == {"w": (2, 3, 2), "b": (2, 4)}
    grads = jax.tree.map(lambda p: jnp.ones((2,) + p.shape), params)
    _, state = tx.update(grads, state, losses=jnp.array([1.0, 2.0]))
    out, skipped = tx.update(grads, state, losses=jnp.array([1.0, jnp.nan]))
    assert not np.all(np.isfinite(np.asarray(out["w"])))
    assert int(skipped.num_skipped) == 1 and int(skipped.num_updates) == 1
    np.testing.assert_array_equal(skipped.weights, state.weights)
    np.testing.assert_array_equal(skipped.tracked["w"], state.tracked["w"])


def test_moco_rejects_what_it_cannot_use():
    with pytest.raises(ValueError, match="init\\(params\\)"):
        famo_jax.moco(2).init(None)
    with pytest.raises(ValueError, match="beta must lie in"):
        famo_jax.moco(2, beta=0.0)
    tx = famo_jax.moco(2)
    implicit = aggregation.ImplicitTaskGradients(gram=jnp.eye(2), combine=lambda w: w)
    with pytest.raises(TypeError, match="ImplicitTaskGradients"):
        tx.update(implicit, tx.init(jnp.zeros(2)), losses=jnp.ones(2))
    with pytest.raises(ValueError, match="do not match the parameters"):
        tx.update(jnp.ones((2, 3)), tx.init(jnp.zeros(2)), losses=jnp.ones(2))
