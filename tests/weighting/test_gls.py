"""GLS matches LibMTL's ``GLS`` (geometric mean of the losses), and its own edge cases.

Fixtures: ``tests/reference/fixtures/breadth_c/gls.npz`` (LibMTL's value and
autograd gradient w.r.t. the losses, k = 2..40, random, badly scaled, spiking,
dominated and equal losses). Compared with ``eps=0`` (LibMTL's
formula) to 1e-5 relative in float32 (the geometric mean is computed here in
the log domain, LibMTL takes the product: against LibMTL's float64 result the
two float32 errors are at most 6e-7 and 2e-7), 1e-12 in float64; the default
``eps=1e-8`` moves a weight by up to ``eps / min(losses)`` (1e-5 for a 1e-3
loss), checked separately.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import famo_jax
from tests.weighting import _breadth_c_replay as fixtures

TOLERANCES = {"f32": 1e-5, "f64": 1e-12}
CONFIGS = fixtures.configurations("gls", ("k",))


@pytest.mark.parametrize("precision", ["f32", "f64"])
@pytest.mark.parametrize("k", sorted(key[0] for key in CONFIGS))
def test_gls_matches_libmtl(k, precision):
    _, arrays = fixtures.load("gls")
    names = CONFIGS[(k,)]
    losses = np.stack([arrays[f"{name}/losses"] for name in names])
    weighting = famo_jax.gls(k, eps=0.0)  # LibMTL's formula
    values, grads = fixtures.replay(weighting, losses, precision, lambda v, g, s: (v, g))
    for b, name in enumerate(names):
        rtol = TOLERANCES[precision]
        reference = {key: arrays[f"{name}/{key}_{precision}"] for key in ("value", "grad")}
        fixtures.assert_close(values[b], reference["value"], rtol, what=f"{name} value")
        fixtures.assert_close(grads[b], reference["grad"], rtol, what=f"{name} grad")


def test_gls_default_eps_moves_the_weights_by_at_most_eps_over_the_loss():
    """The documented effect of eps = 1e-8, on LibMTL's float64 outputs."""
    _, arrays = fixtures.load("gls")
    name = "k040_scaled"  # losses down to 1e-3 and below: the largest effect
    losses = arrays[f"{name}/losses"]
    grads = fixtures.replay(famo_jax.gls(40), losses[None], "f64", lambda v, g, s: g)[0]
    reference = arrays[f"{name}/grad_f64"]
    bound = 1e-8 / losses[:-1].min(axis=1, keepdims=True).astype(np.float64)
    relative = np.abs(grads - reference) / np.abs(reference)
    assert np.all(relative <= 2 * bound + 1e-12), (relative.max(), bound.max())
    assert relative.max() > 1e-7  # the effect is there, and measurable


def test_gls_does_not_overflow_where_the_product_does():
    """Ten losses of 1e5: LibMTL's product is 1e50, inf in float32; the mean is 1e5."""
    weighting = famo_jax.gls(10)
    losses = jnp.full((10,), 1e5)
    value, weights = jax.jit(jax.value_and_grad(weighting.weigh))(losses, weighting.init())
    np.testing.assert_allclose(value, 1e5, rtol=1e-6)
    np.testing.assert_allclose(weights, np.full(10, 0.1), rtol=1e-6)


def test_gls_is_scale_invariant_in_direction():
    """Scaling one loss by c scales the geometric mean by c^(1/k): same direction."""
    weighting = famo_jax.gls(3, eps=0.0)
    losses = jnp.array([0.5, 2.0, 30.0])
    scaled = losses * jnp.array([1.0, 1.0, 1e3])
    grad = jax.grad(weighting.weigh)
    # weights times the losses are the same up to the common factor L / k.
    a = grad(losses, weighting.init()) * losses
    b = grad(scaled, weighting.init()) * scaled
    np.testing.assert_allclose(a / a.sum(), b / b.sum(), rtol=1e-6)
    np.testing.assert_allclose(a.sum(), weighting.weigh(losses, weighting.init()), rtol=1e-6)


def test_gls_zero_loss_is_finite_with_eps_and_invalid_without():
    losses = jnp.array([0.0, 1.0, 4.0])
    value, weights = jax.value_and_grad(famo_jax.gls(3).weigh)(losses, optax_empty())
    assert np.isfinite(value) and np.all(np.isfinite(weights))
    value, weights = jax.value_and_grad(famo_jax.gls(3, eps=0.0).weigh)(losses, optax_empty())
    assert np.isnan(value) and np.all(np.isnan(weights))


def test_gls_rejects_a_bad_eps():
    with pytest.raises(ValueError, match="eps"):
        famo_jax.gls(2, eps=-1.0)


def optax_empty():
    return famo_jax.gls(3).init()
