"""Conformance: every method of ``tests/registry.py`` passes the same checks.

Loss weightings (``init/weigh/update``) and gradient aggregators (optax
transformations over task gradients stacked on a leading axis) are each checked
for: jit without retracing over 100 steps, vmap over states, dtypes (float32
and bfloat16 inputs, float32 state), a jitted train step of a small multi-head
model inside ``optax.chain``, finite results on zero and huge inputs, faults
(invalid values never corrupt the state and never turn into a silent wrong
step; malformed inputs raise naming the argument), orbax checkpoints, and the
laws the registry declares for them (task-order invariance, the mean of equal
task gradients, the implicit-Gramian path equal to the stacked one).
Method-specific behaviour and parity with the references live in each
method's own test file.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import famo_jax
from famo_jax import aggregation
from tests import registry

K = 3
SCALES = jnp.array([1.0, 10.0, 0.1])
PROPERTY_SETTINGS = settings(max_examples=8, deadline=None, derandomize=True)
NON_FINITE = [pytest.param(np.nan, id="nan"), pytest.param(np.inf, id="inf")]

weightings = pytest.mark.parametrize("case", registry.WEIGHTINGS, ids=str)
aggregators = pytest.mark.parametrize("case", registry.AGGREGATORS, ids=str)


def all_finite(tree) -> bool:
    return all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(tree))


# Host-side (NumPy) tree helpers: run eagerly in JAX, each stack or slice of a new
# shape would compile its own small program.
def stack_trees(trees):
    return jax.tree.map(lambda *leaves: np.stack([np.asarray(x) for x in leaves]), *trees)


def tree_index(tree, i):
    return jax.tree.map(lambda leaf: np.asarray(leaf)[i], tree)


def normal(seed, shape, dtype=jnp.float32):
    # NumPy draws: jax.random run eagerly would compile a program per shape.
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def positive_losses(seed, shape=(K,)):
    return jnp.asarray(np.exp(np.random.default_rng(seed).standard_normal(shape)), jnp.float32)


def assert_state_kept(new, old, *, skipped_counted: bool):
    """The documented fault behaviour: nothing changes but PRNG keys and counters.

    Every field of every NamedTuple in the state is unchanged, except ``key``
    (which may advance), ``num_updates`` and ``num_skipped``: with
    ``skipped_counted`` the update is counted as skipped, otherwise the two
    counters advance by one in total.
    """
    if isinstance(new, tuple) and hasattr(new, "_fields"):
        assert type(new) is type(old)
        counters = [f for f in ("num_updates", "num_skipped") if f in new._fields]
        for field in new._fields:
            if field == "key" or field in counters:
                continue
            assert_state_kept(
                getattr(new, field), getattr(old, field), skipped_counted=skipped_counted
            )
        if counters:
            advanced = {f: int(getattr(new, f)) - int(getattr(old, f)) for f in counters}
            if skipped_counted:
                assert advanced == {"num_updates": 0, "num_skipped": 1} | (
                    {} if "num_updates" in counters else {"num_updates": 0}
                ) or advanced == {"num_skipped": 1}, advanced
            else:
                assert sum(advanced.values()) == 1 and min(advanced.values()) >= 0, advanced
    elif isinstance(new, (tuple, list)):
        assert len(new) == len(old)
        for a, b in zip(new, old, strict=True):
            assert_state_kept(a, b, skipped_counted=skipped_counted)
    elif isinstance(new, dict):
        assert new.keys() == old.keys()
        for key in new:
            assert_state_kept(new[key], old[key], skipped_counted=skipped_counted)
    else:
        chex.assert_trees_all_equal(new, old)


# ===========================================================================
# Loss weightings.


def weighting_step(weighting):
    """One protocol step: the weighted loss, the effective weights, the next state."""

    def step(state, losses, next_losses):
        value, weights = jax.value_and_grad(weighting.weigh)(losses, state)
        return value, weights, weighting.update(losses, next_losses, state)

    return step


@functools.cache
def weighting_and_step(name):
    """A weighting and its jitted step, shared by the tests (one compile per dtype)."""
    weighting = registry.BY_NAME[name].make(K)
    return weighting, jax.jit(weighting_step(weighting))


def advanced(name, steps=4):
    """A state after a few valid steps (past DWA's equal-weights phase)."""
    weighting, step = weighting_and_step(name)
    state = weighting.init()
    for t in range(steps):
        losses = positive_losses(100 + t)
        _, _, state = step(state, losses, losses * jnp.array([0.9, 0.5, 1.2]))
    return state


@weightings
def test_weighting_jits_without_retracing_over_100_steps(case):
    weighting = case.make(K)
    chex.clear_trace_counter()
    step = jax.jit(chex.assert_max_traces(weighting_step(weighting), n=1))
    losses = np.asarray(positive_losses(0, (101, K)))
    state = weighting.init()
    for t in range(100):
        value, weights, state = step(state, losses[t], losses[t + 1])
    assert all_finite((value, weights, state))


@weightings
def test_weighting_vmaps_over_states(case):
    weighting, single = weighting_and_step(case.name)
    batch = 3

    def after(history):  # distinct histories
        state = weighting.init()
        for losses in history:
            state = weighting.update(losses, losses * jnp.array([0.9, 0.5, 1.2]), state)
        return state

    states = jax.jit(jax.vmap(after))(positive_losses(1, (batch, 3, K)))
    if "key" in getattr(states, "_fields", ()):  # independent random streams
        states = states._replace(key=jax.random.split(jax.random.PRNGKey(3), batch))
    losses = positive_losses(2, (batch, K))
    # Unequal relative changes: with equal ones FAMO's logits gradient is zero up to
    # rounding, which Adam magnifies differently in the batched and looped programs.
    next_losses = losses * jnp.array([0.8, 0.5, 0.95])
    batched = jax.jit(jax.vmap(weighting_step(weighting)))(states, losses, next_losses)
    looped = stack_trees(
        [single(tree_index(states, b), losses[b], next_losses[b]) for b in range(batch)]
    )
    chex.assert_trees_all_close(batched, looped, rtol=1e-5, atol=1e-7)


@weightings
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_weighting_keeps_the_losses_dtype_and_a_float32_state(case, dtype):
    weighting, step = weighting_and_step(case.name)
    state = weighting.init()
    losses = positive_losses(4).astype(dtype)
    value, weights, new_state = step(state, losses, losses * np.array(0.5, dtype))
    assert value.dtype == dtype and value.shape == ()
    assert weights.dtype == dtype and weights.shape == (K,)
    chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
    assert all_finite((value, weights, new_state))


def init_model(seed):
    return {"trunk": 0.5 * normal((seed, 0), (4, 8)), "heads": 0.5 * normal((seed, 1), (K, 8))}


def model_losses(params, x, y):
    preds = jnp.tanh(x @ params["trunk"]) @ params["heads"].T
    return SCALES * jnp.mean((preds - y) ** 2, axis=0)


@functools.cache
def model_data():
    x = normal(42, (32, 4))
    teacher = init_model(43)
    return x, jnp.tanh(x @ teacher["trunk"]) @ teacher["heads"].T


@weightings
def test_weighting_trains_a_multi_head_model_inside_optax_chain(case):
    weighting = case.make(K)
    x, y = model_data()
    tx = optax.chain(optax.clip_by_global_norm(10.0), optax.adam(1e-2))

    @jax.jit
    def train(params):
        def step(carry, _):
            params, opt_state, state = carry
            objective = lambda p: weighting.weigh(model_losses(p, x, y), state)
            grads = jax.grad(objective)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            new_params = optax.apply_updates(params, updates)
            # Same-batch update, as in the FAMO authors' trainers.
            state = weighting.update(
                model_losses(params, x, y), model_losses(new_params, x, y), state
            )
            return (new_params, opt_state, state), None

        carry, _ = jax.lax.scan(step, (params, tx.init(params), weighting.init()), length=40)
        return carry

    params = init_model(5)
    trained, _, state = train(params)
    initial, final = model_losses(params, x, y), model_losses(trained, x, y)
    assert all_finite((trained, state))
    if case.non_negative_weights:
        assert np.all(np.asarray(final) < np.asarray(initial)), (initial, final)
    else:  # a task's loss may rise by design: the method's own objective falls
        before = weighting.weigh(initial, weighting.init())
        after = weighting.weigh(final, state)
        assert after < before, (initial, final, before, after)


@weightings
def test_weighting_is_finite_on_zero_and_huge_losses(case):
    # FAMO and SI take log(loss + eps) with eps = 1e-8 by default, so a zero loss
    # is valid (and finite); with eps = 0 it is not (their own tests).
    weighting, step = weighting_and_step(case.name)
    for values in ([0.0, 0.0, 0.0], [1e15, 1e15, 1e15], [0.0, 1.0, 1e15]):
        losses, state = jnp.array(values), weighting.init()
        for t in range(4):  # past DWA's equal-weights phase (window 2)
            value, weights, state = step(state, losses, losses)
            assert all_finite((value, weights, state)), (values, t, value, weights, state)


def invalid_values(case):
    """Loss values the method cannot use: non-finite, and <= 0 where it takes logs."""
    return [np.nan, np.inf, -np.inf] + ([-1.0] if case.log_losses else [])


@weightings
@pytest.mark.parametrize("where", ["prev", "curr"])
def test_weighting_invalid_losses_never_corrupt_the_state(case, where):
    """An invalid ``prev_losses`` skips the update; an invalid ``curr_losses`` skips it
    too, unless the method does not read ``curr_losses`` (then it is ignored)."""
    weighting, step = weighting_and_step(case.name)
    state = advanced(case.name)
    good_prev, good_curr = positive_losses(7), positive_losses(8)
    for value in invalid_values(case):
        bad = good_prev.at[1].set(value) if where == "prev" else good_curr.at[1].set(value)
        prev, curr = (bad, good_curr) if where == "prev" else (good_prev, bad)
        new_state = jax.jit(weighting.update)(prev, curr, state)
        assert all_finite(new_state), (value, new_state)
        if where == "curr":
            ignored = jax.jit(weighting.update)(prev, good_curr, state)
            if all(
                np.array_equal(a, b)
                for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(ignored), strict=True)
            ):
                continue  # curr_losses is not read by this method
        assert_state_kept(new_state, state, skipped_counted=True)
        # The state stays usable: the next valid step is finite.
        assert all_finite(step(new_state, good_prev, good_curr))


