"""Uncertainty weighting against the reference's log-variance trajectory."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import famo_jax

# Jitted, as everywhere in these tests: run eagerly, every operation compiles on its own.
weights_of = jax.jit(famo_jax.loss_weights, static_argnums=0)


# ---------------------------------------------------------------------------
# Uncertainty weighting, against a NumPy port of the reference (Adam on logsigma).


def _reference_uw_log_vars(losses, lr, num_steps):
    """logsigma trained by PyTorch-style Adam on sum_i 0.5 * (exp(-s_i) l_i + s_i)."""
    s = np.zeros(losses.shape[1])
    m, v = np.zeros_like(s), np.zeros_like(s)
    b1, b2, eps = 0.9, 0.999, 1e-8
    for t in range(1, num_steps + 1):
        g = 0.5 * (1.0 - np.exp(-s) * losses[t - 1])
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        s = s - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    return s


def test_uncertainty_weighting_follows_the_reference_log_variances():
    rng = np.random.default_rng(1)
    num_steps = 60
    losses = rng.uniform(0.1, 5.0, (num_steps, 3)) * np.array([0.01, 1.0, 100.0])
    uw = famo_jax.uncertainty_weighting(3)  # Adam, lr 0.025 as the reference trainers

    def step(state, row):
        return uw.update(row, row, state), None

    state, _ = jax.jit(lambda ls: jax.lax.scan(step, uw.init(), ls))(
        jnp.asarray(losses, jnp.float32)
    )
    np.testing.assert_allclose(
        state.log_vars, _reference_uw_log_vars(losses, 0.025, num_steps), atol=1e-5
    )
    assert int(state.num_updates) == num_steps


def test_uncertainty_weighting_value_weights_and_exact_gradient_step():
    uw = famo_jax.uncertainty_weighting(2, optimizer=optax.sgd(0.5))
    state = uw.init()._replace(log_vars=jnp.array([0.0, jnp.log(4.0)]))
    losses = jnp.array([2.0, 8.0])
    np.testing.assert_allclose(jax.jit(uw.weigh)(losses, state), 0.5 * (2.0 + 2.0 + np.log(4.0)))
    np.testing.assert_allclose(weights_of(uw, losses, state), [0.5, 0.125])
    # One SGD step on (1/k) * (1 - exp(-s) * l).
    new = jax.jit(uw.update)(losses, jnp.zeros(2), state)
    np.testing.assert_allclose(new.log_vars, [0.25, np.log(4.0) + 0.25], rtol=1e-6)
    # At init UW is linear scalarization.
    np.testing.assert_allclose(weights_of(uw, losses, uw.init()), [0.5, 0.5])


def test_uncertainty_weighting_skips_non_finite_losses():
    uw = famo_jax.uncertainty_weighting(2)
    state = jax.jit(uw.update)(jnp.array([1.0, 3.0]), jnp.ones(2), uw.init())
    skipped = jax.jit(uw.update)(jnp.array([jnp.inf, 1.0]), jnp.ones(2), state)
    assert int(skipped.num_skipped) == 1 and int(skipped.num_updates) == 1
    jax.tree.map(np.testing.assert_array_equal, skipped.log_vars, state.log_vars)
    jax.tree.map(np.testing.assert_array_equal, skipped.opt_state, state.opt_state)


def test_uncertainty_weighting_accepts_a_schedule():
    uw = famo_jax.uncertainty_weighting(2, learning_rate=optax.constant_schedule(0.1))
    state = jax.jit(uw.update)(jnp.array([1.0, 3.0]), jnp.ones(2), uw.init())
    assert np.all(np.isfinite(state.log_vars)) and not np.allclose(state.log_vars, 0.0)
