"""Linear scalarization and scale-invariant weighting against their definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import famo_jax

# Jitted, as everywhere in these tests: run eagerly, every operation compiles on its own.
weights_of = jax.jit(famo_jax.loss_weights, static_argnums=0)


# ---------------------------------------------------------------------------
# Linear scalarization and scale-invariant weighting.


def test_linear_scalarization_is_the_mean():
    ls = famo_jax.linear_scalarization(4)
    losses = jnp.array([0.5, 2.0, 8.0, 1e3])
    state = ls.init()
    np.testing.assert_allclose(jax.jit(ls.weigh)(losses, state), np.mean(losses), rtol=1e-6)
    np.testing.assert_allclose(weights_of(ls, losses, state), np.full(4, 0.25))
    assert jax.jit(ls.update)(losses, losses, state) == state


def test_scale_invariant_is_the_mean_log_loss():
    si = famo_jax.scale_invariant(3, eps=1e-3)
    losses = jnp.array([0.5, 2.0, 400.0])
    state = si.init()
    np.testing.assert_allclose(
        jax.jit(si.weigh)(losses, state), np.mean(np.log(losses + 1e-3)), rtol=1e-6
    )
    np.testing.assert_allclose(
        weights_of(si, losses, state), 1.0 / (3 * (losses + 1e-3)), rtol=1e-6
    )


def test_scale_invariant_eps_zero_is_the_reference_up_to_the_mean():
    # Reference: sum(log(losses)); here the mean, i.e. divided by num_tasks.
    si = famo_jax.scale_invariant(2, eps=0.0)
    losses = jnp.array([0.25, 4.0])
    np.testing.assert_allclose(
        2 * jax.jit(si.weigh)(losses, si.init()), np.sum(np.log(np.asarray(losses))), rtol=1e-6
    )


def test_scale_invariant_documented_behaviour_at_zero_and_negative_losses():
    si = famo_jax.scale_invariant(2)  # eps = 1e-8
    zero = jnp.array([0.0, 1.0])
    np.testing.assert_allclose(jax.jit(si.weigh)(zero, si.init()), 0.5 * np.log(1e-8), rtol=1e-5)
    np.testing.assert_allclose(weights_of(si, zero, si.init()), [0.5e8, 0.5], rtol=1e-5)
    # eps = 0: a zero loss has no finite log (the reference's -inf, with an
    # infinite weight): NaN, value and gradient, like a negative loss.
    exact = famo_jax.scale_invariant(2, eps=0.0)
    assert jnp.isnan(jax.jit(exact.weigh)(zero, exact.init()))
    assert np.all(np.isnan(weights_of(exact, zero, exact.init())))
    assert jnp.isnan(jax.jit(si.weigh)(jnp.array([-1.0, 1.0]), si.init()))
    assert np.all(np.isnan(weights_of(si, jnp.array([-1.0, 1.0]), si.init())))


@pytest.mark.parametrize(
    "factory, kwargs, error",
    [
        (famo_jax.linear_scalarization, {"num_tasks": 0}, ValueError),
        (famo_jax.linear_scalarization, {"num_tasks": 2.0}, TypeError),
        (famo_jax.scale_invariant, {"num_tasks": 2, "eps": -1.0}, ValueError),
        (famo_jax.scale_invariant, {"num_tasks": 2, "eps": "1"}, TypeError),
        (famo_jax.random_loss_weighting, {"num_tasks": 2, "seed": -1}, ValueError),
        (famo_jax.random_loss_weighting, {"num_tasks": 2, "seed": 1.5}, TypeError),
        (famo_jax.dwa, {"num_tasks": 2, "temperature": 0.0}, ValueError),
        (famo_jax.dwa, {"num_tasks": 2, "temperature": -2.0}, ValueError),
        (famo_jax.dwa, {"num_tasks": 2, "window": 0}, ValueError),
        (famo_jax.dwa, {"num_tasks": 2, "window": 2.5}, TypeError),
        (famo_jax.uncertainty_weighting, {"num_tasks": 2, "learning_rate": -0.1}, ValueError),
        (famo_jax.uncertainty_weighting, {"num_tasks": 2, "optimizer": "adam"}, TypeError),
    ],
)
def test_factories_reject_bad_hyperparameters(factory, kwargs, error):
    bad_name = [k for k in kwargs if k != "num_tasks"] or ["num_tasks"]
    with pytest.raises(error, match=bad_name[0]):
        factory(**kwargs)
