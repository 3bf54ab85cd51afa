"""GradNorm against LibMTL's own code (there is no code from the authors).

Fixtures: ``tests/reference/make_breadth_b_fixtures.py`` (LibMTL at 4336804,
float64): LibMTL's ``GradNorm`` with its ``loss_scale`` trained by PyTorch's
``Adam(lr, weight_decay)`` after every backward pass, as its trainer does;
epoch 0 (equal weights) lasts ``warmup_steps`` steps, after which
``train_loss_buffer[:, 0]`` is the mean of their losses (with no warm-up, the
first step's losses). Six steps per case, k in 2, 3, 5, 10 and 24, random,
conflicting, scaled and degenerate inputs. Bounds, relative to each step's
largest entry (weights and logits: absolute): float32 1e-5 (seen 1.9e-6),
float64 1e-10 (seen 5.5e-16).
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import famo_jax
from famo_jax import aggregation
from tests.aggregation import _breadth_b_fixtures as fixtures


@functools.cache
def jitted(k, **hyper):
    tx = famo_jax.gradnorm(k, **hyper)
    return tx, jax.jit(tx.update)


def check(config, dtype, rtol):
    configs, cases = fixtures.load("libmtl", "gradnorm")
    for case in fixtures.case_names("libmtl", "gradnorm", config):
        arrays = cases[(config, case)]
        k = arrays["grads"].shape[1]
        tx, update = jitted(k, **configs[config])
        steps = [
            {"grads": g, "losses": jnp.asarray(losses, dtype)}
            for g, losses in zip(arrays["grads"], arrays["losses"], strict=True)
        ]
        outputs, states = fixtures.replay(tx, update, steps, dtype)
        scales = fixtures.step_scales(arrays["grads"])
        # LibMTL: sum_i w_i g_i with the weights summing to k.
        fixtures.assert_steps_close(k * outputs, arrays["output"], rtol, scales, case)
        # The weights an update used are those before its step: LibMTL returns them.
        logits = np.stack([np.asarray(s.logits, np.float64) for s in states])
        before = np.concatenate([np.ones((1, k)), logits[:-1]])
        weights = k * np.exp(before) / np.exp(before).sum(axis=1, keepdims=True)
        np.testing.assert_allclose(weights, arrays["weights"], rtol=0, atol=rtol, err_msg=case)
        np.testing.assert_allclose(logits, arrays["logits"], rtol=0, atol=rtol, err_msg=case)


def test_gradnorm_matches_libmtl_in_float32():
    check("lr0.05_warmup2", jnp.float32, 1e-5)


@pytest.mark.parametrize("config", ["default", "lr0.05_warmup2"])
def test_gradnorm_matches_libmtl_in_float64(config):
    with jax.enable_x64(True):
        check(config, jnp.float64, 1e-10)


def test_gradnorm_balances_only_the_selected_layer():
    params = {"last": jnp.zeros(2), "first": jnp.zeros(3)}
    grads = {
        "last": jnp.array([[1.0, 0.0], [0.0, 3.0]]),
        "first": jnp.array([[10.0, 0.0, 0.0], [0.0, 0.0, 0.0]]),
    }
    losses = jnp.array([1.0, 1.0])
    sgd = optax.sgd(0.1)
    selected = famo_jax.gradnorm(2, optimizer=sgd, last_shared_layer={"last": True, "first": False})
    _, state = selected.update(grads, selected.init(params), losses=losses)
    expected = aggregation.gradnorm_logits_gradient(
        jnp.ones(2), jnp.array([1.0, 3.0]), losses, losses
    )
    np.testing.assert_allclose(state.logits, 1.0 - 0.1 * expected, rtol=1e-6)
    everything = famo_jax.gradnorm(2, optimizer=sgd)
    _, all_state = everything.update(grads, everything.init(params), losses=losses)
    assert not np.allclose(all_state.logits, state.logits)  # norms 10.05 and 3 instead


def test_gradnorm_warm_up_defines_the_initial_losses_and_keeps_the_weights():
    tx = famo_jax.gradnorm(2, warmup_steps=2, optimizer=optax.sgd(1.0))
    update = jax.jit(tx.update)
    state = tx.init(None)
    grads = jnp.array([[1.0, 0.0], [0.0, 3.0]])
    for losses in ([1.0, 4.0], [3.0, 2.0]):
        out, state = update(grads, state, losses=jnp.array(losses))
        chex.assert_trees_all_close(out, jnp.mean(grads, axis=0))
        np.testing.assert_array_equal(state.logits, [1.0, 1.0])
    np.testing.assert_allclose(state.initial_losses, [2.0, 3.0])
    _, state = update(grads, state, losses=jnp.array([1.0, 3.0]))
    assert not np.allclose(state.logits, 1.0)
    np.testing.assert_allclose(state.initial_losses, [2.0, 3.0])


def test_gradnorm_gram_path_and_invalid_losses():
    grads = jnp.asarray(np.random.default_rng(0).standard_normal((3, 4)))
    tx = famo_jax.gradnorm(3, learning_rate=0.1)
    implicit = aggregation.ImplicitTaskGradients(
        gram=aggregation.gram_matrix(grads), combine=lambda w: w @ grads
    )
    losses = jnp.array([1.0, 2.0, 0.5])
    chex.assert_trees_all_close(
        tx.update(implicit, tx.init(None), losses=losses),
        tx.update(grads, tx.init(None), losses=losses),
        rtol=1e-5,
    )
    state = tx.init(None)
    out, skipped = tx.update(grads, state, losses=jnp.array([1.0, -1.0, 0.5]))
    assert not np.any(np.isfinite(np.asarray(out)))
    assert int(skipped.num_skipped) == 1
    chex.assert_trees_all_equal(skipped.logits, state.logits)
    selected = famo_jax.gradnorm(3, last_shared_layer=lambda tree: True)
    with pytest.raises(TypeError, match="ImplicitTaskGradients"):
        selected.update(implicit, selected.init(None), losses=losses)
    with pytest.raises(TypeError, match="last_shared_layer"):
        famo_jax.gradnorm(3, last_shared_layer={"w": 1})


def test_gradnorm_inside_shared_trunk_takes_a_selector_of_the_full_parameters():
    params = {"trunk": {"first": jnp.zeros(3), "last": jnp.zeros(2)}, "heads": jnp.zeros((2, 2))}
    rng = np.random.default_rng(3)
    grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal((2,) + p.shape)), params)
    losses = jnp.array([1.0, 2.0])
    sgd = optax.sgd(0.1)
    selector = {"trunk": {"first": False, "last": True}, "heads": False}
    inner = famo_jax.gradnorm(2, optimizer=sgd, last_shared_layer=selector)
    tx = famo_jax.shared_trunk(inner, {"trunk": True, "heads": False})
    updates, state = tx.update(grads, tx.init(params), params, losses=losses)
    alone = famo_jax.gradnorm(2, optimizer=sgd, last_shared_layer={"first": False, "last": True})
    trunk, alone_state = alone.update(grads["trunk"], alone.init(None), losses=losses)
    chex.assert_trees_all_close(updates["trunk"], trunk)
    chex.assert_trees_all_close(state.inner_states["shared"].inner_state.logits, alone_state.logits)
