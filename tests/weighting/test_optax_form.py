"""FAMO the optax way: as_optax inside chains, MultiSteps and inject_hyperparams, runtime
hyperparameters in the state, and against the functional API step for step."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import famo_jax

K = 3
SCALES = jnp.array([1e-2, 1.0, 1e2])


def init_params(seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"trunk": jax.random.normal(k1, (4, 8)) / 2.0, "heads": jax.random.normal(k2, (8, K))}


def task_losses(params, x, y):
    h = jnp.tanh(x @ params["trunk"])
    return SCALES * jnp.mean((h @ params["heads"] - y) ** 2, axis=0)


def batches(n, size=16, seed=1):
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (n, size, 4))
    return x, jnp.sin(x @ jax.random.normal(kw, (4, K)))


WEIGHTING = famo_jax.famo(K)
MODEL_OPT = optax.adam(1e-2)


@jax.jit
def functional_run(params, xs, ys):
    """The functional API's lagged mode: weigh(l_t), update(l_{t-1}, l_t)."""

    def step(carry, batch):
        params, opt_state, state, prev = carry
        x, y = batch

        def objective(p):
            losses = task_losses(p, x, y)
            return WEIGHTING.weigh(losses, state), losses

        (_, losses), grads = jax.value_and_grad(objective, has_aux=True)(params)
        updates, opt_state = MODEL_OPT.update(grads, opt_state, params)
        state = WEIGHTING.update(prev, losses, state)
        return (optax.apply_updates(params, updates), opt_state, state, losses), None

    carry = (params, MODEL_OPT.init(params), WEIGHTING.init(), jnp.full(K, jnp.nan))
    (params, _, state, _), _ = jax.lax.scan(step, carry, (xs, ys))
    return params, state


def optax_step(tx):
    def step(carry, batch):
        params, opt_state = carry
        x, y = batch

        def objective(p):
            losses = task_losses(p, x, y)
            return WEIGHTING.weigh(losses, famo_jax.weighting_state(opt_state)), losses

        (_, losses), grads = jax.value_and_grad(objective, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params, losses=losses)
        return (optax.apply_updates(params, updates), opt_state), None

    return step


def optax_run(tx, params, xs, ys):
    chex.clear_trace_counter()
    step = chex.assert_max_traces(optax_step(tx), n=1)
    (params, opt_state), _ = jax.jit(lambda c: jax.lax.scan(step, c, (xs, ys)))(
        (params, tx.init(params))
    )
    return params, opt_state


