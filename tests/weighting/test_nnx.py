"""famo_jax.nnx.Weighting: FAMO's state as NNX state, updated in place inside nnx.jit."""

import chex
import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
import pytest

nnx = pytest.importorskip("flax.nnx")

import famo_jax  # noqa: E402
import famo_jax.nnx  # noqa: E402

K = 3
SCALES = jnp.array([1e-2, 1.0, 1e2])


class Model(nnx.Module):
    def __init__(self, rngs):
        self.trunk = nnx.Linear(4, 8, rngs=rngs)
        self.heads = nnx.Linear(8, K, rngs=rngs)

    def __call__(self, x):
        return self.heads(jnp.tanh(self.trunk(x)))


def task_losses(outputs, y):
    return SCALES * jnp.mean((outputs - y) ** 2, axis=0)


def data(n=8):
    kx, kw = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (n, 16, 4))
    return x, jnp.sin(x @ jax.random.normal(kw, (4, K)))


@nnx.jit
def nnx_step(model, optimizer, weighting, x, y):
    def objective(model):
        losses = task_losses(model(x), y)
        return weighting(losses), losses

    (_, losses), grads = nnx.value_and_grad(objective, has_aux=True)(model)
    optimizer.update(model, grads)
    weighting.update(losses, task_losses(model(x), y))  # the authors' same-batch update


def test_in_place_updates_inside_nnx_jit_equal_the_functional_api():
    xs, ys = data()
    model = Model(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    weighting = famo_jax.nnx.famo(K, gamma=0.01)

    # The functional API on the same model, from the same initial parameters.
    graphdef, params = nnx.split(Model(nnx.Rngs(0)), nnx.Param)
    functional = famo_jax.famo(K, gamma=0.01)
    tx = optax.adam(1e-2)
    opt_state, state = tx.init(params), functional.init()

    @jax.jit
    def functional_step(params, opt_state, state, x, y):
        apply = lambda p: task_losses(nnx.merge(graphdef, p)(x), y)
        grads = jax.grad(lambda p: functional.weigh(apply(p), state))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        return new_params, opt_state, functional.update(apply(params), apply(new_params), state)

    for t in range(len(xs)):
        nnx_step(model, optimizer, weighting, xs[t], ys[t])
        params, opt_state, state = functional_step(params, opt_state, state, xs[t], ys[t])
    chex.assert_trees_all_close(weighting.value, state, rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(nnx.state(model, nnx.Param), params, rtol=1e-5, atol=1e-7)
    assert int(weighting.value.num_updates) == len(xs)
    chex.assert_trees_all_close(weighting.task_weights, state.task_weights, rtol=1e-5)


def test_state_is_nnx_state_and_restores_from_a_checkpoint(tmp_path):
    xs, ys = data(6)
    model = Model(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    weighting = famo_jax.nnx.famo(K)
    for t in range(3):
        nnx_step(model, optimizer, weighting, xs[t], ys[t])
    _, state = nnx.split(weighting)
    assert isinstance(
        jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, famo_jax.FAMOState))[0],
        famo_jax.FAMOState,
    )
    with ocp.CheckpointManager(tmp_path) as manager:
        manager.save(0, args=ocp.args.StandardSave(nnx.state(weighting)))
        manager.wait_until_finished()
    fresh = famo_jax.nnx.famo(K)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.state(fresh))
    with ocp.CheckpointManager(tmp_path) as manager:
        nnx.update(fresh, manager.restore(0, args=ocp.args.StandardRestore(abstract)))
    chex.assert_trees_all_equal(fresh.value, weighting.value)
    losses = jnp.array([1.0, 2.0, 3.0])
    fresh.update(losses, 0.5 * losses)
    weighting.update(losses, 0.5 * losses)
    chex.assert_trees_all_equal(fresh.value, weighting.value)


def test_a_jitted_step_is_traced_once():
    xs, ys = data(5)
    model = Model(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    weighting = famo_jax.nnx.famo(K)
    chex.clear_trace_counter()

    @nnx.jit
    @chex.assert_max_traces(n=1)
    def step(model, optimizer, weighting, x, y):
        def objective(model):
            losses = task_losses(model(x), y)
            return weighting(losses), losses

        (_, losses), grads = nnx.value_and_grad(objective, has_aux=True)(model)
        optimizer.update(model, grads)
        weighting.update(losses, task_losses(model(x), y))

    for t in range(5):
        step(model, optimizer, weighting, xs[t], ys[t])
    assert int(weighting.value.num_updates) == 5


def test_any_loss_weighting_and_a_clear_error_otherwise():
    dwa = famo_jax.nnx.Weighting(famo_jax.dwa(K, window=1))
    losses = jnp.array([1.0, 2.0, 3.0])
    dwa.update(losses, losses)
    assert int(dwa.value.num_updates) == 1
    chex.assert_trees_all_close(dwa.loss_weights(losses), jnp.full(K, 1 / K))
    with pytest.raises(TypeError, match="weighting must be a famo_jax.LossWeighting"):
        famo_jax.nnx.Weighting(optax.adam(1e-3))
