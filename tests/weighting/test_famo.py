"""Tests of famo_jax.famo: transformations, composition, semantics and bad input.

Parity with the PyTorch reference is in test_famo_parity.py.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental import checkify

import famo_jax

K = 3
MIN_LOSSES = np.array([0.0, 0.5, -1.0])
EPS = 1e-8


def _sequence(seed: int, num_steps: int = 20, num_tasks: int = K, min_losses=MIN_LOSSES):
    """Noisy decreasing losses above ``min_losses``, scales 1e-2..1e2: ``(num_steps + 1, k)``."""
    rng = np.random.default_rng(seed)
    scales = 10.0 ** rng.uniform(-2.0, 2.0, num_tasks)
    steps = -0.02 + 0.1 * rng.standard_normal((num_steps + 1, num_tasks))
    gaps = scales * np.exp(np.cumsum(steps, axis=0))
    return jnp.asarray(min_losses + gaps, jnp.float32)


def _step_fn(weighting):
    """The authors' protocol: weigh the previous losses, then update."""

    def step(state, prev, curr):
        loss, grad = jax.value_and_grad(weighting.weigh)(prev, state)
        return weighting.update(prev, curr, state), (loss, grad)

    return step


# Shared by most tests so that its jitted functions compile once.
DEFAULT = famo_jax.famo(K, min_losses=MIN_LOSSES)
DEFAULT_UPDATE = jax.jit(DEFAULT.update)


def _warm_state(weighting=DEFAULT, seed=0, num_steps=4):
    """A state after a few valid updates (non-zero logits and Adam moments)."""
    update = DEFAULT_UPDATE if weighting is DEFAULT else weighting.update
    losses = _sequence(seed, num_steps)
    state = weighting.init()
    for t in range(num_steps):
        state = update(losses[t], losses[t + 1], state)
    return state


# --- transformations -----------------------------------------------------------------------


