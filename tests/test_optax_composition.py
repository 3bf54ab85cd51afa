"""FAMO composes with optax: model optimizer chains, logits optimizers, schedules,
shared-trunk aggregation through optax.partition, and optax.MultiSteps accumulation."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import famo_jax

NUM_TASKS = 3
INPUT_DIM = 4
HIDDEN = 8
SCALES = jnp.array([1e-2, 1.0, 1e2])  # the task losses differ by 10^4


def init_params(key):
    k1, k2 = jax.random.split(key)
    return {
        "trunk": {"w": jax.random.normal(k1, (INPUT_DIM, HIDDEN)) / 2.0, "b": jnp.zeros(HIDDEN)},
        "heads": {"w": jax.random.normal(k2, (HIDDEN, NUM_TASKS)) / 3.0},
    }


def task_losses(params, x, y):
    """Scaled squared error of each task: ``(num_tasks,)``; head i serves task i only."""
    h = jnp.tanh(x @ params["trunk"]["w"] + params["trunk"]["b"])
    return SCALES * jnp.mean((h @ params["heads"]["w"] - y) ** 2, axis=0)


def make_data(key, n=64):
    kx, kw = jax.random.split(key)
    x = jax.random.normal(kx, (n, INPUT_DIM))
    y = jnp.sin(x @ jax.random.normal(kw, (INPUT_DIM, NUM_TASKS)))
    return x, y


@pytest.fixture(scope="module")
def problem():
    params = init_params(jax.random.key(0))
    x, y = make_data(jax.random.key(1))
    return params, x, y


# --- the model optimizer is any optax chain -------------------------------------------------


def test_model_optimizer_is_any_optax_chain(problem):
    params, x, y = problem
    schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 5, 100)
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.inject_hyperparams(optax.adamw)(learning_rate=schedule, weight_decay=1e-4),
    )
    weighting = famo_jax.famo(NUM_TASKS)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def train_step(params, opt_state, famo_state):
        def objective(p):
            losses = task_losses(p, x, y)
            return weighting.weigh(losses, famo_state), losses

        (_, losses), grads = jax.value_and_grad(objective, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        famo_state = weighting.update(losses, task_losses(new_params, x, y), famo_state)
        return new_params, opt_state, famo_state, grads

    @jax.jit
    def explicit_step(params, opt_state, famo_state):
        # FAMO hands the chain sum_i w_i grad(l_i), with w the documented weights.
        losses, jacobian = famo_jax.task_gradients(task_losses)(params, x, y)
        weights = famo_jax.loss_weights(weighting, losses, famo_state)
        grads = jax.tree.map(lambda g: jnp.tensordot(weights, g, axes=1), jacobian)
        return optax.apply_updates(params, tx.update(grads, opt_state, params)[0]), grads

    opt_state, famo_state = tx.init(params), weighting.init()
    expected_params, explicit = explicit_step(params, opt_state, famo_state)
    new_params, opt_state, famo_state, grads = train_step(params, opt_state, famo_state)
    chex.assert_trees_all_close(grads, explicit, rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(new_params, expected_params, rtol=1e-5, atol=1e-7)

    start = task_losses(params, x, y)
    for _ in range(59):
        new_params, opt_state, famo_state, _ = train_step(new_params, opt_state, famo_state)
    # The schedule drives the injected learning rate: the last update used step 59.
    chex.assert_trees_all_close(opt_state[1].hyperparams["learning_rate"], schedule(59))
    assert int(famo_state.num_updates) == 60
    assert np.all(np.asarray(task_losses(new_params, x, y) < start))


# --- FAMO's logits optimizer ----------------------------------------------------------------


def _logits_gradient(prev, curr, logits):
    """z * (delta - <z, delta>) of FAMO's update, written out in NumPy."""
    delta = np.log(np.asarray(prev) + 1e-8) - np.log(np.asarray(curr) + 1e-8)
    z = np.exp(logits - np.max(logits))
    z /= z.sum()
    return z * (delta - z @ delta)


PREV = jnp.array([1.0, 10.0, 100.0])
CURR = jnp.array([0.5, 9.0, 99.0])


