"""The Flax examples run end to end on tiny settings, and their FAMO modes do what they say."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import famo_jax
import famo_jax.nnx
from examples import _digits, flax_linen_multitask, flax_nnx_multitask

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# FAMO's state after one step depends on log(before) - log(after), a small
# difference of two losses that the jitted step and the eager check round
# differently (relative errors ~1e-5 in the Adam moments).
TOL = 1e-3


@pytest.fixture(scope="module")
def splits():
    return _digits.load_split()


def test_digits_split_and_targets(splits):
    train, test = splits
    assert len(train.digits) + len(test.digits) == 1797
    assert train.images.shape[1] == _digits.INPUT_DIM and train.images.dtype == np.float32
    assert 0.0 <= train.images.min() and train.images.max() <= 1.0
    digit, parity, ge5, prime, value = (np.asarray(t) for t in _digits.targets(jnp.arange(10)))
    np.testing.assert_array_equal(digit, np.arange(10))
    np.testing.assert_array_equal(parity, [0, 1, 0, 1, 0, 1, 0, 1, 0, 1])
    np.testing.assert_array_equal(ge5, [0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(prime, [0, 0, 1, 1, 0, 1, 0, 1, 0, 0])
    np.testing.assert_array_equal(value, np.arange(10))


def test_digits_losses_and_metrics_of_perfect_outputs():
    digits = jnp.array([0, 3, 5, 8])
    digit, parity, ge5, prime, value = _digits.targets(digits)
    confident = lambda t: (20.0 * (2.0 * t - 1.0))[:, None]
    outputs = (
        20.0 * jax.nn.one_hot(digit, 10),
        confident(parity),
        confident(ge5),
        confident(prime),
        value[:, None],
    )
    losses = _digits.task_losses(outputs, digits)
    chex.assert_shape(losses, (_digits.NUM_TASKS,))
    chex.assert_trees_all_close(losses, jnp.zeros(5), atol=1e-6)
    chex.assert_trees_all_close(
        _digits.task_metrics(outputs, digits), jnp.array([1.0, 1.0, 1.0, 1.0, 0.0])
    )


@pytest.mark.parametrize("example", [flax_nnx_multitask, flax_linen_multitask])
def test_main_runs_both_modes_and_saves_the_plot(example, tmp_path, capsys):
    plot = tmp_path / "weights.png"
    results = example.main(["--quick", "--no-progress", "--plot", str(plot)])
    assert plot.read_bytes()[:8] == PNG_MAGIC
    out = capsys.readouterr().out
    for task in _digits.TASK_NAMES:
        assert f"| {task}" in out
    for mode in example.MODES:
        metrics = results["metrics"][mode]
        chex.assert_shape(metrics, (_digits.NUM_TASKS,))
        assert np.all(np.isfinite(metrics)), mode
        assert np.all((metrics[:4] >= 0) & (metrics[:4] <= 1)), mode  # accuracies
        history = results["histories"][mode]
        for values in history:
            chex.assert_shape(values, (30, _digits.NUM_TASKS))
            assert np.all(np.isfinite(values)), mode
        np.testing.assert_allclose(history.task_weights.sum(-1), 1.0, rtol=1e-5)
        np.testing.assert_allclose(history.loss_weights.sum(-1), 1.0, rtol=1e-4)
        state = results["states"][mode]
        # Same-batch updates at every step; lagged at every step but the first
        # (the NNX example skips it through NaN previous losses, Linen by a branch).
        assert int(state.num_updates) == (30 if mode == "same-batch" else 29)
        lagged_skip = mode == "lagged" and example is flax_nnx_multitask
        assert int(state.num_skipped) == (1 if lagged_skip else 0)
        assert not np.allclose(state.logits, 0.0), mode


@pytest.mark.parametrize("example", [flax_nnx_multitask, flax_linen_multitask])
def test_unknown_mode_is_rejected(example, splits):
    with pytest.raises(ValueError, match="mode must be one of"):
        example.train("both", splits[0], steps=1)


def _batches(splits, size=32):
    train = splits[0]
    return [(train.images[i : i + size], train.digits[i : i + size]) for i in (0, size)]


def test_nnx_same_batch_step_is_the_authors_update(splits):
    (images, digits), _ = _batches(splits)
    functional = famo_jax.famo(_digits.NUM_TASKS)
    weighting = famo_jax.nnx.Weighting(functional)
    model = flax_nnx_multitask.MultiHeadMLP(16, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    before = _digits.task_losses(model(images), digits)
    record = flax_nnx_multitask.same_batch_step(model, optimizer, weighting, images, digits)
    after = _digits.task_losses(model(images), digits)  # the model was updated in place
    assert int(optimizer.step[...]) == 1
    chex.assert_trees_all_close(record["losses"], before, rtol=1e-6)
    chex.assert_trees_all_close(
        weighting.value, functional.update(before, after, functional.init()), rtol=TOL, atol=1e-9
    )


def test_nnx_lagged_step_updates_from_the_previous_losses_after_the_step(splits):
    (x0, d0), (x1, d1) = _batches(splits)
    functional = famo_jax.famo(_digits.NUM_TASKS)
    weighting = famo_jax.nnx.Weighting(functional)
    model = flax_nnx_multitask.MultiHeadMLP(16, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    init = functional.init()
    # Step 0 has no previous losses (NaN): FAMO skips the update.
    nan = jnp.full(_digits.NUM_TASKS, jnp.nan)
    losses0, _ = flax_nnx_multitask.lagged_step(model, optimizer, weighting, nan, x0, d0)
    assert int(weighting.value.num_updates) == 0 and int(weighting.value.num_skipped) == 1
    chex.assert_trees_all_equal(weighting.value.logits, init.logits)
    # Step 1 is weighted with the state so far, then update(losses_0, losses_1).
    losses1 = _digits.task_losses(model(x1), d1)
    returned1, record = flax_nnx_multitask.lagged_step(model, optimizer, weighting, losses0, x1, d1)
    chex.assert_trees_all_close(returned1, losses1, rtol=1e-6)
    chex.assert_trees_all_close(record["task_weights"], init.task_weights, rtol=1e-6)
    expected = functional.update(losses0, losses1, init)
    chex.assert_trees_all_close(weighting.value.logits, expected.logits, rtol=TOL, atol=1e-9)
    assert int(weighting.value.num_updates) == 1


def test_linen_same_batch_step_is_the_authors_update(splits):
    (images, digits), _ = _batches(splits)
    state = flax_linen_multitask.create_train_state(jax.random.key(0), hidden=16)
    apply = lambda params: _digits.task_losses(state.apply_fn({"params": params}, images), digits)
    new_state, record = flax_linen_multitask.same_batch_step(state, images, digits)
    before, after = apply(state.params), apply(new_state.params)
    assert int(new_state.step) == 1
    chex.assert_trees_all_close(record["losses"], before, rtol=1e-6)
    chex.assert_trees_all_close(new_state.prev_losses, before, rtol=1e-6)
    chex.assert_trees_all_close(
        new_state.famo_state,
        state.weighting.update(before, after, state.famo_state),
        rtol=TOL,
        atol=1e-9,
    )


def test_linen_lagged_step_updates_from_the_previous_losses_before_weighing(splits):
    (x0, d0), (x1, d1) = _batches(splits)
    state = flax_linen_multitask.create_train_state(jax.random.key(0), hidden=16)
    init = state.famo_state
    state1, _ = flax_linen_multitask.lagged_step(state, x0, d0)
    chex.assert_trees_all_equal(state1.famo_state, init)
    losses1 = _digits.task_losses(state1.apply_fn({"params": state1.params}, x1), d1)
    state2, record = flax_linen_multitask.lagged_step(state1, x1, d1)
    expected = state.weighting.update(state1.prev_losses, losses1, init)
    chex.assert_trees_all_close(state2.famo_state, expected, rtol=TOL, atol=1e-9)
    chex.assert_trees_all_close(state2.prev_losses, losses1, rtol=1e-6)
    chex.assert_trees_all_close(record["task_weights"], expected.task_weights, rtol=1e-6)
    # The heads' parameters live under their own keys (used by optax.partition).
    assert set(state.params) == {"trunk"} | {f"head_{t}" for t in _digits.TASK_NAMES}