def test_jitted_and_eager_paths_agree():
    weighting = famo_jax.famo(K, gamma=1e-2, min_losses=MIN_LOSSES)
    losses = _sequence(0)
    step = _step_fn(weighting)
    jitted = jax.jit(step)
    eager_state = jit_state = weighting.init()
    for t in range(20):
        eager_state, eager_out = step(eager_state, losses[t], losses[t + 1])
        jit_state, jit_out = jitted(jit_state, losses[t], losses[t + 1])
        chex.assert_trees_all_close(eager_out, jit_out, rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(eager_state, jit_state, rtol=1e-5, atol=1e-7)
    assert int(jit_state.num_updates) == 20
    assert float(jnp.abs(jit_state.logits).max()) > 1e-3  # the logits did move


def _model_losses(params, x, ys, scales):
    """Shared trunk with one linear head per task; MSE losses of very different scales."""
    features = jnp.tanh(x @ params["trunk"])
    predictions = jnp.einsum("nh,kh->nk", features, params["heads"])
    return scales * jnp.mean((predictions - ys) ** 2, axis=0)


# --- semantics -------------------------------------------------------------------------------


def test_effective_weights_are_c_z_over_gaps_and_sum_to_one():
    weighting = famo_jax.famo(K, gamma=1e-3, min_losses=MIN_LOSSES)
    state = _warm_state(weighting, num_steps=6)
    losses = _sequence(5, num_steps=1)[0]
    weights = jax.jit(famo_jax.loss_weights, static_argnums=0)(weighting, losses, state)

    logits = np.asarray(state.logits, np.float64)
    z = np.exp(logits) / np.sum(np.exp(logits))
    assert not np.allclose(z, 1.0 / K)  # a non-trivial state
    gaps = np.asarray(losses, np.float64) - MIN_LOSSES + EPS
    c = 1.0 / np.sum(z / gaps)
    chex.assert_trees_all_close(weights, c * z / gaps, rtol=1e-5)
    chex.assert_trees_all_close(jnp.sum(weights), 1.0, atol=1e-6)
    chex.assert_trees_all_close(
        weighting.weigh(losses, state), np.sum(c * z * np.log(gaps)), rtol=1e-5
    )


def test_task_weights_are_the_softmax_of_the_logits():
    weighting = DEFAULT
    assert isinstance(weighting.init(), famo_jax.FAMOState)
    chex.assert_trees_all_close(weighting.init().task_weights, jnp.full(K, 1.0 / K))
    state = _warm_state()
    chex.assert_trees_all_close(state.task_weights, jax.nn.softmax(state.logits))
    # Also on a batch of states: the softmax is over the task axis.
    batch = jax.tree.map(lambda a, b: jnp.stack([a, b]), weighting.init(), state)
    chex.assert_shape(batch.task_weights, (2, K))
    chex.assert_trees_all_close(batch.task_weights[1], state.task_weights)
    chex.assert_trees_all_close(batch.task_weights.sum(-1), jnp.ones(2), atol=1e-6)


def test_a_user_supplied_optimizer_is_used():
    weighting = famo_jax.famo(K, min_losses=MIN_LOSSES, optimizer=optax.sgd(0.5))
    state = weighting.init()
    chex.assert_trees_all_equal_structs(state.opt_state, optax.sgd(0.5).init(state.logits))
    prev, curr = _sequence(2, num_steps=1)
    state = jax.jit(weighting.update)(prev, curr, state)
    delta = np.log(np.asarray(prev, np.float64) - MIN_LOSSES + EPS) - np.log(
        np.asarray(curr, np.float64) - MIN_LOSSES + EPS
    )
    z = np.full(K, 1.0 / K)
    chex.assert_trees_all_close(state.logits, -0.5 * z * (delta - z @ delta), rtol=1e-5)


def test_learning_rate_accepts_an_optax_schedule():
    losses = _sequence(3, num_steps=10)

    def run(weighting):
        state = weighting.init()
        trajectory = []
        for t in range(10):
            state = jax.jit(weighting.update)(losses[t], losses[t + 1], state)
            trajectory.append(state.logits)
        return jnp.stack(trajectory)

    constant = run(famo_jax.famo(K, learning_rate=0.025, min_losses=MIN_LOSSES))
    scheduled = run(
        famo_jax.famo(K, learning_rate=optax.constant_schedule(0.025), min_losses=MIN_LOSSES)
    )
    chex.assert_trees_all_close(scheduled, constant, rtol=1e-6, atol=1e-8)

    # A schedule that is zero for the first three updates, then 0.1.
    schedule = lambda count: jnp.where(count < 3, 0.0, 0.1)  # noqa: E731
    delayed = run(famo_jax.famo(K, learning_rate=schedule, min_losses=MIN_LOSSES))
    chex.assert_trees_all_equal(delayed[:3], jnp.zeros((3, K)))
    assert float(jnp.abs(delayed[3]).max()) > 1e-3


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_losses_keep_float32_logits(dtype):
    weighting = DEFAULT
    losses = _sequence(4, num_steps=5).astype(dtype)
    state = _warm_state()
    loss, grad = jax.jit(jax.value_and_grad(weighting.weigh))(losses[0], state)
    assert loss.dtype == dtype and grad.dtype == dtype
    update = jax.jit(weighting.update)
    low = update(losses[0], losses[1], state)
    chex.assert_trees_all_equal_dtypes(low, state)
    assert low.logits.dtype == jnp.float32
    assert int(low.num_updates) == int(state.num_updates) + 1
    # Computed in float32 from the rounded losses: same as float32 losses of equal value.
    high = update(losses[0].astype(jnp.float32), losses[1].astype(jnp.float32), state)
    chex.assert_trees_all_close(low, high, rtol=1e-6, atol=1e-8)


def test_axis_name_averages_losses_across_the_mapped_axis():
    num_replicas = 4
    kwargs = dict(gamma=1e-3, min_losses=MIN_LOSSES)
    mapped, single = famo_jax.famo(K, axis_name="replicas", **kwargs), famo_jax.famo(K, **kwargs)
    # Per-replica losses around a common trend, all above min_losses.
    trend = _sequence(6, num_steps=8)
    noise = jnp.exp(0.3 * jax.random.normal(jax.random.key(1), (num_replicas, 9, K)))
    replica_losses = MIN_LOSSES + (trend - MIN_LOSSES) * noise  # (replicas, steps + 1, K)
    mean_losses = replica_losses.mean(axis=0)

    step = jax.jit(jax.vmap(_step_fn(mapped), axis_name="replicas"))
    states = jax.tree.map(lambda a: jnp.stack([a] * num_replicas), mapped.init())
    reference = single.init()
    for t in range(8):
        states, (loss, grad) = step(states, replica_losses[:, t], replica_losses[:, t + 1])
        global_weights = famo_jax.loss_weights(single, mean_losses[t], reference)
        chex.assert_trees_all_close(
            loss, jnp.full(num_replicas, single.weigh(mean_losses[t], reference)), rtol=1e-6
        )
        chex.assert_trees_all_close(grad, jnp.stack([global_weights] * num_replicas), rtol=1e-5)
        reference = single.update(mean_losses[t], mean_losses[t + 1], reference)
        for replica in range(num_replicas):
            chex.assert_trees_all_close(
                jax.tree.map(lambda a, r=replica: a[r], states), reference, rtol=1e-5, atol=1e-7
            )
    assert int(reference.num_updates) == 8


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(num_tasks=0), ValueError, r"num_tasks must be a positive int, got 0"),
        (dict(num_tasks=-1), ValueError, r"num_tasks must be a positive int, got -1"),
        (dict(num_tasks=2.5), TypeError, r"num_tasks must be a positive int, got 2\.5"),
        (dict(num_tasks=True), TypeError, r"num_tasks must be a positive int, got True"),
        (dict(num_tasks="3"), TypeError, r"num_tasks must be a positive int, got '3'"),
        (dict(learning_rate=-0.1), ValueError, r"learning_rate must be .*>= 0, got -0\.1"),
        (dict(learning_rate=float("nan")), ValueError, r"learning_rate must be .*got nan"),
        (dict(learning_rate=jnp.asarray(-0.5)), ValueError, r"learning_rate must be .*got -0\.5"),
        (dict(learning_rate=jnp.ones(2)), TypeError, r"learning_rate must be a number >= 0"),
        (dict(gamma=-1e-3), ValueError, r"gamma must be .*>= 0, got -0\.001"),
        (dict(gamma=float("nan")), ValueError, r"gamma must be .*got nan"),
        (dict(min_losses=[0.0, 0.0]), ValueError, r"min_losses must .*\(3,\), got shape \(2,\)"),
        (dict(min_losses=np.zeros((3, 1))), ValueError, r"min_losses must .*got shape \(3, 1\)"),
        (dict(logits_dtype=jnp.int32), TypeError, r"logits_dtype must be a floating dtype"),
        (dict(optimizer="adam"), TypeError, r"optimizer must be an optax.GradientTransformation"),
        (
            dict(optimizer=optax.adam(1e-2).update),
            TypeError,
            r"optimizer must be an optax.GradientTransformation",
        ),
    ],
)
def test_bad_hyperparameters_raise_naming_the_argument(kwargs, error, match):
    kwargs = {"num_tasks": K, **kwargs}
    with pytest.raises(error, match=match):
        famo_jax.famo(**kwargs)


