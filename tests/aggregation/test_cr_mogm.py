"""CR-MOGM against TorchJD 0.18's CRMOGMWeighting over several steps, and its recursion."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import famo_jax
from famo_jax import aggregation
from tests.aggregation._peer_fixtures import load, relative_error

INNER = {
    "upgrad": aggregation.upgrad_weights,
    "dualproj": aggregation.dualproj_weights,
    "aligned_mtl": aggregation.aligned_mtl_weights,
}
# The fixture's configurations: wrapped weighting, alpha, initial weights given.
CONFIGS = {
    "upgrad_a0.9": ("upgrad", 0.9, False),
    "upgrad_a0.5_init": ("upgrad", 0.5, True),
    "dualproj_a0": ("dualproj", 0.0, False),
    "aligned_mtl_a0.9": ("aligned_mtl", 0.9, False),
    "aligned_mtl_a1_init": ("aligned_mtl", 1.0, True),
}


@functools.cache
def transformation(config, k, initial):
    inner, alpha, with_initial = CONFIGS[config]
    tx = famo_jax.cr_mogm(k, INNER[inner], alpha, initial_weights=initial if with_initial else None)
    return tx, jax.jit(tx.update)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("sequence", ["k03", "k05"])
def test_cr_mogm_follows_torchjd_over_six_steps(config, sequence):
    data = load("cr_mogm")
    grads = data[f"{sequence}/J"]
    k = grads.shape[1]
    initial = tuple(float(x) for x in data[f"{sequence}/initial_weights"])
    tx, update = transformation(config, k, initial)
    state = tx.init(None)
    reference_out = data[f"{sequence}/{config}/torchjd_f32_out"]
    reference_weights = data[f"{sequence}/{config}/torchjd_f32_weights"]
    for step, matrix in enumerate(grads):
        out, state = update(jnp.asarray(matrix), state)
        np.testing.assert_allclose(
            np.asarray(state.weights), reference_weights[step], rtol=2e-5, atol=1e-7
        )
        scale = float((np.abs(reference_weights[step]) * np.abs(matrix).max(axis=1)).sum())
        assert relative_error(out, reference_out[step], scale) <= 1e-5, step
    assert int(state.num_updates) == len(grads) and int(state.num_skipped) == 0


def test_cr_mogm_is_the_exponential_average_of_the_wrapped_weights():
    rng = np.random.default_rng(0)
    grads = rng.standard_normal((5, 3, 4)).astype(np.float32)
    alpha = 0.7
    tx = famo_jax.cr_mogm(3, aggregation.mgda_weights, alpha)
    update = jax.jit(tx.update)
    state, expected = tx.init(None), None
    for matrix in grads:
        wrapped = np.asarray(aggregation.mgda_weights(jnp.asarray(matrix @ matrix.T)))
        expected = wrapped if expected is None else alpha * expected + (1 - alpha) * wrapped
        out, state = update(jnp.asarray(matrix), state)
        np.testing.assert_allclose(np.asarray(state.weights), expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(out), expected @ matrix, rtol=1e-4, atol=1e-5)


def test_cr_mogm_alpha_schedule_and_a_stateful_wrapped_weighting():
    # alpha_t = 1 - lr_t / lr_0 (Corollary 1 of the paper) as an optax schedule.
    schedule = lambda count: 1.0 - optax.linear_schedule(1.0, 0.0, 4)(count)
    counting = aggregation.GramWeighting(
        init=lambda: jnp.zeros((), jnp.int32),
        weights=lambda gram, count, losses: (
            jnp.where(count % 2 == 0, jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0])),
            count + 1,
        ),
    )
    tx = famo_jax.cr_mogm(2, counting, schedule)
    state = tx.init(None)
    history = []
    for _ in range(3):
        _, state = tx.update(jnp.eye(2), state)
        history.append(np.asarray(state.weights))
    # alpha_0 = 0 (first: wrapped), alpha_1 = 0.25, alpha_2 = 0.5, and
    # lambda_t = alpha_t lambda_{t-1} + (1 - alpha_t) (e_1, e_2, e_1 in turn).
    np.testing.assert_allclose(history[0], [1.0, 0.0])
    np.testing.assert_allclose(history[1], [0.25, 0.75])
    np.testing.assert_allclose(history[2], [0.625, 0.375])
    assert int(state.inner) == 3


def test_cr_mogm_skips_non_finite_weights_and_checks_its_options():
    tx = famo_jax.cr_mogm(2, aggregation.upgrad_weights)
    _, state = tx.update(jnp.eye(2), tx.init(None))
    out, new_state = tx.update(jnp.array([[np.nan, 0.0], [0.0, 1.0]]), state)
    assert np.all(np.isnan(np.asarray(out)))
    chex.assert_trees_all_equal(new_state.weights, state.weights)
    assert int(new_state.num_skipped) == 1
    with pytest.raises(TypeError, match="weights function"):
        famo_jax.cr_mogm(2, famo_jax.upgrad())
    with pytest.raises(ValueError, match="alpha must lie in"):
        famo_jax.cr_mogm(2, aggregation.upgrad_weights, alpha=1.5)
    with pytest.raises(ValueError, match="initial_weights"):
        famo_jax.cr_mogm(2, aggregation.upgrad_weights, initial_weights=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="built for num_tasks=2"):
        tx.update(jnp.eye(3), tx.init(None))
