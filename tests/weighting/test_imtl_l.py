"""IMTL-L matches LibMTL's ``IMTL`` loss scales step by step, and IMTL-L + IMTL-G is LibMTL's IMTL.

Fixtures: ``tests/reference/fixtures/breadth_c/imtl.npz``: LibMTL's ``IMTL``
(loss scales trained by ``torch.optim.Adam``, as LibMTL's trainer does) for 40
steps, k = 2..12, lr/weight decay (1e-4, 1e-5) (LibMTL's defaults), (1e-2, 0),
(0.1, 1e-3); the losses depend on shared parameters through a fixed random
Jacobian ``J``, so LibMTL's IMTL-G step runs too.

- IMTL-L, in float32: the log-scales after every step, and the weights
  ``k * d weigh / d l = exp(s)`` (LibMTL's sum convention). Tolerance: 2e-5
  of the distance the scales can have moved, ``lr * t``. That is optax's
  rounding, not a difference of method: ``optax.scale_by_adam`` computes its
  bias correction ``1 - 0.999**t`` in float32 (1.3e-5 off at t = 1, 6e-6
  after the square root; torch computes it in double), which puts famo_jax's
  float32 scales 8.5e-6 * lr * t from LibMTL's float64 ones, where LibMTL's
  float32 ones are 3.5e-7 * lr * t away. (The scales are a float32 state, so
  the float64 runs serve only the IMTL-G check below.)
- IMTL (LibMTL's full method) in float64: ``famo_jax.aggregation.imtl_g_weights``
  of the Gram matrix of the scaled task gradients ``exp(s_i) l_i J_i`` gives
  weights whose combination has equal projections on every task direction to
  1e-12, and they equal LibMTL's ``alpha`` up to how far LibMTL's own
  ``alpha`` is from satisfying that condition. LibMTL inverts ``D U^T``
  explicitly, which on these badly scaled inputs leaves its projections
  unequal by up to 14% of their size (1e-10 or less on 78% of the steps,
  where the two agree to 5e-11); famo_jax solves the symmetric system by a
  pseudo-inverse (against a 40-digit evaluation of LibMTL's closed form on
  three of the worst steps, famo_jax's weights are within 2e-13 and LibMTL's
  within 1e-4).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import famo_jax
from famo_jax.aggregation import imtl_g_weights
from tests.weighting import _breadth_c_replay as fixtures

CONFIGS = fixtures.configurations("imtl", ("k", "lr", "weight_decay"))


def record(value, grad, state):
    return grad, state.log_scales


@pytest.mark.parametrize("config", sorted(CONFIGS), ids=lambda c: "k{}_lr{}_wd{}".format(*c))
def test_imtl_l_matches_libmtl_loss_scales(config):
    k, lr, weight_decay = config
    _, arrays = fixtures.load("imtl")
    names = CONFIGS[config]
    losses = np.stack([arrays[f"{name}/losses"] for name in names])
    weighting = famo_jax.imtl_l(k, learning_rate=lr, weight_decay=weight_decay)
    grads, log_scales = fixtures.replay(weighting, losses, "f32", record)
    steps = np.arange(1, losses.shape[1])[:, None] * np.ones((1, k))
    moved, before = lr * steps, lr * (steps - 1)  # how far the scales went by step t
    for b, name in enumerate(names):
        reference = {key: arrays[f"{name}/{key}_f32"] for key in ("loss_scale", "task_grad")}
        np.testing.assert_array_less(
            np.abs(log_scales[b] - reference["loss_scale"]), 2e-5 * moved, err_msg=name
        )
        # exp(s) before step t: its relative error is the absolute error of s.
        np.testing.assert_array_less(
            np.abs(k * grads[b] / reference["task_grad"] - 1), 2e-5 * before + 3e-7, err_msg=name
        )


def projection_spread(alpha, task_grads):
    """How far ``g = sum_i alpha_i g_i`` is from equal projections on every ``u_i``."""
    combined = np.einsum("ti,tim->tm", alpha, task_grads)
    units = task_grads / np.linalg.norm(task_grads, axis=2, keepdims=True)
    projections = np.einsum("tm,tim->ti", combined, units)
    spread = np.abs(projections - projections.mean(axis=1, keepdims=True)).max(axis=1)
    return spread / np.abs(projections).max(axis=1)


@pytest.mark.parametrize("k", sorted({config[0] for config in CONFIGS}))
def test_imtl_l_with_imtl_g_is_libmtl_imtl(k):
    cases, arrays = fixtures.load("imtl")
    names = [name for name, params in cases.items() if params["k"] == k]
    with fixtures.enable_x64(True):
        weights_of = jax.jit(jax.vmap(lambda g: imtl_g_weights(g @ g.T)))
        for name in names:
            losses = arrays[f"{name}/losses"][:-1].astype(np.float64)
            jacobian = arrays[f"{name}/jacobian"]
            scales = arrays[f"{name}/task_grad_f64"]  # exp(s) before each step
            task_grads = (scales * losses)[:, :, None] * jacobian[None]
            alpha = np.asarray(weights_of(jnp.asarray(task_grads)))
            reference = arrays[f"{name}/alpha_f64"]
            np.testing.assert_allclose(alpha.sum(axis=1), 1.0, rtol=1e-12)
            assert projection_spread(alpha, task_grads).max() < 1e-12, name
            # The disagreement is bounded by LibMTL's own violation of the condition.
            size = np.maximum(np.abs(reference), 1e-6 * np.abs(reference).max(axis=1)[:, None])
            error = (np.abs(alpha - reference) / size).max(axis=1)
            allowed = 1e-9 + 100 * projection_spread(reference, task_grads)
            np.testing.assert_array_less(error, allowed, err_msg=name)
            # LibMTL's shared gradient is its alpha's combination of those task gradients.
            shared = np.einsum("ti,tim->tm", reference, task_grads)
            fixtures.assert_close(
                shared, arrays[f"{name}/shared_grad_f64"], 1e-9, what=f"{name} shared grad"
            )


def test_imtl_l_scaled_losses_tend_to_one():
    # Plain gradient descent on the scales: Adam at a constant rate keeps oscillating
    # around s = -log(1e3), where the objective's curvature e^s l changes fastest.
    weighting = famo_jax.imtl_l(3, optimizer=optax.sgd(0.5))
    losses = jnp.array([1e-3, 1.0, 1e3])

    @jax.jit
    def run(state):
        return jax.lax.fori_loop(0, 3000, lambda _, s: weighting.update(losses, losses, s), state)

    state = run(weighting.init())
    np.testing.assert_allclose(jnp.exp(state.log_scales) * losses, 1.0, rtol=1e-5)
    weights = famo_jax.loss_weights(weighting, losses, state)
    np.testing.assert_allclose(weights * losses, 1.0 / 3.0, rtol=1e-5)


def test_imtl_l_starts_as_linear_scalarization():
    weighting = famo_jax.imtl_l(4)
    losses = jnp.array([0.1, 1.0, 10.0, 100.0])
    np.testing.assert_allclose(famo_jax.loss_weights(weighting, losses, weighting.init()), 0.25)


def test_imtl_l_takes_any_optax_optimizer_and_rejects_ignored_settings():
    weighting = famo_jax.imtl_l(2, optimizer=optax.sgd(1.0))
    state = weighting.update(jnp.array([2.0, 0.5]), jnp.array([2.0, 0.5]), weighting.init())
    np.testing.assert_allclose(state.log_scales, [-1.0, 0.5])  # s - (e^s l - 1)
    with pytest.raises(ValueError, match="weight_decay"):
        famo_jax.imtl_l(2, weight_decay=0.1, optimizer=optax.sgd(1.0))
    with pytest.raises(TypeError, match="optimizer"):
        famo_jax.imtl_l(2, optimizer="adam")