INVALID = [
    pytest.param(0, float("nan"), id="nan"),
    pytest.param(0, float("inf"), id="+inf"),
    pytest.param(0, float("-inf"), id="-inf"),
    pytest.param(1, MIN_LOSSES[1] - 0.25, id="below_min"),
    pytest.param(0, -EPS, id="at_min_minus_eps"),
]


@pytest.mark.parametrize("task, value", INVALID)
@pytest.mark.parametrize("which", ["prev", "curr"])
def test_invalid_losses_skip_the_update_and_leave_the_state_unchanged(task, value, which):
    weighting, update = DEFAULT, DEFAULT_UPDATE
    state = _warm_state()
    prev, curr = _sequence(7, num_steps=1)
    bad = (prev if which == "prev" else curr).at[task].set(value)
    args = (bad, curr) if which == "prev" else (prev, bad)

    skipped = update(*args, state)
    chex.assert_trees_all_equal(skipped.logits, state.logits)
    chex.assert_trees_all_equal(skipped.opt_state, state.opt_state)
    assert int(skipped.num_skipped) == int(state.num_skipped) + 1
    assert int(skipped.num_updates) == int(state.num_updates)
    # The skipped step is a no-op: training continues exactly as without it.
    chex.assert_trees_all_equal(
        update(prev, curr, skipped)._replace(num_skipped=state.num_skipped),
        update(prev, curr, state),
    )
    if which == "prev":  # weigh is the reference's: NaN (or inf) for such losses
        assert not np.isfinite(float(weighting.weigh(bad, state)))