@weightings
def test_weighting_invalid_losses_give_a_non_finite_gradient(case):
    """No silent wrong step: ``weigh``'s gradient (the task weights) is non-finite,
    so the model gradient is too and ``optax.apply_if_finite`` skips the step."""
    weighting, step = weighting_and_step(case.name)
    state = advanced(case.name)
    for value in invalid_values(case):
        losses = positive_losses(9).at[2].set(value)
        loss, weights, _ = step(state, losses, positive_losses(9))
        assert not np.all(np.isfinite(np.asarray(weights))), (value, weights)
        assert not np.isfinite(float(loss)), (value, loss)


@weightings
@pytest.mark.parametrize("argument", ["losses", "prev_losses", "curr_losses"])
@pytest.mark.parametrize(
    "bad, error, pattern",
    [
        pytest.param(jnp.ones(K + 1), ValueError, r"must have shape \(num_tasks,\)", id="long"),
        pytest.param(jnp.ones((K, 1)), ValueError, r"must have shape \(num_tasks,\)", id="2d"),
        pytest.param(jnp.ones(()), ValueError, r"must have shape \(num_tasks,\)", id="scalar"),
        pytest.param(jnp.ones(K, jnp.int32), TypeError, "floating", id="int32"),
        pytest.param([1, 2, 3], TypeError, "floating", id="list-of-ints"),
        pytest.param({"a": 1.0}, TypeError, "array", id="dict"),
    ],
)
def test_weighting_malformed_losses_raise_naming_the_argument(case, argument, bad, error, pattern):
    weighting = case.make(K)
    state, good = weighting.init(), jnp.ones(K)
    call = {
        "losses": lambda: weighting.weigh(bad, state),
        "prev_losses": lambda: weighting.update(bad, good, state),
        "curr_losses": lambda: weighting.update(good, bad, state),
    }[argument]
    with pytest.raises(error, match=pattern) as info:
        call()
    assert str(info.value).startswith(argument), str(info.value)


