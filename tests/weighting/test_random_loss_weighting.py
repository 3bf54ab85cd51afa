"""Random loss weighting: softmax of standard normals, pure and reproducible."""

import jax
import jax.numpy as jnp
import numpy as np

import famo_jax

# Jitted, as everywhere in these tests: run eagerly, every operation compiles on its own.
weights_of = jax.jit(famo_jax.loss_weights, static_argnums=0)


# ---------------------------------------------------------------------------
# Random loss weighting.


def _rlw_weight_sequence(weighting, num_steps):
    losses = jnp.ones(3)

    def step(state, _):
        w = famo_jax.loss_weights(weighting, losses, state)
        return weighting.update(losses, losses, state), w

    _, weights = jax.lax.scan(step, weighting.init(), None, length=num_steps)
    return np.asarray(weights)


def test_rlw_weights_are_softmax_of_standard_normals():
    weights = _rlw_weight_sequence(famo_jax.random_loss_weighting(3, seed=0), 2000)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-5)
    assert np.all(weights > 0)
    # By symmetry each task's expected weight is 1/3.
    np.testing.assert_allclose(weights.mean(axis=0), 1 / 3, atol=0.02)
    # log w - mean(log w) = lambda - mean(lambda): each entry has variance (k-1)/k.
    log_w = np.log(weights)
    centred = log_w - log_w.mean(axis=1, keepdims=True)
    np.testing.assert_allclose(centred.var(axis=0), 2 / 3, rtol=0.1)
    # Draws at consecutive steps are independent.
    corr = np.corrcoef(centred[:-1, 0], centred[1:, 0])[0, 1]
    assert abs(corr) < 0.1


def test_rlw_is_pure_and_reproducible():
    rlw = famo_jax.random_loss_weighting(4, seed=7)
    losses = jnp.arange(1.0, 5.0)
    state = rlw.init()
    first = weights_of(rlw, losses, state)
    np.testing.assert_array_equal(first, weights_of(rlw, losses, state))
    np.testing.assert_array_equal(
        first, weights_of(rlw, losses, famo_jax.random_loss_weighting(4, 7).init())
    )
    other_seed = famo_jax.random_loss_weighting(4, seed=8)
    assert not np.allclose(first, weights_of(rlw, losses, other_seed.init()))
    # The weights do not depend on the losses, only on the key.
    np.testing.assert_array_equal(first, weights_of(rlw, 10 * losses, state))
    # Non-finite losses advance the key like any other step.
    after_nan = jax.jit(rlw.update)(jnp.full(4, jnp.nan), losses, state)
    np.testing.assert_array_equal(after_nan.key, jax.jit(rlw.update)(losses, losses, state).key)