def test_logits_optimizer_accepts_any_optax_transform():
    sgd = famo_jax.famo(NUM_TASKS, optimizer=optax.sgd(0.5))
    state = jax.jit(sgd.update)(PREV, CURR, sgd.init())
    expected = -0.5 * _logits_gradient(PREV, CURR, np.zeros(NUM_TASKS))
    chex.assert_trees_all_close(state.logits, jnp.asarray(expected, jnp.float32), rtol=1e-6)

    # A chain: the logits step is clipped to norm 1e-3.
    clipped = famo_jax.famo(
        NUM_TASKS, optimizer=optax.chain(optax.clip_by_global_norm(1e-3), optax.sgd(1.0))
    )
    state = jax.jit(clipped.update)(PREV, CURR, clipped.init())
    direction = -_logits_gradient(PREV, CURR, np.zeros(NUM_TASKS))
    expected = 1e-3 * direction / np.linalg.norm(direction)
    chex.assert_trees_all_close(state.logits, jnp.asarray(expected, jnp.float32), rtol=1e-5)

    # Any other transformation runs jitted and keeps the protocol.
    for optimizer in (optax.adamw(0.01), optax.lion(1e-3), optax.rmsprop(0.01)):
        weighting = famo_jax.famo(NUM_TASKS, optimizer=optimizer)
        state = jax.jit(weighting.update)(PREV, CURR, weighting.init())
        assert int(state.num_updates) == 1
        assert np.all(np.isfinite(state.logits)) and not np.allclose(state.logits, 0.0)


def set_logits_learning_rate(state, learning_rate):
    """Returns FAMO's state with a new injected logits learning rate (functional).

    The new value keeps the old one's dtype (a strongly typed float32), so a
    jitted ``update`` is not traced again.
    """
    old = state.opt_state.hyperparams["learning_rate"]
    hyperparams = dict(
        state.opt_state.hyperparams, learning_rate=jnp.asarray(learning_rate, old.dtype)
    )
    return state._replace(opt_state=state.opt_state._replace(hyperparams=hyperparams))


def test_logits_learning_rate_is_read_and_changed_through_inject_hyperparams():
    weighting = famo_jax.famo(
        NUM_TASKS, optimizer=optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
    )
    update = jax.jit(weighting.update)
    state = weighting.init()
    chex.assert_trees_all_close(state.opt_state.hyperparams["learning_rate"], 0.1)
    step = update(PREV, CURR, state).logits
    # Learning rate 0: the logits do not move; 0.2: the step doubles. No retracing.
    frozen = update(PREV, CURR, set_logits_learning_rate(state, 0.0))
    chex.assert_trees_all_equal(frozen.logits, state.logits)
    doubled = update(PREV, CURR, set_logits_learning_rate(state, 0.2))
    chex.assert_trees_all_close(doubled.logits, 2.0 * step, rtol=1e-6)
    assert update._cache_size() == 1


def reference_optimizer(learning_rate, gamma=0.001):
    """FAMO's default logits optimizer (PyTorch Adam with coupled decay), lr injectable."""
    return optax.chain(
        optax.add_decayed_weights(gamma),
        optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8),
        optax.scale_by_learning_rate(learning_rate),
    )


def test_scheduled_logits_learning_rate_keeps_the_reference_optimizer():
    schedule = optax.linear_schedule(0.025, 0.0025, transition_steps=20)
    injected = famo_jax.famo(
        NUM_TASKS, optimizer=optax.inject_hyperparams(reference_optimizer)(learning_rate=schedule)
    )
    scheduled = famo_jax.famo(NUM_TASKS, learning_rate=schedule)  # the same, not inspectable
    constant = famo_jax.famo(
        NUM_TASKS,
        optimizer=optax.inject_hyperparams(reference_optimizer)(learning_rate=0.025),
    )
    default = famo_jax.famo(NUM_TASKS)
    losses = jnp.exp(jax.random.normal(jax.random.key(2), (31, NUM_TASKS)))

    def run(weighting):
        def body(state, pair):
            return weighting.update(pair[0], pair[1], state), None

        return jax.lax.scan(body, weighting.init(), (losses[:-1], losses[1:]))[0]

    s_injected, s_scheduled = jax.jit(run, static_argnums=0)(injected), run(scheduled)
    chex.assert_trees_all_close(s_injected.logits, s_scheduled.logits, rtol=1e-6)
    # The state shows the learning rate of the last of the 30 updates.
    chex.assert_trees_all_close(s_injected.opt_state.hyperparams["learning_rate"], schedule(29))
    chex.assert_trees_all_close(run(constant).logits, run(default).logits, rtol=1e-6)
    assert not np.allclose(s_injected.logits, run(default).logits, rtol=1e-3)


# --- gradient aggregators on the shared trunk only ------------------------------------------

IS_SHARED = {"trunk": True, "heads": False}  # a prefix of the parameter tree


