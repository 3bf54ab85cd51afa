"""FAMO's faults: hyperparameters, its state's shape, bounds of the losses, extreme scales.

What every loss weighting shares (malformed losses named, invalid values that
skip the update and poison ``weigh``'s gradient, dtypes) is checked for FAMO by
``tests/test_conformance.py``. Here: FAMO's own hyperparameters, ``min_losses``
and ``eps``, a state made for another number of tasks, low-precision losses,
``check_famo_losses``, extreme loss scales, one task and 100,000 tasks.
"""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental import checkify

import famo_jax

K = 3
PREV = jnp.array([1.0, 2.0, 4.0])
CURR = jnp.array([0.5, 1.9, 3.0])


def famo_weighting(**kwargs):
    return famo_jax.famo(K, **kwargs)


def advanced_state(weighting, steps=3):
    """A state after a few valid updates, so that 'unchanged' is not trivially zeros."""
    state = weighting.init()
    update = jax.jit(weighting.update)
    for i in range(steps):
        state = update(PREV * (1 + i), CURR * (1 + 0.5 * i), state)
    return state


DEFAULT = famo_weighting()
DEFAULT_UPDATE = jax.jit(DEFAULT.update)


def assert_skipped(new, old):
    """The documented skip: logits and optimizer state untouched, one more skip counted."""
    chex.assert_trees_all_equal(new.logits, old.logits)
    chex.assert_trees_all_equal(new.opt_state, old.opt_state)
    assert int(new.num_updates) == int(old.num_updates)
    assert int(new.num_skipped) == int(old.num_skipped) + 1


def assert_valid_update(new, old):
    assert int(new.num_updates) == int(old.num_updates) + 1
    assert int(new.num_skipped) == int(old.num_skipped)
    assert np.all(np.isfinite(np.asarray(new.logits)))


# ----------------------------------------------------------------------------
# FAMO: hyperparameters, raised by the factory, naming the argument.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "num_tasks, error",
    [
        (0, ValueError),
        (-2, ValueError),
        (2.5, TypeError),
        (True, TypeError),
        ("3", TypeError),
        (None, TypeError),
        (np.float32(3), TypeError),
    ],
)
def test_invalid_num_tasks_is_rejected(num_tasks, error):
    with pytest.raises(error, match="num_tasks must be a positive int"):
        famo_jax.famo(num_tasks)


def test_numpy_integer_num_tasks_is_accepted():
    assert famo_jax.famo(np.int64(3)).init().logits.shape == (3,)


# ----------------------------------------------------------------------------
# FAMO: shapes and dtypes, raised at trace time (also under jit), naming the argument.
# ----------------------------------------------------------------------------


def test_python_sequences_of_floats_are_taken_as_arrays():
    # One rule for every input: floating once converted by jnp.asarray (lists of ints
    # are rejected like int32 arrays, see test_conformance.py).
    weighting = famo_weighting()
    state = weighting.init()
    np.testing.assert_allclose(
        weighting.weigh([1.0, 2.0, 4.0], state), weighting.weigh(jnp.array([1.0, 2.0, 4.0]), state)
    )
    chex.assert_trees_all_close(
        weighting.update([1.0, 2.0, 4.0], [0.5, 1.9, 3.0], state),
        weighting.update(PREV, CURR, state),
    )


@pytest.mark.parametrize("other_num_tasks", [K - 1, K + 1])
def test_state_of_another_num_tasks_raises(other_num_tasks):
    state = famo_jax.famo(other_num_tasks).init()
    weighting = famo_weighting()
    pattern = re.escape(f"state.logits must have shape (num_tasks,) = ({K},)")
    with pytest.raises(ValueError, match=pattern):
        weighting.weigh(PREV, state)
    with pytest.raises(ValueError, match=pattern):
        weighting.update(PREV, CURR, state)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_losses_use_float32_state(dtype):
    weighting = famo_weighting()
    state = advanced_state(weighting)
    prev, curr = PREV.astype(dtype), CURR.astype(dtype)
    # weigh returns the losses' dtype; its gradient (the weights) too, on the simplex.
    loss = weighting.weigh(prev, state)
    assert loss.dtype == dtype and np.isfinite(float(loss))
    weights = famo_jax.loss_weights(weighting, prev, state)
    assert weights.dtype == dtype
    # Low-precision weights: each is rounded to about 2**-8 (bf16) / 2**-11 (fp16).
    np.testing.assert_allclose(float(jnp.sum(weights.astype(jnp.float32))), 1.0, atol=K * 2**-8)
    np.testing.assert_allclose(
        weights.astype(jnp.float32),
        famo_jax.loss_weights(weighting, prev.astype(jnp.float32), state),
        rtol=2**-7,
    )
    # The update runs in float32: it equals the update of the same values in float32.
    new = weighting.update(prev, curr, state)
    assert new.logits.dtype == jnp.float32
    chex.assert_trees_all_equal(
        new, weighting.update(prev.astype(jnp.float32), curr.astype(jnp.float32), state)
    )


