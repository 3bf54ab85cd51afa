"""Nash-MTL against the bargaining solution computed by scipy."""

import chex
import jax
import numpy as np
import optax
import pytest
import scipy.optimize

import famo_jax
from tests.aggregation._flat import (
    K,
    aggregate,
    as_float32,
    flat_output,
    from_flat,
    jitted,
    random_flat,
)

# ---------------------------------------------------------------------------
# Nash-MTL: alpha with A alpha = 1 / alpha for the raw Gram matrix A = G G^T (the
# authors' units), by scipy on A / |A|_F (whose solution is sqrt(|A|_F) alpha);
# output sum_i alpha_i g_i / k.


def nash_alpha(grads, normalize_gram=False):
    gram = grads @ grads.T
    frobenius = np.linalg.norm(gram)
    gram = gram / frobenius

    def phi(y):  # log-parametrised, alpha = exp(y)
        alpha = np.exp(y)
        return 0.5 * alpha @ gram @ alpha - np.sum(y)

    result = scipy.optimize.minimize(
        phi,
        np.zeros(len(gram)),
        jac=lambda y: np.exp(y) * (gram @ np.exp(y)) - 1.0,
        method="BFGS",
        options={"gtol": 1e-10},
    )
    return np.exp(result.x) / (1.0 if normalize_gram else np.sqrt(frobenius))


def test_nash_mtl_equals_the_bargaining_solution_in_the_authors_units():
    tx = optax.chain(famo_jax.nash_mtl(num_tasks=K), optax.scale(K))  # sum convention
    update = jax.jit(tx.update)
    state = tx.init(None)
    for seed in range(3):
        flat = random_flat(seed) * np.array([1.0, 0.5, 2.0, 1.0, 4.0])[:, None]
        grads = as_float32(flat)
        out, state = update(from_flat(flat), state)
        alpha = nash_alpha(grads)
        np.testing.assert_allclose(np.asarray(state[0].alpha), alpha, rtol=1e-4)
        reference = alpha @ grads
        np.testing.assert_allclose(
            flat_output(out), reference, rtol=1e-4, atol=1e-5 * np.abs(reference).max()
        )
        # The bargaining property in the authors' units: alpha_i <g_i, d> = 1 for
        # every task, so |d| = sqrt(k) in the sum convention.
        np.testing.assert_allclose(alpha * (grads @ reference), 1.0, rtol=1e-4)
        assert np.linalg.norm(flat_output(out)) == pytest.approx(np.sqrt(K), rel=1e-4)
    assert int(state[0].num_updates) == 3 and int(state[0].num_skipped) == 0


def test_nash_mtl_scale_of_the_authors_and_of_the_normalised_gram():
    # Gradients scaled by s: the authors' alpha scales by 1 / s and the update
    # does not change; with normalize_gram the weights do not change and the
    # update scales by s. Both point the same way.
    flat = random_flat(7) * np.array([1.0, 0.3, 3.0, 1.0, 0.1])[:, None]
    for scale in (1e-3, 1.0, 1e3):
        scaled = flat * scale
        raw, raw_state = aggregate("nash_mtl", scaled, num_tasks=K)
        normalized, normalized_state = aggregate(
            "nash_mtl", scaled, num_tasks=K, normalize_gram=True
        )
        grads = as_float32(scaled)
        np.testing.assert_allclose(raw_state.alpha, nash_alpha(grads), rtol=1e-4)
        np.testing.assert_allclose(
            normalized_state.alpha, nash_alpha(grads, normalize_gram=True), rtol=1e-4
        )
        assert np.linalg.norm(raw) == pytest.approx(1 / np.sqrt(K), rel=1e-4)
        frobenius = np.linalg.norm(grads @ grads.T)
        np.testing.assert_allclose(normalized, np.sqrt(frobenius) * raw, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(
            normalized_state.alpha, np.sqrt(frobenius) * raw_state.alpha, rtol=1e-4
        )


def test_nash_mtl_with_one_task_is_the_unit_task_gradient():
    flat = 3.0 * random_flat(8, k=1)
    out, state = aggregate("nash_mtl", flat, num_tasks=1)
    norm = np.linalg.norm(as_float32(flat))
    np.testing.assert_allclose(out, as_float32(flat)[0] / norm, rtol=1e-5)
    np.testing.assert_allclose(state.alpha, [1 / norm], rtol=1e-5)
    out, _ = aggregate("nash_mtl", flat, num_tasks=1, normalize_gram=True)
    np.testing.assert_allclose(out, as_float32(flat)[0], rtol=1e-5)


def test_nash_mtl_keeps_the_previous_weights_when_there_is_no_solution():
    tx, update = jitted("nash_mtl", num_tasks=K)
    good = random_flat(1)
    out, state = update(from_flat(good), tx.init(None))
    previous = np.asarray(state.alpha)
    bad = random_flat(2)
    bad[1] = -bad[0]  # exactly opposite: no direction improves every task
    out, state = update(from_flat(bad), state)
    np.testing.assert_array_equal(state.alpha, previous)
    assert int(state.num_skipped) == 1 and int(state.num_updates) == 1
    np.testing.assert_allclose(flat_output(out), previous @ as_float32(bad) / K, rtol=1e-5)


def test_nash_mtl_updates_the_weights_every_few_steps():
    tx = famo_jax.nash_mtl(num_tasks=K, update_weights_every=3)
    chex.clear_trace_counter()
    update = jax.jit(chex.assert_max_traces(tx.update, n=1))  # one trace for both branches
    state = tx.init(None)
    alphas = []
    for step in range(7):
        flat = random_flat(100 + step)
        out, new_state = update(from_flat(flat), state)
        if step % 3:  # weights reused: output from the previous weights
            np.testing.assert_array_equal(new_state.alpha, state.alpha)
            np.testing.assert_allclose(
                flat_output(out), np.asarray(state.alpha) @ as_float32(flat) / K, rtol=1e-5
            )
        else:
            np.testing.assert_allclose(new_state.alpha, nash_alpha(as_float32(flat)), rtol=1e-4)
        alphas.append(np.asarray(new_state.alpha))
        state = new_state
    assert int(state.num_updates) + int(state.num_skipped) == 7
    assert len({a.tobytes() for a in alphas}) == 3  # recomputed at steps 0, 3 and 6


def test_nash_mtl_without_num_tasks_and_its_options():
    flat = random_flat(5)
    with_k, state_k = aggregate("nash_mtl", flat, num_tasks=K)
    without, state = aggregate("nash_mtl", flat)
    assert state.alpha.shape == (0,) and state_k.alpha.shape == (K,)
    np.testing.assert_allclose(without, with_k, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="num_tasks"):
        famo_jax.nash_mtl(update_weights_every=2)
    with pytest.raises(ValueError, match="update_weights_every"):
        famo_jax.nash_mtl(num_tasks=2, update_weights_every=0)
    with pytest.raises(TypeError, match="max_iters"):
        famo_jax.nash_mtl(max_iters=1.5)
    with pytest.raises(TypeError, match="normalize_gram"):
        famo_jax.nash_mtl(normalize_gram="yes")
    tx = famo_jax.nash_mtl(num_tasks=K + 1)
    with pytest.raises(ValueError, match="num_tasks"):
        tx.update(from_flat(flat), tx.init(None))