def float32s(low, high):
    return st.floats(float(np.float32(low)), float(np.float32(high)), width=32)


@functools.cache
def weights_along(name):
    """``losses_sequence -> (state, effective weights at each step)``, jitted."""
    weighting = registry.BY_NAME[name].make_for_laws(K)

    def run(losses_sequence):
        def step(state, pair):
            losses, next_losses = pair
            weights = famo_jax.loss_weights(weighting, losses, state)
            return weighting.update(losses, next_losses, state), weights

        return jax.lax.scan(step, weighting.init(), (losses_sequence[:-1], losses_sequence[1:]))

    return jax.jit(run)


@weightings
@PROPERTY_SETTINGS
@given(sequence=hnp.arrays(np.float32, (4, K), elements=float32s(1e-6, 1e6)))
def test_effective_loss_weights_are_finite_and_non_negative(case, sequence):
    _, weights = weights_along(case.name)(jnp.asarray(sequence))
    assert np.all(np.isfinite(weights)), weights
    if case.non_negative_weights:
        assert np.all(np.asarray(weights) >= 0), weights


@pytest.mark.parametrize(
    "case", [c for c in registry.WEIGHTINGS if c.task_order_invariant], ids=str
)
@PROPERTY_SETTINGS
@given(
    sequence=hnp.arrays(np.float32, (4, K), elements=float32s(1e-3, 1e3)),
    permutation=st.permutations(range(K)),
)
def test_weightings_are_invariant_to_task_order(case, sequence, permutation):
    permutation = np.asarray(permutation)
    run = weights_along(case.name)
    _, weights = run(jnp.asarray(sequence))
    _, permuted = run(jnp.asarray(sequence[:, permutation]))
    np.testing.assert_allclose(permuted, np.asarray(weights)[:, permutation], rtol=1e-4, atol=1e-7)