# ----------------------------------------------------------------------------
# FAMO: values. Non-finite or out-of-domain losses skip the update.
# ----------------------------------------------------------------------------

BAD_VALUES = [np.nan, np.inf, -np.inf]


@pytest.mark.parametrize("bad", BAD_VALUES, ids=["nan", "inf", "-inf"])
def test_non_finite_loss_makes_weigh_non_finite_and_check_names_the_task(bad):
    weighting = famo_weighting()
    state = advanced_state(weighting)
    losses = PREV.at[1].set(bad)
    # Documented: the weighted loss is not finite (as in the reference), so a
    # training step can detect it (e.g. optax.apply_if_finite); the check names the task.
    assert not np.isfinite(float(jax.jit(weighting.weigh)(losses, state)))
    with pytest.raises(Exception, match=r"losses\[1\] = .* is not finite or not above"):
        famo_jax.check_famo_losses(losses)
    err, _ = jax.jit(checkify.checkify(famo_jax.check_famo_losses))(losses)
    assert "losses[1]" in err.get()


def test_losses_at_min_losses_are_valid_and_take_the_weight():
    # At the bound, l - m + eps = eps > 0: finite, and that task gets (almost) all the weight,
    # since FAMO's weights are proportional to z_i / (l_i - m_i + eps).
    min_losses = jnp.array([1.0, 0.0, 0.0])
    weighting = famo_weighting(min_losses=min_losses)
    state = advanced_state(weighting)
    losses = jnp.array([1.0, 2.0, 4.0])
    assert np.isfinite(float(weighting.weigh(losses, state)))
    weights = famo_jax.loss_weights(weighting, losses, state)
    assert float(weights[0]) > 1 - 1e-6
    np.testing.assert_allclose(float(jnp.sum(weights)), 1.0, rtol=1e-6)
    assert_valid_update(weighting.update(losses, jnp.array([1.5, 1.0, 4.0]), state), state)
    assert_valid_update(weighting.update(jnp.array([1.5, 1.0, 4.0]), losses, state), state)
    famo_jax.check_famo_losses(losses, min_losses)  # does not raise


@pytest.mark.parametrize("where", ["prev", "curr"])
def test_losses_below_min_losses_skip_the_update(where):
    min_losses = jnp.array([1.0, 0.0, 0.0])
    weighting = famo_weighting(min_losses=min_losses)
    state = advanced_state(weighting)
    below = jnp.array([0.5, 2.0, 4.0])
    above = jnp.array([1.5, 1.0, 4.0])
    prev, curr = (below, above) if where == "prev" else (above, below)
    assert_skipped(jax.jit(weighting.update)(prev, curr, state), state)
    assert np.isnan(float(weighting.weigh(below, state)))
    with pytest.raises(Exception, match=r"losses\[0\] = 0.5 is not finite or not above"):
        famo_jax.check_famo_losses(below, min_losses)


def test_exactly_zero_losses_with_default_eps_are_valid():
    weighting = famo_weighting()
    state = advanced_state(weighting)
    zero_one = jnp.array([0.0, 1.0, 2.0])
    assert np.isfinite(float(weighting.weigh(zero_one, state)))
    weights = famo_jax.loss_weights(weighting, zero_one, state)
    assert float(weights[0]) > 1 - 1e-6  # the task at its minimum takes the weight
    assert_valid_update(weighting.update(zero_one, jnp.array([0.0, 0.5, 2.0]), state), state)
    # All losses zero and unchanged: no change in log losses, only the decay acts.
    zeros = jnp.zeros((K,))
    assert_valid_update(weighting.update(zeros, zeros, state), state)
    np.testing.assert_allclose(
        famo_jax.loss_weights(weighting, zeros, state), state.task_weights, rtol=1e-6
    )


