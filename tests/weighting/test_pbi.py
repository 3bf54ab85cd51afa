"""PBI matches LibMOON's ``pbi`` (the aggregation of its ``agg_pbi`` MTL solver).

Fixtures: ``tests/reference/fixtures/breadth_c/pbi.npz``: LibMOON's value and
autograd gradient w.r.t. the losses for 60 loss vectors per case, k = 2..40,
random, badly scaled (1e-3..1e3), signed and near-ray (1e-3 relative off the
uniform ray) losses, uniform and Dirichlet preferences, coeff (theta) 1 and 5.
Convention: LibMOON's value and gradient are ``1 / c = ||pref||_1 / ||pref||_2``
times these. Tolerances: 1e-5 relative in float32 and 1e-10 in float64, on the
size of the terms (``c * (|d1| + theta * d2)`` for the value, ``c * (1 +
theta)`` for the gradient: d1 cancels for signed losses, and the gradient's
entries are sums of two unit-vector terms that cancel), except near the ray in
float32: there the residual ``r = l - d1 u`` is 1e-3 of the losses, so its
direction (the penalty's gradient) is only known to about 6e-8 / 1e-3 = 6e-5
in float32; measured against LibMOON's float64 gradient, famo_jax's float32
one is 4.6e-5 off and LibMOON's float32 one 2.3e-6 (which rounding XLA applies
to the cancelling difference depends on how it fuses the expression: variants
of the same formula measured 1.4e-6 to 4.6e-5). Tolerance there: 3e-4.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import famo_jax
from famo_jax.weighting import pbi_scalarization
from tests.weighting import _breadth_c_replay as fixtures

TOLERANCES = {"f32": 1e-5, "f64": 1e-10}
NEAR_RAY_F32 = 3e-4


@pytest.mark.parametrize("precision", ["f32", "f64"])
def test_pbi_matches_libmoon(precision):
    cases, arrays = fixtures.load("pbi")
    with fixtures.enable_x64(precision == "f64"):
        dtype = fixtures.PRECISIONS[precision]
        value_and_grad = jax.jit(
            jax.vmap(jax.value_and_grad(pbi_scalarization), in_axes=(0, 0, None))
        )
        for name, params in cases.items():
            losses = arrays[f"{name}/losses"].astype(dtype)
            preference = arrays[f"{name}/preference"].astype(dtype)
            theta = params["theta"]
            values, grads = map(np.asarray, value_and_grad(losses, preference, theta))
            c = np.linalg.norm(preference.astype(np.float64), axis=1) / preference.sum(axis=1)
            reference_value = c * arrays[f"{name}/value_{precision}"]
            reference_grad = c[:, None] * arrays[f"{name}/grad_{precision}"]
            rtol = TOLERANCES[precision]
            if precision == "f32" and "near_ray" in name:
                rtol = NEAR_RAY_F32
            # The size of the terms: |d1| + theta * d2 <= (1 + theta) * ||l||.
            size = c * (1 + theta) * np.linalg.norm(losses.astype(np.float64), axis=1)
            np.testing.assert_array_less(
                np.abs(values - reference_value), rtol * size, err_msg=name
            )
            np.testing.assert_array_less(
                np.abs(grads - reference_grad),
                rtol * np.broadcast_to((c * (1 + theta))[:, None], grads.shape),
                err_msg=name,
            )


def test_pbi_factory_is_pbi_scalarization_with_its_preference():
    weighting = famo_jax.pbi(3, preference=[1.0, 2.0, 3.0], theta=5.0, ideal=[0.1, 0.0, -0.2])
    losses = np.array([0.5, 2.0, 1.0], np.float32)
    expected = pbi_scalarization(losses, np.array([1.0, 2.0, 3.0]), 5.0, np.array([0.1, 0.0, -0.2]))
    np.testing.assert_allclose(weighting.weigh(losses, weighting.init()), expected, rtol=1e-6)


def test_pbi_on_the_ray_gives_the_preference_weights():
    weighting = famo_jax.pbi(4, preference=[1.0, 2.0, 3.0, 4.0], theta=5.0)
    losses = 0.37 * np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    weights = famo_jax.loss_weights(weighting, losses, weighting.init())
    np.testing.assert_allclose(weights, np.array([1.0, 2.0, 3.0, 4.0]) / 10.0, rtol=1e-6)


def test_pbi_with_theta_zero_is_a_weighted_mean():
    weighting = famo_jax.pbi(3, preference=[1.0, 1.0, 2.0], theta=0.0)
    losses = np.array([4.0, -1.0, 10.0], np.float32)
    np.testing.assert_allclose(weighting.weigh(losses, weighting.init()), 23.0 / 4.0, rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        ({"preference": [1.0, 0.0]}, ValueError, "preference"),
        ({"preference": [1.0, 2.0, 3.0]}, ValueError, "preference"),
        ({"theta": -1.0}, ValueError, "theta"),
        ({"ideal": [0.0, np.inf]}, ValueError, "ideal"),
    ],
)
def test_pbi_rejects_bad_hyperparameters(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        famo_jax.pbi(2, **kwargs)