def _aggregated_run(aggregator_fn, params, x, y, steps=5):
    """The recipe: stacked task gradients -> shared_trunk(aggregator) -> Adam, jitted."""
    tx = optax.chain(
        famo_jax.shared_trunk(aggregator_fn(), IS_SHARED, head_reduction="sum"),
        optax.adam(1e-2),
    )

    @jax.jit
    def step(params, opt_state):
        _, task_grads = famo_jax.task_gradients(task_losses)(params, x, y)
        updates, opt_state = tx.update(task_grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = tx.init(params)
    for _ in range(steps):
        params, opt_state = step(params, opt_state)
    return params, opt_state


def _explicit_run(aggregator_fn, params, x, y, steps=5):
    """By hand: the aggregator sees the trunk's task gradients only; every head
    gets the gradient of its own task's loss."""
    aggregator, adam = aggregator_fn(), optax.adam(1e-2)

    @jax.jit
    def step(params, agg_state, adam_state):
        trunk_task_grads = jax.jacrev(
            lambda trunk: task_losses({"trunk": trunk, "heads": params["heads"]}, x, y)
        )(params["trunk"])
        trunk_grad, agg_state = aggregator.update(trunk_task_grads, agg_state, params["trunk"])
        own = [  # column i of the heads' matrix serves task i only
            jax.grad(
                lambda w, i=i: task_losses({"trunk": params["trunk"], "heads": {"w": w}}, x, y)[i]
            )(params["heads"]["w"])[:, i]
            for i in range(NUM_TASKS)
        ]
        grads = {"trunk": trunk_grad, "heads": {"w": jnp.stack(own, axis=1)}}
        updates, adam_state = adam.update(grads, adam_state, params)
        return optax.apply_updates(params, updates), agg_state, adam_state

    agg_state, adam_state = aggregator.init(params["trunk"]), adam.init(params)
    for _ in range(steps):
        params, agg_state, adam_state = step(params, agg_state, adam_state)
    return params, agg_state


@pytest.mark.parametrize(
    "aggregator_fn",
    [lambda: famo_jax.cagrad(c=0.4), lambda: famo_jax.pcgrad(seed=1)],
    ids=["cagrad", "pcgrad"],
)
def test_aggregator_applies_to_the_shared_trunk_only(problem, aggregator_fn):
    params, x, y = problem
    aggregated, opt_state = _aggregated_run(aggregator_fn, params, x, y)
    explicit, agg_state = _explicit_run(aggregator_fn, params, x, y)
    # The two programs fuse differently, so CAGrad's float32 interior-point solve
    # rounds differently, and Adam carries that over the steps: 1.2e-4 relative
    # was seen on an AMD EPYC. A wrong partition would differ at order one.
    chex.assert_trees_all_close(aggregated, explicit, rtol=1e-3, atol=1e-5)
    # A stateful aggregator (PCGrad's PRNG key) advanced once per step, as by hand.
    chex.assert_trees_all_equal(jax.tree.leaves(opt_state[0]), jax.tree.leaves(agg_state))


def test_aggregating_every_parameter_is_not_the_same(problem):
    """The trunk-only recipe matters: aggregating the heads too changes their update."""
    params, x, y = problem
    trunk_only = famo_jax.shared_trunk(famo_jax.cagrad(), IS_SHARED, head_reduction="sum")

    @jax.jit
    def both(params):
        _, task_grads = famo_jax.task_gradients(task_losses)(params, x, y)
        everywhere, _ = famo_jax.cagrad().update(task_grads, optax.EmptyState(), params)
        trunk_only_grads, _ = trunk_only.update(task_grads, trunk_only.init(params), params)
        return task_grads, everywhere, trunk_only_grads

    task_grads, everywhere, trunk_only_grads = both(params)
    own = jax.tree.map(lambda g: g.sum(0), task_grads["heads"])
    chex.assert_trees_all_close(trunk_only_grads["heads"], own)
    assert not np.allclose(everywhere["heads"]["w"], own["w"], rtol=1e-3)


# --- gradient accumulation with optax.MultiSteps --------------------------------------------

NUM_MICRO = 4  # micro-batches per model update
NUM_UPDATES = 3


def _micro_batches(key):
    """``NUM_UPDATES`` big batches of ``NUM_MICRO`` heterogeneous micro-batches."""
    x, y = make_data(key, n=NUM_UPDATES * NUM_MICRO * 8)
    # Different input scales per micro-batch make their task losses differ a lot.
    x = x * jnp.repeat(jnp.arange(1.0, NUM_UPDATES * NUM_MICRO + 1.0), 8)[:, None] / 4.0
    shape = (NUM_UPDATES, NUM_MICRO, 8)
    return x.reshape(shape + (INPUT_DIM,)), y.reshape(shape + (NUM_TASKS,))


# One weighting and optimizer for all accumulation runs, so compilations are shared.
ACC_WEIGHTING = famo_jax.famo(NUM_TASKS, gamma=0.0)
ACC_INNER = optax.adam(0.05)
ACC_TX = optax.MultiSteps(ACC_INNER, every_k_schedule=NUM_MICRO)
_losses_of = jax.jit(task_losses)
_famo_update = jax.jit(ACC_WEIGHTING.update)


@jax.jit
def _mean_losses(params, xs, ys):
    """Forward passes only: the big batch's task losses, the mean over micro-batches."""
    return jnp.mean(jax.lax.map(lambda b: task_losses(params, *b), (xs, ys)), axis=0)


@jax.jit
def _big_step(params, opt_state, famo_state, x, y):
    objective = lambda p: ACC_WEIGHTING.weigh(task_losses(p, x, y), famo_state)
    updates, opt_state = ACC_INNER.update(jax.grad(objective)(params), opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def _big_batch_run(mode, params, xs, ys):
    """The explicit computation: FAMO on the concatenated micro-batches."""
    opt_state, famo_state, prev = ACC_INNER.init(params), ACC_WEIGHTING.init(), None
    for x, y in zip(
        xs.reshape(NUM_UPDATES, -1, INPUT_DIM), ys.reshape(NUM_UPDATES, -1, NUM_TASKS), strict=True
    ):
        losses = _losses_of(params, x, y)
        if mode == "lagged" and prev is not None:
            famo_state = _famo_update(prev, losses, famo_state)
        params, opt_state = _big_step(params, opt_state, famo_state, x, y)
        if mode == "same-batch":
            famo_state = _famo_update(losses, _losses_of(params, x, y), famo_state)
        prev = losses
    return params, famo_state


@jax.jit(static_argnames="linearize")
def _micro_step(params, opt_state, famo_state, batch_losses, x, y, linearize=True):
    if linearize:
        weigh = famo_jax.linearize_weigh(ACC_WEIGHTING, batch_losses, famo_state)
    else:  # the naive alternative: every micro-batch weighted by its own losses
        weigh = lambda losses: ACC_WEIGHTING.weigh(losses, famo_state)
    grads = jax.grad(lambda p: weigh(task_losses(p, x, y)))(params)
    updates, opt_state = ACC_TX.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def _accumulated_run(mode, params, xs, ys, linearize=True):
    """The recipe: MultiSteps over micro-batches, FAMO once per model update."""
    opt_state, famo_state, prev = ACC_TX.init(params), ACC_WEIGHTING.init(), None
    for micro_xs, micro_ys in zip(xs, ys, strict=True):
        # 1. Forward only: the big batch's losses (FAMO's weights depend on them).
        losses = _mean_losses(params, micro_xs, micro_ys)
        if mode == "lagged" and prev is not None:
            famo_state = _famo_update(prev, losses, famo_state)
        prev = losses
        # 2. K micro-steps; MultiSteps averages the gradients, updates on the K-th.
        for j, (x, y) in enumerate(zip(micro_xs, micro_ys, strict=True)):
            params, opt_state = _micro_step(
                params, opt_state, famo_state, losses, x, y, linearize=linearize
            )
            assert bool(ACC_TX.has_updated(opt_state)) == (j == NUM_MICRO - 1)
        # 3. FAMO's update, once per model update, on big-batch losses.
        if mode == "same-batch":
            famo_state = _famo_update(losses, _mean_losses(params, micro_xs, micro_ys), famo_state)
    return params, famo_state


@pytest.mark.parametrize("mode", ["same-batch", "lagged"])
def test_multisteps_accumulation_equals_the_big_batch(problem, mode):
    params = problem[0]
    xs, ys = _micro_batches(jax.random.key(3))
    expected = _big_batch_run(mode, params, xs, ys)
    accumulated = _accumulated_run(mode, params, xs, ys)
    chex.assert_trees_all_close(accumulated, expected, rtol=2e-4, atol=1e-6)
    # One FAMO update per model update (the lagged mode has no predecessor at first).
    assert int(accumulated[1].num_updates) == NUM_UPDATES - (mode == "lagged")
    assert not np.allclose(accumulated[1].logits, 0.0)
    # Weighing each micro-batch by its own losses is a different method.
    naive = _accumulated_run(mode, params, xs, ys, linearize=False)
    with pytest.raises(AssertionError):
        chex.assert_trees_all_close(naive[0], expected[0], rtol=2e-4, atol=1e-6)


def test_linearize_weigh_checks_the_micro_losses():
    weighting = famo_jax.famo(NUM_TASKS)
    micro_weigh = famo_jax.linearize_weigh(weighting, PREV, weighting.init())
    chex.assert_trees_all_close(micro_weigh(PREV), weighting.weigh(PREV, weighting.init()))
    assert micro_weigh(CURR.astype(jnp.bfloat16)).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="micro_losses must have the shape"):
        micro_weigh(jnp.ones(NUM_TASKS + 1))
    with pytest.raises(TypeError, match="floating"):
        micro_weigh(jnp.ones(NUM_TASKS, jnp.int32))