def test_losses_exactly_at_min_losses_are_valid_as_in_the_reference():
    # D = l - m + eps = eps > 0: the reference takes a finite step; so does famo.
    state = _warm_state()
    prev = _sequence(8, num_steps=1)[0]
    curr = jnp.asarray(MIN_LOSSES, jnp.float32)
    new = DEFAULT_UPDATE(prev, curr, state)
    assert int(new.num_updates) == int(state.num_updates) + 1 and int(new.num_skipped) == 0
    assert np.all(np.isfinite(new.logits)) and not np.array_equal(new.logits, state.logits)


def test_check_famo_losses_raises_eagerly_naming_the_task():
    famo_jax.check_famo_losses(jnp.array([1.0, 0.6, -0.5]), MIN_LOSSES)  # valid: no error
    with pytest.raises(ValueError, match=r"losses\[2\] = -1\.5 is not finite or not above"):
        famo_jax.check_famo_losses(jnp.array([1.0, 0.6, -1.5]), MIN_LOSSES)
    with pytest.raises(ValueError, match=r"^curr_losses\[1\] = 0\.49"):
        famo_jax.check_famo_losses(
            jnp.array([1.0, 0.5 - 1e-3, 0.0]), MIN_LOSSES, name="curr_losses"
        )
    with pytest.raises(ValueError, match=r"losses\[0\] = nan"):
        famo_jax.check_famo_losses(jnp.array([np.nan, 1.0, np.inf]))
    with pytest.raises(TypeError, match="losses must be a 1-D array of floats"):
        famo_jax.check_famo_losses(jnp.ones(K, jnp.int32))
    with pytest.raises(ValueError, match=r"min_losses must .*\(3,\), got shape \(2,\)"):
        famo_jax.check_famo_losses(jnp.ones(K), [0.0, 0.0])


def test_learning_rate_accepts_a_concrete_zero_dim_array():
    losses = _sequence(3, num_steps=1)
    as_float = famo_jax.famo(K, learning_rate=0.025, min_losses=MIN_LOSSES)
    as_array = famo_jax.famo(K, learning_rate=jnp.asarray(0.025), min_losses=MIN_LOSSES)
    chex.assert_trees_all_equal(
        as_float.update(losses[0], losses[1], as_float.init()),
        as_array.update(losses[0], losses[1], as_array.init()),
    )


def test_check_famo_losses_under_checkify_and_jit_names_the_first_bad_task():
    weighting = DEFAULT

    @jax.jit
    @checkify.checkify
    def checked_update(prev, curr, state):
        famo_jax.check_famo_losses(prev, MIN_LOSSES, name="prev_losses")
        famo_jax.check_famo_losses(curr, MIN_LOSSES, name="curr_losses")
        return weighting.update(prev, curr, state)

    prev, curr = _sequence(9, num_steps=1)
    err, state = checked_update(prev, curr, weighting.init())
    assert err.get() is None and int(state.num_updates) == 1

    err, _ = checked_update(prev, curr.at[2].set(-3.0).at[1].set(np.inf), weighting.init())
    assert err.get().startswith("curr_losses[1] = inf is not finite")
    with pytest.raises(checkify.JaxRuntimeError, match=r"curr_losses\[1\]"):
        err.throw()
    err, _ = checked_update(prev.at[2].set(-1.5), curr, weighting.init())
    assert err.get().startswith("prev_losses[2] = -1.5 ")


@pytest.mark.parametrize("value", [0.30078125, 0.302734375])  # bfloat16 neighbours of 0.301
def test_check_famo_losses_agrees_with_update_for_bfloat16_losses(value):
    # The bound 0.301 rounds to 0.30078125 in bfloat16; update() compares in float32.
    weighting = famo_jax.famo(2, min_losses=[0.301, 1.0])
    losses = jnp.array([value, 2.0], jnp.bfloat16)
    skipped = bool(jax.jit(weighting.update)(losses, losses, weighting.init()).num_skipped)
    err, _ = checkify.checkify(famo_jax.check_famo_losses)(losses, [0.301, 1.0])
    assert skipped == (value < 0.301)
    assert (err.get() is not None) == skipped