# ===========================================================================
# Gradient aggregators.

PARAMS = {"w": jnp.zeros((3, 2)), "b": jnp.zeros((4,))}


def task_grads(seed, num_tasks=K, dtype=jnp.float32):
    return {
        "w": normal((seed, 0), (num_tasks, 3, 2), dtype),
        "b": normal((seed, 1), (num_tasks, 4), dtype),
    }


def extra_args(case, num_tasks=K):
    """Keyword arguments an aggregator's update needs (the task losses)."""
    return {"losses": jnp.linspace(0.5, 2.0, num_tasks)} if case.needs_losses else {}


@functools.cache
def aggregator_and_update(name, num_tasks=K, for_laws=False):
    """A transformation and ``update(grads, state, params, **overrides)``, jitted once.

    The update is given the extra arguments the method needs (``extra_args``)
    unless ``overrides`` replaces them; compiling it is the cost of these tests.
    ``for_laws`` takes the case's ``build_for_laws`` variant (the same compiled
    update when it has none).
    """
    case = registry.BY_NAME[name]
    if for_laws and case.build_for_laws is None:
        return aggregator_and_update(name, num_tasks)
    tx = case.make_for_laws(num_tasks) if for_laws else case.make(num_tasks)
    jitted = jax.jit(tx.update)

    def update(grads, state, params, **overrides):
        return jitted(grads, state, params, **(extra_args(case, num_tasks) | overrides))

    return tx, update


def warm(name, num_tasks=K):
    """The state after one ordinary update, so that 'kept' is not the initial state."""
    tx, update = aggregator_and_update(name, num_tasks)
    _, state = update(task_grads(1, num_tasks), tx.init(PARAMS), PARAMS)
    return state


@aggregators
def test_aggregator_jits_without_retracing_over_100_steps(case):
    tx = case.make(K)
    chex.clear_trace_counter()
    kwargs = extra_args(case)

    def traced_update(grads, state, params):
        return tx.update(grads, state, params, **kwargs)

    update = jax.jit(chex.assert_max_traces(traced_update, n=1))
    grads = jax.tree.map(np.asarray, task_grads(0))
    state = tx.init(PARAMS)
    for scale in np.linspace(0.5, 2.0, 100):
        out, state = update(jax.tree.map(lambda g, scale=scale: scale * g, grads), state, PARAMS)
    assert all_finite((out, state))
    chex.assert_trees_all_equal_shapes(out, PARAMS)


