"""MGDA against the exact min-norm point and Sener & Koltun's normalisations."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

import famo_jax
from tests.aggregation._flat import (
    PROPERTY_SETTINGS,
    K,
    M,
    aggregate,
    as_float32,
    flat_output,
    from_flat,
    random_flat,
)

# ---------------------------------------------------------------------------
# MGDA: the exact min-norm point (support enumeration) of the normalised gradients.


def exact_min_norm_weights(gram):
    k = gram.shape[0]
    best, best_w = np.inf, None
    for size in range(1, k + 1):
        for support in itertools.combinations(range(k), size):
            sub = gram[np.ix_(support, support)]
            kkt = np.block([[sub, -np.ones((size, 1))], [np.ones((1, size)), np.zeros((1, 1))]])
            sol = np.linalg.lstsq(kkt, np.r_[np.zeros(size), 1.0], rcond=None)[0][:size]
            if np.all(sol >= -1e-12):
                w = np.zeros(k)
                w[list(support)] = np.clip(sol, 0, None) / np.clip(sol, 0, None).sum()
                if w @ gram @ w < best:
                    best, best_w = w @ gram @ w, w
    return best_w


def sener_koltun_mgda(grads, losses, normalization):
    """Their ``gradient_normalizers`` + min-norm weights, applied to the raw gradients."""
    norms = np.linalg.norm(grads, axis=1)
    normalizers = {
        "none": np.ones(len(grads)),
        "l2": norms,
        "loss": losses,
        "loss+": losses * norms,
    }[normalization]
    normalized = grads / normalizers[:, None]
    w = exact_min_norm_weights(normalized @ normalized.T)
    return w @ grads


@pytest.mark.parametrize("normalization", ["none", "l2", "loss", "loss+"])
def test_mgda_equals_the_min_norm_element(normalization):
    # Sum convention and the losses as an extra argument, through optax.chain.
    tx = optax.chain(famo_jax.mgda(normalization), optax.scale(K))
    update = jax.jit(tx.update)
    for seed in range(3):
        flat = random_flat(seed) * np.array([1.0, 10.0, 0.1, 1.0, 3.0])[:, None]
        flat[2] -= flat[0]  # some conflict
        losses = np.exp(np.random.default_rng(seed).standard_normal(K)).astype(np.float32)
        out, _ = update(from_flat(flat), tx.init(None), None, losses=jnp.asarray(losses))
        grads = as_float32(flat)
        reference = K * sener_koltun_mgda(grads, losses.astype(np.float64), normalization)
        # The weights come from float32 Gram matrices with condition numbers up to
        # 1e5, so they are exact to about 1e-5 (the objective is exact to rounding)
        # and their error reaches the output through the raw gradients:
        # |d - d_ref| <= K |w - w_ref|_1 max_i |g_i|. Which digits go depends on the
        # CPU's kernels: an AMD EPYC reached |w - w_ref|_1 ~ 5e-6; 5e-5 is allowed.
        np.testing.assert_allclose(
            flat_output(out), reference, rtol=1e-4, atol=5e-5 * K * np.abs(grads).max()
        )
        if normalization == "none":  # the output is the min-norm point itself
            np.testing.assert_allclose(
                np.linalg.norm(flat_output(out)), np.linalg.norm(reference), rtol=1e-5
            )


@PROPERTY_SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    common=st.floats(0.05, 2.0),
    num_dims=st.sampled_from([2, 3, M]),
)
def test_mgda_direction_does_not_conflict_with_any_task(seed, common, num_dims):
    # The task gradients share a direction v with <v, g_i> > 0 (so a non-conflicting
    # direction exists), also with more tasks than dimensions; the min-norm point d
    # then satisfies <d, g_i> >= |d|^2 > 0 for every task.
    rng = np.random.default_rng(seed)
    v = rng.standard_normal(num_dims)
    v /= np.linalg.norm(v)
    noise = rng.standard_normal((K, num_dims))
    noise -= np.outer(noise @ v, v)  # orthogonal to v
    flat = np.zeros((K, M))
    flat[:, :num_dims] = (common + rng.uniform(0, 1, (K, 1))) * v + noise
    grads = as_float32(flat)
    out, _ = aggregate("mgda", flat)
    tolerance = 1e-5 * np.max(np.sum(grads**2, axis=1))
    assert np.linalg.norm(out) > 0
    assert np.all(grads @ out >= out @ out - tolerance), (grads @ out, out @ out)


def test_mgda_is_zero_at_a_pareto_stationary_point():
    flat = random_flat(4)
    flat[1] = -2.0 * flat[0]  # the hull contains zero
    out, _ = aggregate("mgda", flat)
    np.testing.assert_allclose(out, 0.0, atol=1e-6)


def test_mgda_checks_its_options_and_losses():
    with pytest.raises(ValueError, match="normalization"):
        famo_jax.mgda("norm")
    tx = famo_jax.mgda("loss")
    grads = from_flat(random_flat(0))
    with pytest.raises(ValueError, match="losses"):
        tx.update(grads, tx.init(None))
    with pytest.raises(ValueError, match="shape"):
        tx.update(grads, tx.init(None), losses=jnp.ones(K + 1))