def test_exactly_zero_losses_with_eps_zero_skip():
    weighting = famo_weighting(eps=0.0)
    state = advanced_state(weighting)
    zero_one = jnp.array([0.0, 1.0, 2.0])
    assert_skipped(weighting.update(zero_one, PREV, state), state)
    assert_skipped(weighting.update(PREV, zero_one, state), state)
    assert not np.isfinite(float(weighting.weigh(zero_one, state)))


def test_an_update_that_would_make_the_logits_non_finite_is_skipped():
    weighting = famo_weighting(optimizer=optax.sgd(1e38))
    state = weighting.init()
    assert_skipped(
        weighting.update(jnp.array([1e30, 1.0, 1.0]), jnp.array([1e-30, 1.0, 1.0]), state), state
    )


@pytest.mark.parametrize("scale", [1e30, 1e-30])
def test_extreme_loss_scales(scale):
    # eps=0: FAMO only sees ratios of losses, so losses scaled by 1e30 or 1e-30 give the
    # weights and the update of the unscaled losses (float32 handles both magnitudes).
    weighting = famo_weighting(eps=0.0)
    state = advanced_state(weighting)
    assert np.isfinite(float(weighting.weigh(PREV * scale, state)))
    chex.assert_trees_all_close(
        famo_jax.loss_weights(weighting, PREV * scale, state),
        famo_jax.loss_weights(weighting, PREV, state),
        rtol=1e-5,
    )
    new = weighting.update(PREV * scale, CURR * scale, state)
    assert_valid_update(new, state)
    chex.assert_trees_all_close(new, weighting.update(PREV, CURR, state), rtol=1e-4, atol=1e-7)


def test_losses_far_below_default_eps_are_seen_as_equal():
    # Documented: with eps=1e-8, losses of 1e-30 differ by nothing FAMO can see (the gaps are
    # all ~eps), so the weights are the task weights z and the logits only decay.
    weighting = famo_weighting()
    state = advanced_state(weighting)
    tiny = jnp.array([1e-30, 2e-30, 4e-30])
    assert np.isfinite(float(weighting.weigh(tiny, state)))
    np.testing.assert_allclose(
        famo_jax.loss_weights(weighting, tiny, state), state.task_weights, rtol=1e-6
    )
    new = weighting.update(tiny, tiny * 0.1, state)
    assert_valid_update(new, state)
    # Same as an update in which no loss changed (only momentum and decay act).
    ones = jnp.ones((K,))
    chex.assert_trees_all_close(new, weighting.update(ones, ones, state), atol=1e-7)


def test_one_task():
    weighting = famo_jax.famo(1)
    state = weighting.init()
    losses = jnp.array([3.0])
    assert np.isfinite(float(weighting.weigh(losses, state)))
    np.testing.assert_allclose(famo_jax.loss_weights(weighting, losses, state), [1.0])
    for _ in range(3):
        new = weighting.update(losses, losses * 0.5, state)
        assert_valid_update(new, state)
        state = new
    # One task: the softmax Jacobian is zero, so the logit stays at zero.
    np.testing.assert_array_equal(state.logits, [0.0])
    np.testing.assert_array_equal(state.task_weights, [1.0])


def test_one_hundred_thousand_tasks():
    num_tasks = 100_000
    weighting = famo_jax.famo(num_tasks)
    keys = jax.random.split(jax.random.key(0))
    prev = jnp.exp(jax.random.normal(keys[0], (num_tasks,)) * 3.0)
    curr = prev * jnp.exp(-jax.random.uniform(keys[1], (num_tasks,)))
    state = jax.jit(weighting.update)(prev, curr, weighting.init())
    assert_valid_update(state, weighting.init())
    weights = famo_jax.loss_weights(weighting, curr, state)
    chex.assert_shape(weights, (num_tasks,))
    assert float(jnp.min(weights)) >= 0.0
    # float32 sum of 1e5 terms, reduced pairwise by XLA: error ~ log2(1e5) ulp << 1e-5.
    np.testing.assert_allclose(float(jnp.sum(weights)), 1.0, atol=1e-5)
    np.testing.assert_allclose(float(jnp.sum(state.task_weights)), 1.0, atol=1e-5)
    # The tasks whose losses dropped least gained weight.
    drop = np.asarray(jnp.log(prev) - jnp.log(curr))
    logits = np.asarray(state.logits)
    assert logits[drop < 0.1].mean() > 0 > logits[drop > 0.9].mean()