def test_as_optax_in_a_chain_is_the_functional_lagged_mode_step_for_step():
    params, (xs, ys) = init_params(), batches(30)
    tx = optax.chain(famo_jax.as_optax(WEIGHTING, K), MODEL_OPT)
    got_params, opt_state = optax_run(tx, params, xs, ys)
    want_params, want_state = functional_run(params, xs, ys)
    chex.assert_trees_all_close(got_params, want_params, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(famo_jax.weighting_state(opt_state), want_state, rtol=1e-6)
    assert int(want_state.num_updates) == 29 and int(want_state.num_skipped) == 1


def test_inside_multisteps_the_weights_stay_fixed_and_update_once_per_model_step():
    params, (xs, ys) = init_params(), batches(12)
    every = 3
    tx = optax.MultiSteps(optax.chain(famo_jax.as_optax(WEIGHTING, K), MODEL_OPT), every)
    got_params, opt_state = optax_run(tx, params, xs, ys)

    # By hand: every micro-batch weighed with the same state by its own losses,
    # gradients averaged, one model step and one lagged FAMO update on the last
    # micro-batch's losses (MultiSteps forwards extra arguments on that step only).
    state, prev = WEIGHTING.init(), jnp.full(K, jnp.nan)
    opt = MODEL_OPT.init(params)
    for start in range(0, 12, every):
        grads = []
        for t in range(start, start + every):
            objective = lambda p, t=t, s=state: WEIGHTING.weigh(task_losses(p, xs[t], ys[t]), s)
            grads.append(jax.grad(objective)(params))
        mean = jax.tree.map(lambda *g: sum(g) / every, *grads)
        last = task_losses(params, xs[start + every - 1], ys[start + every - 1])
        state = WEIGHTING.update(prev, last, state)
        prev = last
        updates, opt = MODEL_OPT.update(mean, opt, params)
        params = optax.apply_updates(params, updates)
    chex.assert_trees_all_close(got_params, params, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(famo_jax.weighting_state(opt_state), state, rtol=1e-5, atol=1e-7)
    assert int(state.num_updates) + int(state.num_skipped) == 12 // every


def test_the_chain_can_be_built_inside_inject_hyperparams():
    params, (xs, ys) = init_params(), batches(10)

    def make(learning_rate):
        return optax.chain(famo_jax.as_optax(WEIGHTING, K), optax.adam(learning_rate))

    injected = optax.inject_hyperparams(make)(learning_rate=1e-2)
    got_params, opt_state = optax_run(injected, params, xs, ys)
    want_params, want_state = functional_run(params, xs, ys)
    chex.assert_trees_all_close(got_params, want_params, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(famo_jax.weighting_state(opt_state), want_state, rtol=1e-6)
    assert float(opt_state.hyperparams["learning_rate"]) == pytest.approx(1e-2)


def test_famo_hyperparameters_are_read_and_set_in_the_optimizer_state():
    tx = optax.chain(famo_jax.as_optax(WEIGHTING, K), MODEL_OPT)
    opt_state = tx.init(init_params())
    assert float(optax.tree_utils.tree_get(opt_state, "gamma")) == pytest.approx(1e-3)
    assert float(optax.tree_utils.tree_get(opt_state, "learning_rate")) == pytest.approx(0.025)
    # Setting gamma to 0 during training is the same as FAMO built with gamma 0.
    zero_gamma = optax.tree_utils.tree_set(opt_state, gamma=0.0)
    state = famo_jax.weighting_state(zero_gamma)
    prev, curr = jnp.array([1.0, 2.0, 4.0]), jnp.array([0.5, 1.9, 4.0])
    reference = famo_jax.famo(K, gamma=0.0)
    for _ in range(3):
        state = WEIGHTING.update(prev, curr, state)
    want = reference.init()
    for _ in range(3):
        want = reference.update(prev, curr, want)
    chex.assert_trees_all_close(state.logits, want.logits, rtol=1e-6)


def test_min_losses_can_be_changed_during_training():
    prev, curr = jnp.array([1.0, 2.0, 4.0]), jnp.array([0.5, 1.9, 3.0])
    bounds = jnp.array([0.2, -1.0, 0.0])
    bounded = famo_jax.famo(K, min_losses=bounds)
    # A state whose bounds were changed behaves as one built with them.
    changed = WEIGHTING.update(prev, curr, WEIGHTING.init()).with_min_losses(bounds)
    built = bounded.update(prev, curr, bounded.init())._replace(logits=changed.logits)
    built = built._replace(opt_state=changed.opt_state)
    chex.assert_trees_all_equal(changed, built)
    chex.assert_trees_all_close(
        WEIGHTING.update(curr, 0.9 * curr, changed), bounded.update(curr, 0.9 * curr, built)
    )
    np.testing.assert_allclose(
        famo_jax.loss_weights(WEIGHTING, curr, changed),
        famo_jax.loss_weights(bounded, curr, built),
    )
    with pytest.raises(ValueError, match=r"min_losses must be a scalar or have shape"):
        changed.with_min_losses([0.0, 0.0])
    assert jax.jit(lambda s, m: s.with_min_losses(m))(changed, 0.5).min_losses.tolist() == [0.5] * 3


def test_an_optimizer_with_learning_rate_or_gamma_is_an_error_not_silence():
    for kwargs in ({"gamma": 0.0}, {"learning_rate": 0.1}, {"gamma": 0.0, "learning_rate": 0.1}):
        with pytest.raises(ValueError, match="only configure.*default optimizer") as info:
            famo_jax.famo(K, optimizer=optax.sgd(0.1), **kwargs)
        assert all(name in str(info.value) for name in kwargs)


def test_missing_or_malformed_losses_raise():
    tx = famo_jax.as_optax(WEIGHTING, K)
    state = tx.init(None)
    with pytest.raises(ValueError, match="needs the task losses"):
        tx.update(jnp.ones(2), state)
    with pytest.raises(ValueError, match=r"losses must have shape \(num_tasks,\)"):
        tx.update(jnp.ones(2), state, losses=jnp.ones(K + 1))
    with pytest.raises(ValueError, match="exactly one WeightingTransformState"):
        famo_jax.weighting_state(optax.adam(1e-3).init(jnp.ones(2)))


def test_the_optimizer_state_with_famo_restores_from_orbax_and_continues(tmp_path):
    params, (xs, ys) = init_params(), batches(8)
    tx = optax.chain(famo_jax.as_optax(WEIGHTING, K), MODEL_OPT)
    step = jax.jit(optax_step(tx))
    carry = (params, tx.init(params))
    for t in range(4):
        carry, _ = step(carry, (xs[t], ys[t]))
    with ocp.CheckpointManager(tmp_path) as manager:
        manager.save(0, args=ocp.args.StandardSave(carry))
        manager.wait_until_finished()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, (params, tx.init(params)))
    with ocp.CheckpointManager(tmp_path) as manager:
        restored = manager.restore(0, args=ocp.args.StandardRestore(abstract))
    assert isinstance(famo_jax.weighting_state(restored[1]), famo_jax.FAMOState)
    for t in range(4, 8):
        carry, _ = step(carry, (xs[t], ys[t]))
        restored, _ = step(restored, (xs[t], ys[t]))
    chex.assert_trees_all_equal(restored, carry)
