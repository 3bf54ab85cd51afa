"""Many seeds in one program: vmap of a whole FAMO training run equals separate runs.

Tolerance: the vmapped program batches the same operations (each seed's matmuls
become one batched matmul), so only the rounding inside XLA's kernels may
differ. On an Intel Xeon the results were bitwise equal; on an AMD EPYC the
batched kernels differ in the last bit, which 25 steps grow to 2e-7 relative.
The test allows 1e-5 relative (and 1e-6 absolute for values near zero).
"""

import chex
import jax
import numpy as np
import pytest

from examples import many_seeds

NUM_SEEDS, NUM_STEPS = 3, 25
CONFIG = many_seeds.Config()


@pytest.fixture(scope="module")
def runs():
    keys = jax.random.split(jax.random.key(7), NUM_SEEDS)
    together = many_seeds.train_many_seeds(keys, CONFIG, NUM_STEPS)
    separate = [many_seeds.train_one_seed(key, CONFIG, NUM_STEPS) for key in keys]
    return together, separate


def test_vmapped_run_equals_separate_runs(runs):
    (states, losses), separate = runs
    chex.assert_shape(losses, (NUM_SEEDS, NUM_STEPS, CONFIG.num_tasks))
    for seed, (state, seed_losses) in enumerate(separate):
        chex.assert_trees_all_close(
            jax.tree.map(lambda a, seed=seed: a[seed], states), state, atol=1e-6, rtol=1e-5
        )
        chex.assert_trees_all_close(losses[seed], seed_losses, atol=1e-6, rtol=1e-5)


def test_seeds_are_distinct_runs_that_trained_famo(runs):
    (states, losses), _ = runs
    famo_state = states.famo_state
    np.testing.assert_array_equal(famo_state.num_updates, NUM_STEPS)
    logits = np.asarray(famo_state.logits)
    # Each seed has its own initialisation, data and FAMO logits.
    assert np.min(np.ptp(logits, axis=0)) > 1e-4
    assert np.min(np.ptp(np.asarray(states.params["heads"]), axis=0)) > 1e-3
    weights = np.asarray(famo_state.task_weights)
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)
    # Training made progress for every seed and task.
    assert np.all(np.asarray(losses[:, -5:].mean(1)) < np.asarray(losses[:, :5].mean(1)))


def test_main_runs(capsys):
    # Same shapes as the fixture's runs, so the compiled program is reused.
    args = ["--seeds", str(NUM_SEEDS), "--steps", str(NUM_STEPS)]
    states, losses = many_seeds.main(args)
    assert losses.shape == (NUM_SEEDS, NUM_STEPS, CONFIG.num_tasks)
    assert f"{NUM_SEEDS} seeds x {NUM_STEPS} steps" in capsys.readouterr().out