@aggregators
def test_aggregator_vmaps_over_states(case):
    tx, update = aggregator_and_update(case.name)
    batch = 3
    params = stack_trees([PARAMS] * batch)
    states = jax.vmap(tx.init)(params)
    grads = stack_trees([task_grads(b) for b in range(batch)])
    batched_update = functools.partial(tx.update, **extra_args(case))
    batched = jax.jit(jax.vmap(batched_update))(grads, states, params)  # losses shared
    looped = stack_trees(
        [update(tree_index(grads, b), tree_index(states, b), PARAMS) for b in range(batch)]
    )
    # Iterative solvers stop on a tolerance; under vmap a while loop runs until every
    # element has converged, so batched elements may take extra iterations. Equal up
    # to solver accuracy (unit-scale gradients here).
    chex.assert_trees_all_close(batched, looped, rtol=1e-4, atol=1e-4)


@aggregators
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_aggregator_keeps_the_gradients_dtype_and_its_state(case, dtype):
    tx, update = aggregator_and_update(case.name)
    params = jax.tree.map(lambda p: p.astype(dtype), PARAMS)
    state = tx.init(params)
    out, new_state = update(task_grads(2, dtype=dtype), state, params)
    chex.assert_trees_all_equal_shapes_and_dtypes(out, params)
    chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
    assert all_finite(out)


@aggregators
def test_aggregator_trains_a_multi_head_model_inside_optax_chain(case):
    x, y = model_data()
    tx = optax.chain(
        famo_jax.shared_trunk(case.make(K), {"trunk": True, "heads": False}), optax.adam(1e-2)
    )
    value_and_grads = famo_jax.task_gradients(model_losses)

    @jax.jit
    def train(params):
        def step(carry, _):
            params, opt_state = carry
            losses, grads = value_and_grads(params, x, y)
            kwargs = {"losses": losses} if case.needs_losses else {}
            updates, opt_state = tx.update(grads, opt_state, params, **kwargs)
            return (optax.apply_updates(params, updates), opt_state), None

        carry, _ = jax.lax.scan(step, (params, tx.init(params)), length=40)
        return carry

    params = init_model(5)
    trained, opt_state = train(params)
    initial, final = model_losses(params, x, y), model_losses(trained, x, y)
    assert all_finite((trained, opt_state))
    assert np.all(np.asarray(final) < np.asarray(initial)), (initial, final)


def scaled_grads(factors):
    factors = jnp.asarray(factors, jnp.float32)
    return lambda seed: jax.tree.map(
        lambda g: g * factors.reshape((K,) + (1,) * (g.ndim - 1)), task_grads(seed)
    )


@aggregators
@pytest.mark.parametrize(
    "make_grads",
    [
        pytest.param(scaled_grads([0.0, 0.0, 0.0]), id="zero"),
        pytest.param(scaled_grads([1e15, 1e15, 1e15]), id="huge"),
        pytest.param(scaled_grads([0.0, 1.0, 1.0]), id="one_zero"),
        pytest.param(scaled_grads([1e15, 1.0, 1e-15]), id="huge_and_tiny"),
    ],
)
def test_aggregator_is_finite_on_zero_and_huge_gradients(case, make_grads):
    tx, update = aggregator_and_update(case.name)
    state = tx.init(PARAMS)
    for t in range(2):  # and the state it leaves behind
        grads = make_grads(t)
        out, state = update(grads, state, PARAMS)
        assert all_finite((out, state)), out
        if not any(bool(jnp.any(g != 0)) for g in jax.tree.leaves(grads)):
            chex.assert_trees_all_equal(out, jax.tree.map(jnp.zeros_like, PARAMS))


# What follows an aggregator in a chain: the optimizer, guarded by apply_if_finite (which
# inspects its own input, i.e. the aggregator's output). Compiled once for every aggregator.
GUARD = optax.apply_if_finite(optax.adam(1e-2), max_consecutive_errors=3)
GUARD_UPDATE = jax.jit(GUARD.update)


