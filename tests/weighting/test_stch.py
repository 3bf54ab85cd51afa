"""STCH matches LibMTL's ``STCH`` step by step (warm-up, nadir averaging, smooth max).

Fixtures: ``tests/reference/fixtures/breadth_c/stch.npz``: LibMTL's ``STCH``
run for 40 steps with its state carried, epochs of 3-5 steps, warm-up of 0-2
epochs, mu in {0.1, 1, 5}, k = 2..40, random, badly scaled (1e-3..1e3),
spiking, dominated and equal losses. Conventions (the docstring's): LibMTL's
loss and gradient are ``k`` times these, and in the smooth phase its value is
shifted by ``-k * max_i x_i`` (a detached constant). Compared in float32, to
1e-5 relative. (The float64 runs in the fixture are not replayed: the nadir is
kept in the float32 state, and its rounding, divided by mu = 0.1, already moves
the weights by 1.2e-6.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import famo_jax
from tests.weighting import _breadth_c_replay as fixtures

RTOL = 1e-5
CONFIGS = fixtures.configurations("stch", ("k", "mu", "warmup_epoch", "iters_per_epoch"))


def record(value, grad, state):
    return value, grad, state.nadir


@pytest.mark.parametrize("config", sorted(CONFIGS), ids=lambda c: "k{}_mu{}_w{}_i{}".format(*c))
def test_stch_matches_libmtl(config):
    precision = "f32"
    k, mu, warmup_epoch, iters = config
    _, arrays = fixtures.load("stch")
    names = CONFIGS[config]
    losses = np.stack([arrays[f"{name}/losses"] for name in names])
    weighting = famo_jax.stch(k, warmup_steps=warmup_epoch * iters, nadir_steps=iters, mu=mu)
    values, grads, nadirs = fixtures.replay(weighting, losses, precision, record)
    smooth = np.arange(losses.shape[1] - 1) >= (warmup_epoch + 1) * iters
    rtol = RTOL
    for b, name in enumerate(names):
        reference = {key: arrays[f"{name}/{key}_{precision}"] for key in ("value", "grad", "nadir")}
        fixtures.assert_close(nadirs[b], reference["nadir"], rtol, what=f"{name} nadir")
        fixtures.assert_close(k * grads[b], reference["grad"], rtol, what=f"{name} grad")
        # LibMTL's value in the smooth phase: k * (mu * logsumexp(x / mu) - max x).
        step_losses = losses[b, :-1].astype(np.float64)
        x = np.log(step_losses / np.where(smooth[:, None], reference["nadir"], 1.0) + 1e-20)
        shift = np.where(smooth, k * x.max(axis=1), 0.0)
        expected = reference["value"] + shift
        # Sums of logs of either sign cancel: compare on the size of the terms.
        size = k * (np.abs(x).max(axis=1) + np.where(smooth, mu * np.log(k), 0.0)) + 1.0
        np.testing.assert_array_less(np.abs(k * values[b] - expected), rtol * size, err_msg=name)


def test_stch_phases_are_counted_in_valid_updates():
    weighting = famo_jax.stch(2, warmup_steps=2, nadir_steps=2)
    update = jax.jit(weighting.update)
    state = weighting.init()
    losses = jnp.array([1.0, 4.0])
    for value in (losses, losses.at[0].set(jnp.nan), losses, 2 * losses, 4 * losses):
        state = update(value, value, state)
    # one skipped; valid steps 0, 1 warm up, steps 2 and 3 (2 l and 4 l) are averaged
    assert int(state.num_updates) == 4 and int(state.num_skipped) == 1
    np.testing.assert_allclose(state.nadir, 3.0 * losses)


def test_stch_weights_tend_to_the_worst_task_as_mu_shrinks():
    losses = jnp.array([1.0, 1.0, 1.0])
    weights = {}
    for mu in (10.0, 0.01):
        weighting = famo_jax.stch(3, warmup_steps=0, nadir_steps=1, mu=mu)
        state = weighting.update(jnp.array([1.0, 0.5, 2.0]), losses, weighting.init())
        weights[mu] = famo_jax.loss_weights(weighting, losses, state)
    # relative to the nadir (1, 0.5, 2), task 1 is worst (twice its nadir)
    assert int(jnp.argmax(weights[0.01] * losses)) == 1
    np.testing.assert_allclose(weights[0.01] * losses, [0.0, 1.0, 0.0], atol=1e-6)
    assert float(jnp.max(weights[10.0]) / jnp.min(weights[10.0])) < 1.2


def test_stch_a_zero_nadir_is_not_normalised():
    weighting = famo_jax.stch(2, warmup_steps=0, nadir_steps=1)
    state = weighting.update(jnp.array([0.0, 2.0]), jnp.array([0.0, 2.0]), weighting.init())
    value, weights = jax.value_and_grad(weighting.weigh)(jnp.array([3.0, 2.0]), state)
    # x = (log 3, log 1): task 0 is compared as if its nadir were 1
    np.testing.assert_allclose(value, np.log(np.exp(np.log(3.0)) + 1.0), rtol=1e-6)
    np.testing.assert_allclose(weights, [0.75 / 3.0, 0.25 / 2.0], rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"warmup_steps": -1, "nadir_steps": 1}, "warmup_steps"),
        ({"warmup_steps": 0, "nadir_steps": 0}, "nadir_steps"),
        ({"warmup_steps": 0, "nadir_steps": 1, "mu": 0.0}, "mu"),
        ({"warmup_steps": 0, "nadir_steps": 1, "eps": -1.0}, "eps"),
    ],
)
def test_stch_rejects_bad_hyperparameters(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        famo_jax.stch(2, **kwargs)
