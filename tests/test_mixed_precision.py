"""Mixed precision: a bfloat16 model with FAMO's state in float32.

The model is the data-parallel example's multi-head MLP. In bfloat16 its task
losses come out in bfloat16; FAMO keeps float32 logits (``logits_dtype``
default), computes the weighting in float32 and returns the weighted loss in
the losses' dtype.

Tolerances are stated in units of bfloat16's unit roundoff ``u = 2**-8``
(8 significand bits). A task loss is the result of a short chain of bfloat16
roundings (inputs and parameters, two matmuls, tanh, the residual, its square
and the batch mean), each contributing a relative error of at most ``u``; the
weighted loss and the gradient inherit errors of the same order. The one-step
comparison allows ``4u`` (measured: about ``0.3u`` for the task losses, ``0.6u``
for the gradient), which is tight enough to catch a rounding of FAMO's weights
or state to bfloat16 only through their effect on the loss; the dtype checks
catch that directly. Over a short training run the task losses are allowed
``8u`` (measured below ``3u`` after 50 steps) and the task weights ``1e-3``
(measured ``2e-4``: the weights follow the log-loss decreases, which stay
within ``u`` of the float32 run's).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import famo_jax
from examples import data_parallel as model

U_BF16 = 2.0**-8
NUM_TASKS = 3


def cast(tree, dtype):
    return jax.tree.map(lambda a: a.astype(dtype), tree)


@pytest.fixture(scope="module")
def setup():
    # Parameters and data rounded to bfloat16 once, so that both runs start from the
    # same values and the comparison isolates the precision of the computation.
    params = cast(model.init_params(jax.random.key(0), 8, 16, NUM_TASKS), jnp.bfloat16)
    batch = cast(model.make_batch(jax.random.key(1), 256, 8, NUM_TASKS), jnp.bfloat16)
    weighting = famo_jax.famo(NUM_TASKS)
    state = weighting.init()
    # A state whose weights are not uniform, from a few updates.
    for prev, curr in [([1.0, 2.0, 3.0], [0.5, 1.9, 2.0]), ([0.5, 1.9, 2.0], [0.4, 1.5, 1.9])]:
        state = weighting.update(jnp.array(prev), jnp.array(curr), state)
    return params, batch, weighting, state


@jax.jit
def weighted_loss_and_grad(params, batch, state):
    weighting = famo_jax.famo(NUM_TASKS)

    def objective(p):
        losses = model.task_losses(p, batch)
        return weighting.weigh(losses, state), losses

    (loss, losses), grads = jax.value_and_grad(objective, has_aux=True)(params)
    return loss, losses, grads, famo_jax.loss_weights(weighting, losses, state)


def test_bfloat16_model_keeps_famo_state_in_float32(setup):
    params, batch, weighting, state = setup
    loss, losses, grads, weights = weighted_loss_and_grad(params, batch, state)
    assert losses.dtype == jnp.bfloat16 and loss.dtype == jnp.bfloat16
    assert weights.dtype == jnp.bfloat16
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(grads))
    new_state = weighting.update(losses, losses * 0.9, state)
    assert new_state.logits.dtype == jnp.float32
    assert all(
        leaf.dtype in (jnp.float32, jnp.int32) for leaf in jax.tree.leaves(new_state.opt_state)
    )


def test_weighted_loss_and_gradient_match_float32(setup):
    params, batch, _, state = setup
    loss16, losses16, grads16, weights16 = weighted_loss_and_grad(params, batch, state)
    loss32, losses32, grads32, weights32 = weighted_loss_and_grad(
        cast(params, jnp.float32), cast(batch, jnp.float32), state
    )
    tolerance = 4 * U_BF16
    np.testing.assert_allclose(np.float32(losses16), losses32, rtol=tolerance)
    np.testing.assert_allclose(np.float32(loss16), loss32, rtol=tolerance)
    np.testing.assert_allclose(np.float32(weights16), weights32, atol=tolerance)
    flat16, _ = ravel_pytree(cast(grads16, jnp.float32))
    flat32, _ = ravel_pytree(grads32)
    relative_error = float(jnp.linalg.norm(flat16 - flat32) / jnp.linalg.norm(flat32))
    assert relative_error <= tolerance
    for leaf16, leaf32 in zip(jax.tree.leaves(grads16), jax.tree.leaves(grads32), strict=True):
        leaf_error = jnp.linalg.norm(leaf16.astype(jnp.float32) - leaf32)
        assert float(leaf_error / jnp.linalg.norm(leaf32)) <= 2 * tolerance


def train(params, batch, compute_dtype, num_steps):
    """Float32 master parameters, optimizer and FAMO state; the model computes in compute_dtype."""
    weighting = famo_jax.famo(NUM_TASKS)
    optimizer = optax.adam(1e-2)
    batch = cast(batch, compute_dtype)

    def losses_of(p):
        return model.task_losses(cast(p, compute_dtype), batch)

    def step(carry, _):
        p, opt_state, state = carry
        grads, losses = jax.grad(
            lambda p: (weighting.weigh(losses_of(p), state), losses_of(p)), has_aux=True
        )(p)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        p = optax.apply_updates(p, updates)
        state = weighting.update(losses, losses_of(p), state)
        return (p, opt_state, state), losses.astype(jnp.float32)

    init = (params, optimizer.init(params), weighting.init())
    return jax.lax.scan(step, init, length=num_steps)


def test_short_bfloat16_training_tracks_float32(setup):
    params, batch, _, _ = setup
    params = cast(params, jnp.float32)
    run = jax.jit(train, static_argnums=(2, 3))
    (params16, _, state16), losses16 = run(params, batch, jnp.bfloat16, 50)
    (params32, _, state32), losses32 = run(params, batch, jnp.float32, 50)
    assert state16.logits.dtype == jnp.float32
    chex.assert_trees_all_equal_dtypes(params16, params32)
    np.testing.assert_allclose(losses16, losses32, rtol=8 * U_BF16)
    np.testing.assert_allclose(state16.task_weights, state32.task_weights, atol=1e-3)
    # The comparison is not vacuous: training moved the losses and the weights.
    assert np.all(np.asarray(losses32[-1]) < 0.8 * np.asarray(losses32[0]))
    assert float(jnp.max(jnp.abs(state32.task_weights - 1 / NUM_TASKS))) > 0.05


def test_bfloat16_losses_hide_famos_signal_and_float32_losses_restore_it():
    """The advice of docs/getting_started.md: compute the task losses in float32.

    bfloat16 keeps 8 significand bits: a loss falling from 999 to 998 is 1000
    both times. Here task 0 improves and task 1 stalls, so FAMO should move
    weight to task 1; with bfloat16 losses it sees no change at all.
    """
    weighting = famo_jax.famo(2, optimizer=optax.sgd(1.0))
    prev, curr = [999.0, 999.0], [998.0, 999.0]

    def logits_after(dtype):
        state = weighting.update(
            jnp.asarray(prev, dtype), jnp.asarray(curr, dtype), weighting.init()
        )
        return np.asarray(state.logits)

    assert jnp.asarray(999.0, jnp.bfloat16) == jnp.asarray(998.0, jnp.bfloat16)
    np.testing.assert_array_equal(logits_after(jnp.bfloat16), [0.0, 0.0])  # no signal
    logits = logits_after(jnp.float32)
    assert logits[1] - logits[0] > 4e-4  # log(999/998) / 2 to the stalled task