@aggregators
@pytest.mark.parametrize("bad", NON_FINITE)
def test_aggregator_non_finite_gradient_gives_a_non_finite_output_and_keeps_the_state(case, bad):
    _, update = aggregator_and_update(case.name)
    state = warm(case.name)
    grads = task_grads(3)
    grads["b"] = grads["b"].at[1, 2].set(bad)
    out, new_state = update(grads, state, PARAMS)
    chex.assert_trees_all_equal_shapes(out, PARAMS)
    assert not all_finite(out)
    assert_state_kept(new_state, state, skipped_counted=False)

    # So apply_if_finite after the aggregator skips the step (zero update, optimizer
    # state untouched), and the next finite step goes through.
    guard_state = GUARD.init(PARAMS)
    updates, skipped = GUARD_UPDATE(out, guard_state, PARAMS)
    chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, PARAMS))
    chex.assert_trees_all_equal(skipped.inner_state, guard_state.inner_state)
    finite_out, _ = update(task_grads(4), new_state, PARAMS)
    updates, _ = GUARD_UPDATE(finite_out, skipped, PARAMS)
    assert all_finite(updates) and any(bool(jnp.any(u != 0)) for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("case", [c for c in registry.AGGREGATORS if c.min_tasks == 1], ids=str)
def test_aggregator_of_a_single_task_is_its_gradient(case):
    tx, update = aggregator_and_update(case.name, 1)
    grads = task_grads(5, 1)
    out, _ = update(grads, tx.init(PARAMS), PARAMS)
    if not case.single_task_is_its_gradient:
        # A positive multiple of the gradient: the least-squares factor fits every entry.
        flat_out, flat_grad = (
            np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(tree)])
            for tree in (out, jax.tree.map(lambda g: g[0], grads))
        )
        factor = float(flat_out @ flat_grad / (flat_grad @ flat_grad))
        assert factor > 0, factor
        np.testing.assert_allclose(flat_out, factor * flat_grad, rtol=1e-5, atol=1e-6 * factor)
        return
    factor = 1.0 if case.equal_gradients_factor is None else case.equal_gradients_factor
    expected = jax.tree.map(lambda g: factor * g[0], grads)
    if case.equal_gradients_factor is None:
        # No fixed multiple (Nash-MTL in the authors' units gives the unit vector):
        # the direction is the task gradient's.
        out, expected = (
            jax.tree.map(lambda x, t=t: x / optax.tree.norm(t), t) for t in (out, expected)
        )
    chex.assert_trees_all_close(out, expected, rtol=1e-5, atol=1e-6)


@aggregators
@pytest.mark.parametrize(
    "grads, error, pattern",
    [
        pytest.param(
            {"w": jnp.ones(()), "b": jnp.ones((K, 4))},
            ValueError,
            "every leaf of updates must have a leading task axis",
            id="leaf-without-task-axis",
        ),
        pytest.param(
            {"w": jnp.ones((K - 1, 3, 2)), "b": jnp.ones((K, 4))},
            ValueError,
            "every leaf of updates must have the same leading task axis size",
            id="different-task-axes",
        ),
        pytest.param(
            {"w": jnp.ones((K, 3, 2), jnp.int32), "b": jnp.ones((K, 4), jnp.int32)},
            TypeError,
            "updates must hold floating-point task gradients",
            id="integer-gradients",
        ),
    ],
)
def test_aggregator_malformed_task_gradients_raise(case, grads, error, pattern):
    tx = case.make(K)
    with pytest.raises(error, match=pattern):
        tx.update(grads, tx.init(PARAMS), PARAMS, **extra_args(case))


@pytest.mark.parametrize("case", [c for c in registry.AGGREGATORS if c.min_tasks > 1], ids=str)
def test_aggregator_with_too_few_tasks_raises(case):
    k = case.min_tasks - 1
    tx = case.make(k)
    with pytest.raises(ValueError, match=rf"needs at least (.* = )?{case.min_tasks} tasks"):
        tx.update(task_grads(0, k), tx.init(PARAMS), PARAMS, **extra_args(case, k))


@pytest.mark.parametrize("case", [c for c in registry.AGGREGATORS if c.needs_losses], ids=str)
def test_aggregator_without_its_losses_raises_naming_them(case):
    tx = case.make(K)
    with pytest.raises(ValueError, match="losses"):
        tx.update(task_grads(0), tx.init(PARAMS), PARAMS)


