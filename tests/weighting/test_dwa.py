"""Dynamic weight average against the Nash-MTL codebase's reference, step by step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import famo_jax

# Jitted, as everywhere in these tests: run eagerly, every operation compiles on its own.
weights_of = jax.jit(famo_jax.loss_weights, static_argnums=0)


# ---------------------------------------------------------------------------
# Dynamic weight average, against a NumPy port of the reference class.


class _ReferenceDwa:
    """NumPy port of nash-mtl's DynamicWeightAverage (effective weights = weights / k)."""

    def __init__(self, n_tasks, iteration_window, temp):
        self.n_tasks, self.window, self.temp = n_tasks, iteration_window, temp
        self.running_iterations = 0
        self.costs = np.ones((iteration_window * 2, n_tasks), dtype=np.float32)
        self.weights = np.ones(n_tasks, dtype=np.float32)

    def get_weights(self, losses):
        self.costs[:-1, :] = self.costs[1:, :]
        self.costs[-1, :] = losses
        if self.running_iterations > self.window:
            ws = self.costs[self.window :].mean(0) / self.costs[: self.window].mean(0)
            self.weights = self.n_tasks * np.exp(ws / self.temp) / np.exp(ws / self.temp).sum()
        self.running_iterations += 1
        # loss = mean(weights * losses): the effective weights are weights / k.
        return self.weights / self.n_tasks


@pytest.mark.parametrize("window, temperature", [(3, 2.0), (5, 0.5)])
def test_dwa_matches_the_reference_step_by_step(window, temperature):
    num_tasks, num_steps = 3, 4 * window + 7
    rng = np.random.default_rng(0)
    decay = np.array([0.99, 0.9, 1.0])
    losses = rng.uniform(0.5, 2.0, (num_steps, num_tasks)) * decay ** np.arange(num_steps)[:, None]
    losses = losses.astype(np.float32)
    reference = _ReferenceDwa(num_tasks, window, temperature)
    expected = np.stack([reference.get_weights(row) for row in losses])

    weighting = famo_jax.dwa(num_tasks, temperature=temperature, window=window)

    def step(state, row):
        w = famo_jax.loss_weights(weighting, row, state)
        return weighting.update(row, row, state), w

    state, weights = jax.jit(lambda ls: jax.lax.scan(step, weighting.init(), ls))(losses)
    np.testing.assert_allclose(weights, expected, rtol=1e-5)
    np.testing.assert_allclose(state.costs, reference.costs, rtol=1e-6)
    assert int(state.num_updates) == reference.running_iterations
    # The first window + 1 steps use equal weights, later ones do not.
    np.testing.assert_allclose(weights[: window + 1], 1 / num_tasks)
    assert not np.allclose(weights[-1], 1 / num_tasks)


def test_dwa_weigh_does_not_mutate_and_matches_its_value():
    weighting = famo_jax.dwa(2, window=1)
    state = weighting.init()
    for row in ([1.0, 1.0], [1.0, 1.0]):
        state = jax.jit(weighting.update)(jnp.array(row), jnp.array(row), state)
    losses = jnp.array([2.0, 0.5])
    w = weights_of(weighting, losses, state)
    np.testing.assert_allclose(
        jax.jit(weighting.weigh)(losses, state), jnp.dot(w, losses), rtol=1e-6
    )
    np.testing.assert_allclose(w, jax.nn.softmax(jnp.array([2.0, 0.5]) / 2.0), rtol=1e-6)
    np.testing.assert_array_equal(state.costs, jnp.ones((2, 2)))


def test_dwa_skips_non_finite_losses_and_keeps_weights_finite():
    weighting = famo_jax.dwa(2, window=2)
    state = weighting.init()
    for row in ([1.0, 2.0], [jnp.nan, 1.0], [jnp.inf, 1.0]):
        state = jax.jit(weighting.update)(jnp.array(row), jnp.ones(2), state)
    assert int(state.num_updates) == 1 and int(state.num_skipped) == 2
    assert np.all(np.isfinite(state.costs))
    # A history of zeros gives 0/0 ratios: counted as unchanged losses.
    zeros = weighting.init()._replace(costs=jnp.zeros((4, 2)), num_updates=jnp.array(10))
    np.testing.assert_allclose(weights_of(weighting, jnp.zeros(2), zeros), [0.5, 0.5])
    # x/0: the task whose loss rose from zero gets all the weight.
    np.testing.assert_allclose(weights_of(weighting, jnp.array([1.0, 0.0]), zeros), [1.0, 0.0])
