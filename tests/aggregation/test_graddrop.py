"""GradDrop: Algorithm 1 of the paper on parameter gradients (as the authors' port)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import famo_jax
from tests.aggregation._flat import (
    K,
    aggregate,
    as_float32,
    from_flat,
    random_flat,
)

# ---------------------------------------------------------------------------
# GradDrop: Algorithm 1 of the paper on parameter gradients (as the authors' port).

SIGN_GRADS = np.array([[3.0, 1.0, -1.0, 2.0], [-1.0, -3.0, 1.0, 1.0]])
PURITY = np.array([0.75, 0.25, 0.5, 1.0])  # 0.5 * (1 + sum / sum |.|) per entry


@functools.cache
def graddrop_over_keys(num_keys, **kwargs):
    tx = famo_jax.graddrop(**kwargs)
    keys = jax.random.split(jax.random.PRNGKey(0), num_keys)
    states = famo_jax.GradDropState(key=keys)
    run = jax.jit(jax.vmap(lambda state: tx.update(jnp.asarray(SIGN_GRADS, jnp.float32), state)))
    return run, states


def test_graddrop_keeps_one_sign_per_entry_with_the_sign_purity_as_probability():
    run, states = graddrop_over_keys(4000)
    out, new_states = run(states)
    out = np.asarray(out, np.float64)
    positive = np.where(SIGN_GRADS > 0, SIGN_GRADS, 0).sum(axis=0) / 2
    negative = np.where(SIGN_GRADS < 0, SIGN_GRADS, 0).sum(axis=0) / 2
    picked_positive = out == positive
    assert np.all(picked_positive | (out == negative))
    # P(keep the positive ones) = purity, within 4.5 standard deviations.
    frequency = picked_positive.mean(axis=0)
    spread = 4.5 * np.sqrt(PURITY * (1 - PURITY) / len(out)) + 1e-12
    assert np.all(np.abs(frequency - PURITY) <= spread), frequency
    assert not np.array_equal(new_states.key, states.key)


def test_graddrop_agreeing_entries_leaks_and_scale():
    flat = random_flat(3)
    flat[:, :4] = np.abs(flat[:, :4])  # entries 0-3: every task agrees
    flat[:, 4:6] = -np.abs(flat[:, 4:6])
    grads = as_float32(flat)
    out, state = aggregate("graddrop", flat, seed=0)
    np.testing.assert_allclose(out[:6], grads.mean(axis=0)[:6], rtol=1e-6)
    # The sign purity is scale-free (no epsilon): the same key drops the same entries.
    tiny, _ = aggregate("graddrop", 1e-20 * flat, seed=0)
    np.testing.assert_allclose(tiny, 1e-20 * out, rtol=1e-5)
    # leak = 1 is the mean; per-task leaks.
    np.testing.assert_allclose(
        aggregate("graddrop", flat, leak=1.0)[0], grads.mean(axis=0), rtol=1e-6
    )
    # Task 0 fully leaks: where its entry was dropped, g_0 / k comes back. The
    # first seed whose draws drop one of task 0's entries (JAX's random streams
    # differ between versions).
    for seed in range(20):
        out, _ = aggregate("graddrop", flat, seed=seed)
        leaky, _ = aggregate("graddrop", flat, leak=(1.0, 0.0, 0.0, 0.0, 0.0), seed=seed)
        restored = ~np.isclose(leaky, out, rtol=1e-6, atol=0)
        if np.any(restored):
            break
    assert np.any(restored)
    np.testing.assert_allclose((leaky - out)[restored], grads[0][restored] / K, rtol=1e-4)


def test_graddrop_rejects_bad_leaks():
    with pytest.raises(ValueError, match="leak"):
        famo_jax.graddrop(leak=1.5)
    with pytest.raises(ValueError, match="leak"):
        famo_jax.graddrop(leak=[[0.1]])
    tx = famo_jax.graddrop(leak=(0.0, 0.5))
    with pytest.raises(ValueError, match="leak"):
        tx.update(from_flat(random_flat(0)), tx.init(None))
