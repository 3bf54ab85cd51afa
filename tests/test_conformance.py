"""Conformance: every method (FAMO, the loss weightings, the aggregators) passes the same checks.

Loss weightings (``init/weigh/update``) and gradient aggregators (optax transformations
over task gradients stacked on a leading axis) are each checked for: jit without
retracing over 100 steps, vmap over states, dtype preservation (float32 and
bfloat16), composition with ``optax.chain`` in a jitted train step of a small
multi-head model, finite output on zero and huge (1e15) losses or gradients, and
the laws that hold for them (rescaling invariance of FAMO and SI, task-order
invariance, finite effective weights, MGDA's non-conflicting direction, CAGrad
with c = 0 being the mean, every aggregator reducing to the mean when all task
gradients are equal).
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import famo_jax

NUM_TASKS = 3
SCALES = jnp.array([1.0, 10.0, 0.1])

# Factories are called lazily (at test time) so that one missing method fails its
# own tests rather than the collection of the whole module.
LOSS_WEIGHTINGS = {
    "famo": lambda: famo_jax.famo(NUM_TASKS),
    "linear_scalarization": lambda: famo_jax.linear_scalarization(NUM_TASKS),
    "scale_invariant": lambda: famo_jax.scale_invariant(NUM_TASKS),
    "random_loss_weighting": lambda: famo_jax.random_loss_weighting(NUM_TASKS, seed=0),
    # A short window so that the dynamic phase (after window + 1 steps) is exercised.
    "dwa": lambda: famo_jax.dwa(NUM_TASKS, window=2),
    "uncertainty_weighting": lambda: famo_jax.uncertainty_weighting(NUM_TASKS),
}

AGGREGATORS = {
    "cagrad": lambda: famo_jax.cagrad(),
    "mgda": lambda: famo_jax.mgda(),
    "pcgrad": lambda: famo_jax.pcgrad(seed=0),
    "imtl_g": lambda: famo_jax.imtl_g(),
    "nash_mtl": lambda: famo_jax.nash_mtl(),
    "graddrop": lambda: famo_jax.graddrop(),
}

PROPERTY_SETTINGS = settings(max_examples=8, deadline=None, derandomize=True)


def tree_all_finite(tree) -> bool:
    return all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(tree))


# Host-side (NumPy) tree helpers: run eagerly in JAX, each stack or slice of a new
# shape would compile its own small program.
def stack_trees(trees):
    return jax.tree.map(lambda *leaves: np.stack([np.asarray(x) for x in leaves]), *trees)


def tree_index(tree, i):
    return jax.tree.map(lambda leaf: np.asarray(leaf)[i], tree)


# ---------------------------------------------------------------------------
# A small multi-head regression model: a shared tanh layer and one linear head per
# task (row i of ``heads`` is task i's head), targets from a teacher of the same
# shape, task losses on scales 1, 10 and 0.1.


def normal(seed, shape, dtype=jnp.float32):
    # NumPy draws: jax.random run eagerly would compile a program per shape.
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def init_model(seed):
    return {
        "trunk": 0.5 * normal((seed, 0), (4, 8)),
        "heads": 0.5 * normal((seed, 1), (NUM_TASKS, 8)),
    }


def model_losses(params, x, y):
    preds = jnp.tanh(x @ params["trunk"]) @ params["heads"].T
    return SCALES * jnp.mean((preds - y) ** 2, axis=0)


@functools.lru_cache(maxsize=1)
def model_data():
    x = normal(42, (32, 4))
    teacher = init_model(43)
    y = jnp.tanh(x @ teacher["trunk"]) @ teacher["heads"].T
    return x, y


IS_SHARED = {"trunk": True, "heads": False}


def random_losses(seed, shape=(NUM_TASKS,)):
    return jnp.asarray(np.exp(np.random.default_rng(seed).standard_normal(shape)), jnp.float32)


# ===========================================================================
# Loss weightings (FAMO included).

weighting_names = pytest.mark.parametrize("name", sorted(LOSS_WEIGHTINGS))


def weighting_step(weighting):
    """One protocol step: the weighted loss, the effective weights, the next state."""

    def step(state, losses, next_losses):
        value, weights = jax.value_and_grad(weighting.weigh)(losses, state)
        return value, weights, weighting.update(losses, next_losses, state)

    return step


@functools.cache
def jitted_weighting(name):
    """A weighting and its jitted step, shared by the tests (one compile per dtype)."""
    weighting = LOSS_WEIGHTINGS[name]()
    return weighting, jax.jit(weighting_step(weighting))


@weighting_names
def test_weighting_jits_without_retracing_over_100_steps(name):
    weighting = LOSS_WEIGHTINGS[name]()
    chex.clear_trace_counter()
    step = jax.jit(chex.assert_max_traces(weighting_step(weighting), n=1))
    losses = np.asarray(random_losses(0, (101, NUM_TASKS)))
    state = weighting.init()
    for t in range(100):
        value, weights, state = step(state, losses[t], losses[t + 1])
    assert tree_all_finite((value, weights, state))
    if name == "dwa":
        assert not np.allclose(weights, 1 / NUM_TASKS)  # past the equal-weights phase


@weighting_names
def test_weighting_vmaps_over_states(name):
    weighting, single = jitted_weighting(name)
    batch = 4

    def after(history):  # distinct histories, past DWA's equal-weights phase
        state = weighting.init()
        for losses in history:
            state = weighting.update(losses, losses * jnp.array([0.9, 0.5, 1.2]), state)
        return state

    states = jax.jit(jax.vmap(after))(random_losses(1, (batch, 3, NUM_TASKS)))
    if isinstance(states, famo_jax.RLWState):
        states = famo_jax.RLWState(key=jax.random.split(jax.random.PRNGKey(3), batch))
    losses = random_losses(2, (batch, NUM_TASKS))
    # Unequal relative changes: with equal ones FAMO's logits gradient is zero up to
    # rounding, which Adam magnifies differently in the batched and looped programs.
    next_losses = losses * jnp.array([0.8, 0.5, 0.95])

    step = weighting_step(weighting)
    batched = jax.jit(jax.vmap(step))(states, losses, next_losses)
    looped = stack_trees(
        [single(tree_index(states, b), losses[b], next_losses[b]) for b in range(batch)]
    )
    chex.assert_trees_all_close(batched, looped, rtol=1e-5, atol=1e-7)


@weighting_names
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_weighting_preserves_dtypes(name, dtype):
    weighting, step = jitted_weighting(name)
    state = weighting.init()
    losses = random_losses(4).astype(dtype)
    value, weights, new_state = step(state, losses, losses * np.array(0.5, dtype))
    assert value.dtype == dtype and value.shape == ()
    assert weights.dtype == dtype and weights.shape == (NUM_TASKS,)
    chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
    assert tree_all_finite((value, weights, new_state))


@weighting_names
def test_weighting_trains_a_multi_head_model_inside_optax_chain(name):
    weighting = LOSS_WEIGHTINGS[name]()
    x, y = model_data()
    tx = optax.chain(optax.clip_by_global_norm(10.0), optax.adam(1e-2))

    @jax.jit
    def train_step(params, opt_state, state):
        losses, grads = jax.value_and_grad(lambda p: weighting.weigh(model_losses(p, x, y), state))(
            params
        )
        prev_losses = model_losses(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        # Same-batch update, as in the authors' trainers.
        state = weighting.update(prev_losses, model_losses(params, x, y), state)
        return params, opt_state, state

    params = init_model(5)
    initial = model_losses(params, x, y)
    opt_state, state = tx.init(params), weighting.init()
    for _ in range(40):
        params, opt_state, state = train_step(params, opt_state, state)
    final = model_losses(params, x, y)
    assert tree_all_finite((params, state))
    assert np.all(np.asarray(final) < np.asarray(initial)), (initial, final)


@weighting_names
def test_weighting_is_finite_on_zero_and_huge_losses(name):
    # Documented: FAMO and SI take log(loss + eps) with eps = 1e-8 by default, so
    # a zero loss is finite; with eps = 0 it is -inf (see test_weightings.py).
    weighting, step = jitted_weighting(name)
    for case in ([0.0, 0.0, 0.0], [1e15, 1e15, 1e15], [0.0, 1.0, 1e15]):
        losses, state = jnp.array(case), weighting.init()
        for t in range(4):  # past DWA's equal-weights phase (window 2)
            value, weights, state = step(state, losses, losses)
            assert tree_all_finite((value, weights, state)), (case, t, value, weights, state)


# -- Laws (property tests) --------------------------------------------------


def float32s(low, high):
    return st.floats(float(np.float32(low)), float(np.float32(high)), width=32)


loss_sequences = hnp.arrays(np.float32, (4, NUM_TASKS), elements=float32s(1e-3, 1e3))


def weights_along(weighting, losses_sequence):
    """The effective weights at each step of a run over ``losses_sequence``."""

    def step(state, pair):
        losses, next_losses = pair
        weights = famo_jax.loss_weights(weighting, losses, state)
        return weighting.update(losses, next_losses, state), weights

    pairs = (losses_sequence[:-1], losses_sequence[1:])
    return jax.lax.scan(step, weighting.init(), pairs)


@functools.cache
def jitted_weights_along(name):
    return jax.jit(functools.partial(weights_along, PROPERTY_WEIGHTINGS[name]()))


# FAMO with plain SGD on the logits in the laws below: the laws are exact in exact
# arithmetic, and Adam would magnify float rounding where the logits' gradient
# nearly cancels, hiding them behind noise.
PROPERTY_WEIGHTINGS = {
    **LOSS_WEIGHTINGS,
    "famo": lambda: famo_jax.famo(NUM_TASKS, optimizer=optax.sgd(0.5)),
    "famo_eps0": lambda: famo_jax.famo(NUM_TASKS, eps=0.0, optimizer=optax.sgd(0.5)),
    "scale_invariant_eps0": lambda: famo_jax.scale_invariant(NUM_TASKS, eps=0.0),
}


@pytest.mark.parametrize("name", ["famo_eps0", "scale_invariant_eps0"])
@PROPERTY_SETTINGS
@given(
    sequence=loss_sequences,
    task=st.integers(0, NUM_TASKS - 1),
    scale=st.floats(1e-3, 1e3),
)
def test_famo_and_si_are_invariant_to_rescaling_a_task_loss(name, sequence, task, scale):
    scales = np.ones(NUM_TASKS, np.float32)
    scales[task] = scale
    run = jitted_weights_along(name)
    state, weights = run(jnp.asarray(sequence))
    scaled_state, scaled_weights = run(jnp.asarray(sequence * scales))
    # The model's gradient sum_i w_i grad(l_i) keeps its direction: with task j's
    # loss multiplied by a, w_j * a equals w_j up to one positive factor for all tasks.
    direction = np.asarray(weights)
    scaled_direction = np.asarray(scaled_weights) * scales
    np.testing.assert_allclose(
        scaled_direction / scaled_direction.sum(axis=1, keepdims=True),
        direction / direction.sum(axis=1, keepdims=True),
        rtol=1e-4,
        atol=1e-6,
    )
    if name == "scale_invariant_eps0":
        np.testing.assert_allclose(scaled_direction, direction, rtol=1e-4)
    else:  # FAMO's update (change of log losses) is invariant as well.
        np.testing.assert_allclose(scaled_state.logits, state.logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(LOSS_WEIGHTINGS))
@PROPERTY_SETTINGS
@given(sequence=hnp.arrays(np.float32, (4, NUM_TASKS), elements=float32s(1e-6, 1e6)))
def test_effective_loss_weights_are_finite(name, sequence):
    _, weights = jitted_weights_along(name)(jnp.asarray(sequence))
    assert np.all(np.isfinite(weights)), weights
    assert np.all(np.asarray(weights) >= 0)


@pytest.mark.parametrize(
    "name", ["famo", "linear_scalarization", "scale_invariant", "dwa", "uncertainty_weighting"]
)
@PROPERTY_SETTINGS
@given(sequence=loss_sequences, permutation=st.permutations(range(NUM_TASKS)))
def test_loss_weightings_are_invariant_to_task_order(name, sequence, permutation):
    # RLW is excluded: its weights are i.i.d. in law, not per realisation.
    permutation = np.asarray(permutation)
    run = jitted_weights_along(name)
    _, weights = run(jnp.asarray(sequence))
    _, permuted = run(jnp.asarray(sequence[:, permutation]))
    np.testing.assert_allclose(permuted, np.asarray(weights)[:, permutation], rtol=1e-4, atol=1e-7)


# ===========================================================================
# Gradient aggregators.

aggregator_names = pytest.mark.parametrize("name", sorted(AGGREGATORS))


def random_task_grads(seed, num_tasks=NUM_TASKS, dtype=jnp.float32):
    return {
        "w": normal((seed, 0), (num_tasks, 3, 2), dtype),
        "b": normal((seed, 1), (num_tasks, 4), dtype),
    }


GRAD_PARAMS = {"w": jnp.zeros((3, 2)), "b": jnp.zeros((4,))}


@functools.cache
def jitted_aggregator(name, variant=None):
    """A transformation and its jitted update, shared by tests and hypothesis examples.

    Caching keeps one compilation per method and shape across hypothesis examples
    (each call of a factory makes new closures, which ``jax.jit`` would retrace).
    """
    tx = (AGGREGATOR_VARIANTS[variant] if variant else AGGREGATORS[name])()
    return tx, jax.jit(tx.update)


@aggregator_names
def test_aggregator_jits_without_retracing_over_100_steps(name):
    tx = AGGREGATORS[name]()
    chex.clear_trace_counter()
    update = jax.jit(chex.assert_max_traces(tx.update, n=1))
    all_grads = random_task_grads(0)
    all_grads = jax.tree.map(
        lambda g: np.asarray(g)[None] * np.linspace(0.5, 2.0, 100).reshape((100,) + (1,) * g.ndim),
        all_grads,
    )
    state = tx.init(GRAD_PARAMS)
    for t in range(100):
        out, state = update(tree_index(all_grads, t), state, GRAD_PARAMS)
    assert tree_all_finite((out, state))
    chex.assert_trees_all_equal_shapes(out, GRAD_PARAMS)


@aggregator_names
def test_aggregator_vmaps_over_states(name):
    tx, update = jitted_aggregator(name)
    batch = 3
    params = stack_trees([GRAD_PARAMS] * batch)
    states = jax.vmap(tx.init)(params)
    grads = stack_trees([random_task_grads(b) for b in range(batch)])
    batched = jax.jit(jax.vmap(tx.update))(grads, states, params)
    looped = stack_trees(
        [update(tree_index(grads, b), tree_index(states, b), GRAD_PARAMS) for b in range(batch)]
    )
    # Iterative solvers stop on a tolerance; under vmap a while loop runs until every
    # element has converged, so batched elements may take extra iterations. Equal up
    # to solver accuracy (unit-scale gradients here).
    chex.assert_trees_all_close(batched, looped, rtol=1e-4, atol=1e-4)


@aggregator_names
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_aggregator_preserves_dtypes(name, dtype):
    tx, update = jitted_aggregator(name)
    params = jax.tree.map(lambda p: p.astype(dtype), GRAD_PARAMS)
    state = tx.init(params)
    grads = random_task_grads(2, dtype=dtype)
    out, new_state = update(grads, state, params)
    chex.assert_trees_all_equal_shapes_and_dtypes(out, params)
    chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
    assert tree_all_finite(out)


@aggregator_names
def test_aggregator_trains_a_multi_head_model_inside_optax_chain(name):
    x, y = model_data()
    tx = optax.chain(famo_jax.shared_trunk(AGGREGATORS[name](), IS_SHARED), optax.adam(1e-2))
    value_and_grads = famo_jax.task_gradients(model_losses)

    @jax.jit
    def train_step(params, opt_state):
        _, task_grads = value_and_grads(params, x, y)
        updates, opt_state = tx.update(task_grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params = init_model(5)
    initial = model_losses(params, x, y)
    opt_state = tx.init(params)
    for _ in range(40):
        params, opt_state = train_step(params, opt_state)
    final = model_losses(params, x, y)
    assert tree_all_finite((params, opt_state))
    assert np.all(np.asarray(final) < np.asarray(initial)), (initial, final)


def _zero(seed):
    return jax.tree.map(jnp.zeros_like, random_task_grads(seed))


def _huge(seed):
    return jax.tree.map(lambda g: 1e15 * g, random_task_grads(seed))


def _one_task_zero(seed):
    return jax.tree.map(lambda g: g.at[0].set(0.0), random_task_grads(seed))


def _huge_and_tiny(seed):
    factors = jnp.array([1e15, 1.0, 1e-15])
    return jax.tree.map(
        lambda g: g * factors.reshape((NUM_TASKS,) + (1,) * (g.ndim - 1)), random_task_grads(seed)
    )


@aggregator_names
@pytest.mark.parametrize(
    "make_grads", [_zero, _huge, _one_task_zero, _huge_and_tiny], ids=lambda f: f.__name__[1:]
)
def test_aggregator_is_finite_on_zero_and_huge_gradients(name, make_grads):
    tx, update = jitted_aggregator(name)
    state = tx.init(GRAD_PARAMS)
    for t in range(2):  # and the state it leaves behind
        out, state = update(make_grads(t), state, GRAD_PARAMS)
        assert tree_all_finite((out, state)), out
    if make_grads is _zero:
        chex.assert_trees_all_close(out, GRAD_PARAMS, atol=0.0)


# -- Laws (property tests) --------------------------------------------------

seeds = st.integers(0, 2**31 - 1)


@pytest.mark.parametrize("name", sorted(set(AGGREGATORS) - {"pcgrad"}))
@PROPERTY_SETTINGS
@given(seed=seeds, permutation=st.permutations(range(NUM_TASKS)))
def test_aggregators_are_invariant_to_task_order(name, seed, permutation):
    # PCGrad is excluded: it projects in a random task order by design.
    tx, update = jitted_aggregator(name)
    state = tx.init(GRAD_PARAMS)
    grads = random_task_grads(seed)
    permuted = jax.tree.map(lambda g: g[np.asarray(permutation)], grads)
    out, _ = update(grads, state, GRAD_PARAMS)
    out_permuted, _ = update(permuted, state, GRAD_PARAMS)
    chex.assert_trees_all_close(out_permuted, out, rtol=1e-3, atol=1e-4)


AGGREGATOR_VARIANTS = {"cagrad_c0": lambda: famo_jax.cagrad(c=0.0)}

# Equal task gradients v give factor * v. CAGrad's default rescale=1 divides by
# 1 + c^2 where the mean would need 1 + c, so it gives (1 + c) / (1 + c^2) * v
# (documented; rescale=2 gives the mean).
EQUAL_GRADIENTS_FACTOR = {name: 1.0 for name in AGGREGATORS} | {"cagrad": 1.4 / 1.16}


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
@PROPERTY_SETTINGS
@given(seed=seeds, scale=st.floats(1e-3, 1e3))
def test_aggregators_reduce_to_the_mean_of_equal_task_gradients(name, seed, scale):
    tx, update = jitted_aggregator(name)
    single = jax.tree.map(lambda g: scale * g[0], random_task_grads(seed))
    equal = jax.tree.map(lambda g: jnp.broadcast_to(g, (NUM_TASKS,) + g.shape), single)
    out, _ = update(equal, tx.init(GRAD_PARAMS), GRAD_PARAMS)
    expected = jax.tree.map(lambda g: EQUAL_GRADIENTS_FACTOR[name] * g, single)
    chex.assert_trees_all_close(out, expected, rtol=1e-3, atol=1e-5 * scale)


@PROPERTY_SETTINGS
@given(seed=seeds)
def test_mgda_direction_does_not_conflict_with_any_task(seed):
    # With more parameters (10) than tasks (3), the min-norm point d of the convex
    # hull satisfies <d, g_i> >= |d|^2 >= 0 for every task. (Three tasks only: the
    # solver is tested for k up to 100 against scipy in its own tests.)
    num_tasks = NUM_TASKS
    tx, update = jitted_aggregator("mgda")
    grads = random_task_grads(seed, num_tasks)
    out, _ = update(grads, tx.init(GRAD_PARAMS), GRAD_PARAMS)
    flat_out = jnp.concatenate([leaf.ravel() for leaf in jax.tree.leaves(out)])
    flat_grads = jnp.concatenate(
        [leaf.reshape(num_tasks, -1) for leaf in jax.tree.leaves(grads)], axis=1
    )
    inner = flat_grads @ flat_out
    assert np.all(np.asarray(inner) >= -1e-5 * float(jnp.sum(flat_grads**2))), inner


@PROPERTY_SETTINGS
@given(seed=seeds)
def test_cagrad_with_c_zero_is_the_mean(seed):
    tx, update = jitted_aggregator("cagrad", "cagrad_c0")
    grads = random_task_grads(seed)
    out, _ = update(grads, tx.init(GRAD_PARAMS), GRAD_PARAMS)
    chex.assert_trees_all_close(out, jax.tree.map(lambda g: g.mean(0), grads), rtol=1e-5, atol=1e-6)