seeds = st.integers(0, 2**31 - 1)


@pytest.mark.parametrize(
    "case", [c for c in registry.AGGREGATORS if c.task_order_invariant], ids=str
)
@PROPERTY_SETTINGS
@given(seed=seeds, permutation=st.permutations(range(K)))
def test_aggregators_are_invariant_to_task_order(case, seed, permutation):
    tx, update = aggregator_and_update(case.name, for_laws=True)
    permutation = np.asarray(permutation)
    grads = task_grads(seed)
    permuted = jax.tree.map(lambda g: g[permutation], grads)
    out, _ = update(grads, tx.init(PARAMS), PARAMS)
    permuted_kwargs = {name: value[permutation] for name, value in extra_args(case).items()}
    out_permuted, _ = update(permuted, tx.init(PARAMS), PARAMS, **permuted_kwargs)
    chex.assert_trees_all_close(out_permuted, out, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize(
    "case", [c for c in registry.AGGREGATORS if c.equal_gradients_factor is not None], ids=str
)
@PROPERTY_SETTINGS
@given(seed=seeds, scale=st.floats(1e-3, 1e3))
def test_aggregators_of_equal_task_gradients_are_a_multiple_of_it(case, seed, scale):
    tx, update = aggregator_and_update(case.name, for_laws=True)
    single = jax.tree.map(lambda g: scale * g[0], task_grads(seed))
    equal = jax.tree.map(lambda g: jnp.broadcast_to(g, (K,) + g.shape), single)
    out, _ = update(equal, tx.init(PARAMS), PARAMS)
    expected = jax.tree.map(lambda g: case.equal_gradients_factor * g, single)
    chex.assert_trees_all_close(out, expected, rtol=1e-3, atol=1e-5 * scale)


@pytest.mark.parametrize("case", [c for c in registry.AGGREGATORS if c.gram_based], ids=str)
def test_aggregator_on_implicit_task_gradients_equals_the_stacked_path(case):
    """What the Gramian engine relies on: only the Gram matrix and weighted sums are used."""
    tx, update = aggregator_and_update(case.name)

    @jax.jit
    def implicit_update(grads, state):
        implicit = aggregation.ImplicitTaskGradients(
            gram=aggregation.gram_matrix(grads),
            combine=functools.partial(aggregation.combine, grads),
        )
        return tx.update(implicit, state, PARAMS, **extra_args(case))

    state = warm(case.name)
    for seed in (6, 7):
        grads = task_grads(seed)
        expected, expected_state = update(grads, state, PARAMS)
        out, new_state = implicit_update(grads, state)
        chex.assert_trees_all_close(out, expected, rtol=1e-5, atol=1e-6)
        chex.assert_trees_all_close(new_state, expected_state, rtol=1e-5, atol=1e-6)
        state = new_state


# ===========================================================================
# Checkpoints: every method's state, after a few steps, saved with orbax in one
# tree, restored into freshly built states, continues exactly like the original.


def test_every_state_restores_from_an_orbax_checkpoint_and_continues_identically(tmp_path):
    states, likes, next_steps = {}, {}, {}
    for case in registry.WEIGHTINGS:
        weighting, step = weighting_and_step(case.name)
        states[case.name], likes[case.name] = advanced(case.name), weighting.init()
        losses = positive_losses(11)
        next_steps[case.name] = functools.partial(step, losses=losses, next_losses=0.5 * losses)
    for case in registry.AGGREGATORS:
        tx, update = aggregator_and_update(case.name)
        states[case.name], likes[case.name] = warm(case.name), tx.init(PARAMS)
        next_steps[case.name] = lambda state, update=update: update(task_grads(12), state, PARAMS)

    with ocp.CheckpointManager(tmp_path) as manager:
        manager.save(0, args=ocp.args.StandardSave(states))
        manager.wait_until_finished()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, likes)
    with ocp.CheckpointManager(tmp_path) as manager:
        restored = manager.restore(0, args=ocp.args.StandardRestore(abstract))

    for name, state in states.items():
        assert type(restored[name]) is type(state), name
        chex.assert_trees_all_equal(restored[name], state)
        chex.assert_trees_all_equal(next_steps[name](restored[name]), next_steps[name](state))
