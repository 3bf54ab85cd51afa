"""Loss-weighting baselines: LS, SI, RLW, DWA, UW against their definitions and references."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
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
    # eps = 0: a zero loss has log -inf, as in the reference.
    exact = famo_jax.scale_invariant(2, eps=0.0)
    assert jnp.isneginf(jax.jit(exact.weigh)(zero, exact.init()))
    # A negative loss has no log: NaN, as documented.
    assert jnp.isnan(jax.jit(si.weigh)(jnp.array([-1.0, 1.0]), si.init()))


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


@pytest.mark.parametrize(
    "factory",
    [
        famo_jax.linear_scalarization,
        famo_jax.scale_invariant,
        famo_jax.random_loss_weighting,
        famo_jax.dwa,
        famo_jax.uncertainty_weighting,
    ],
)
def test_inputs_are_checked_at_trace_time(factory):
    weighting = factory(3)
    state = weighting.init()
    with pytest.raises(ValueError, match="shape"):
        jax.jit(weighting.weigh)(jnp.ones(2), state)
    with pytest.raises(TypeError, match="floating"):
        weighting.weigh(jnp.ones(3, jnp.int32), state)
    with pytest.raises(ValueError, match="prev_losses"):
        weighting.update(jnp.ones(4), jnp.ones(3), state)
    with pytest.raises(ValueError, match="curr_losses"):
        weighting.update(jnp.ones(3), jnp.ones((3, 1)), state)


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
