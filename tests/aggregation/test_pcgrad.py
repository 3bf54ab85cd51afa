"""PCGrad against the paper's vector-space algorithm for every task order."""

import itertools

import jax
import numpy as np

import famo_jax
from tests.aggregation._flat import (
    aggregate,
    as_float32,
    flat_output,
    from_flat,
    jitted,
    random_flat,
)

# ---------------------------------------------------------------------------
# PCGrad: the vector-space algorithm of the paper, for every possible task order.


def pcgrad_vector_space(grads, orders):
    projected = []
    for i, order in enumerate(orders):
        g = grads[i].copy()
        for j in order:
            inner = g @ grads[j]
            if inner < 0:
                g = g - inner / (grads[j] @ grads[j]) * grads[j]
        projected.append(g)
    return np.mean(projected, axis=0)


def all_pcgrad_outputs(grads):
    k = len(grads)
    per_task = [list(itertools.permutations([j for j in range(k) if j != i])) for i in range(k)]
    return np.array([pcgrad_vector_space(grads, orders) for orders in itertools.product(*per_task)])


def test_pcgrad_is_the_projection_algorithm_in_a_random_order():
    # Three tasks: each projects on the two others in one of two orders, so there
    # are 8 possible outputs; every update must be one of them, and both orders of
    # some task must occur over the updates.
    tx, update = jitted("pcgrad", seed=0)
    state = tx.init(None)
    seen = set()
    for seed in range(12):
        flat = random_flat(seed, k=3)
        flat[1] -= 1.5 * flat[0]
        flat[2] -= 0.7 * flat[1]
        grads = as_float32(flat)
        out, state = update(from_flat(flat), state)
        candidates = all_pcgrad_outputs(grads)
        distances = np.abs(candidates - flat_output(out)).max(axis=1)
        assert distances.min() <= 1e-5 * np.abs(candidates).max(), distances
        seen.add(tuple(np.round(candidates[np.argmin(distances)] - candidates[0], 4)))
    assert len(seen) > 1


def test_pcgrad_runs_are_reproducible_and_depend_on_the_seed():
    flat = random_flat(0, k=3)
    flat[1] -= 1.5 * flat[0]
    flat[2] -= 0.7 * flat[1]

    def run(tx, update):
        state, outs = tx.init(None), []
        for _ in range(8):
            out, state = update(from_flat(flat), state)
            outs.append(flat_output(out))
        return np.array(outs), state

    tx0, update0 = jitted("pcgrad", seed=0)
    first, state = run(tx0, update0)
    again, _ = run(tx0, update0)
    np.testing.assert_array_equal(first, again)
    assert state.key.shape == (2,) and not np.array_equal(state.key, tx0.init(None).key)
    keyed = famo_jax.pcgrad(key=jax.random.PRNGKey(0))
    np.testing.assert_array_equal(keyed.init(None).key, tx0.init(None).key)
    other, _ = run(*jitted("pcgrad", seed=1))
    assert not np.allclose(first, other)  # some update used a different order


def test_pcgrad_without_conflicts_is_the_mean():
    flat = np.abs(random_flat(2, k=3))  # all inner products positive
    out, _ = aggregate("pcgrad", flat, seed=0)
    np.testing.assert_allclose(out, as_float32(flat).mean(axis=0), rtol=1e-6)
