r"""SDMGrad against LibMTL's and TorchJD's own code.

Fixtures: ``tests/reference/make_breadth_b_fixtures.py`` (LibMTL at 4336804,
TorchJD 0.18, float64): three batches per step (the direction's and two for the
weights), six steps with the weights carried, k in 2, 3, 5, 10 and 24; the
``same_batch`` cases (three equal batches) replay the single-batch fallback.

LibMTL's inner step is fixed at 5 (TorchJD's default, and the authors', is
10): beyond the heavy-ball's stability limit for the normalised matrix, so the
inner iterates bounce between faces of the simplex and amplify rounding: in
float32 one update is up to 1.5e-3 away from LibMTL's float64 one, and a
float64 trajectory drifts from LibMTL's by up to 0.24 (k = 24) over six
updates. Those configurations are replayed one update at a time from the
peer's own previous weights, in float64 (bound 1e-10 of the step's scale;
seen 9e-12 for LibMTL's default, 4e-15 for its 5-iteration configuration,
1.2e-11 for TorchJD's ``lr=10``). Where the inner iteration converges
(TorchJD with ``lr=0.5``), the whole trajectory is replayed: float32 1e-5
(seen 1.2e-7), float64 1e-10 (seen 2e-16).
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import famo_jax
from tests.aggregation import _breadth_b_fixtures as fixtures


@functools.cache
def jitted(k, lamda, num_iters, learning_rate):
    tx = famo_jax.sdmgrad(k, lamda=lamda, num_iters=num_iters, learning_rate=learning_rate)
    return tx, jax.jit(tx.update)


def transformation(peer, config, k):
    hyper = fixtures.load(peer, "sdmgrad")[0][config]
    return jitted(k, hyper["lamda"], hyper["num_iters"], hyper.get("learning_rate", 5.0))


def check_trajectory(peer, config, dtype, rtol):
    _, cases = fixtures.load(peer, "sdmgrad")
    for case in fixtures.case_names(peer, "sdmgrad", config):
        arrays = cases[(config, case)]
        tx, update = transformation(peer, config, arrays["grads"].shape[2])
        steps = fixtures.three_batch_steps(
            arrays, "sdmgrad", dtype, batches=not case.startswith("same_batch")
        )
        outputs, states = fixtures.replay(tx, update, steps, dtype)
        scales = fixtures.step_scales(arrays["grads"])
        fixtures.assert_steps_close(outputs, arrays["output"], rtol, scales, case)
        weights = np.stack([np.asarray(s.weights) for s in states])
        reference = arrays["weights" if peer == "libmtl" else "state_weights"]
        np.testing.assert_allclose(weights, reference, rtol=0, atol=rtol, err_msg=case)


def check_one_update_at_a_time(peer, config, rtol):
    """Each update from the peer's previous weights (its own trajectory)."""
    _, cases = fixtures.load(peer, "sdmgrad")
    with jax.enable_x64(True):
        for case in fixtures.case_names(peer, "sdmgrad", config):
            arrays = cases[(config, case)]
            tx, update = transformation(peer, config, arrays["grads"].shape[2])
            steps = fixtures.three_batch_steps(
                arrays, "sdmgrad", jnp.float64, batches=not case.startswith("same_batch")
            )
            reference = arrays["weights" if peer == "libmtl" else "state_weights"]
            scales = fixtures.step_scales(arrays["grads"])
            for t, step in enumerate(steps):
                state = fixtures.initial_state(tx, jnp.float64)
                if t > 0:
                    state = state._replace(weights=jnp.asarray(reference[t - 1]))
                outputs, states = fixtures.replay(tx, update, [step], jnp.float64, state)
                fixtures.assert_steps_close(
                    outputs, arrays["output"][t : t + 1], rtol, scales[t : t + 1], f"{case} {t}"
                )
                np.testing.assert_allclose(states[0].weights, reference[t], rtol=0, atol=rtol)


@pytest.mark.parametrize("config", ["default", "lamda1"])
def test_sdmgrad_matches_libmtl_one_update_at_a_time(config):
    check_one_update_at_a_time("libmtl", config, 1e-10)


def test_sdmgrad_matches_torchjd_lr10_one_update_at_a_time():
    check_one_update_at_a_time("torchjd", "lr10", 1e-10)


def test_sdmgrad_matches_torchjd_lr05_in_float32():
    check_trajectory("torchjd", "lr0.5", jnp.float32, 1e-5)


def test_sdmgrad_matches_torchjd_lr05_in_float64():
    with jax.enable_x64(True):
        check_trajectory("torchjd", "lr0.5", jnp.float64, 1e-10)


def test_sdmgrad_weight_batches_inside_shared_trunk_are_the_full_parameters():
    """Full-model batches through optax.chain: only the trunk's leaves are used."""
    rng = np.random.default_rng(0)
    params = {"trunk": jnp.zeros(3), "heads": jnp.zeros((2, 2))}

    def stacked():
        return jax.tree.map(lambda p: jnp.asarray(rng.standard_normal((2,) + p.shape)), params)

    grads, first, second = stacked(), stacked(), stacked()
    chained = optax.chain(
        famo_jax.shared_trunk(famo_jax.sdmgrad(2), {"trunk": True, "heads": False}),
        optax.sgd(1.0),
    )
    updates, _ = chained.update(grads, chained.init(params), params, weight_batches=(first, second))
    alone = famo_jax.sdmgrad(2)
    trunk, _ = alone.update(
        grads["trunk"], alone.init(None), weight_batches=(first["trunk"], second["trunk"])
    )
    chex.assert_trees_all_close(updates["trunk"], -trunk, rtol=1e-6)


def test_sdmgrad_single_batch_fallback_is_the_gram_of_the_direction_batch():
    grads = jnp.asarray(np.random.default_rng(1).standard_normal((3, 4)))
    tx = famo_jax.sdmgrad(3)
    fallback = tx.update(grads, tx.init(None))
    explicit = tx.update(grads, tx.init(None), weight_batches=(grads, grads))
    chex.assert_trees_all_close(fallback, explicit, rtol=1e-6)


def test_sdmgrad_weights_stay_on_the_simplex_and_lamda_pulls_to_the_mean():
    grads = jnp.asarray(np.random.default_rng(2).standard_normal((4, 6)))
    for lamda in (0.0, 0.3, 1e6):
        tx = famo_jax.sdmgrad(4, lamda=lamda)
        out, state = tx.update(grads, tx.init(None))
        assert np.all(np.asarray(state.weights) >= 0)
        np.testing.assert_allclose(np.sum(state.weights), 1.0, rtol=1e-6)
    np.testing.assert_allclose(out, jnp.mean(grads, axis=0), rtol=1e-5)


def test_sdmgrad_rejects_what_it_cannot_use():
    with pytest.raises(ValueError, match="momentum"):
        famo_jax.sdmgrad(2, momentum=1.0)
    with pytest.raises(ValueError, match="learning_rate"):
        famo_jax.sdmgrad(2, learning_rate=0.0)
    tx = famo_jax.sdmgrad(2)
    grads = jnp.ones((2, 3))
    with pytest.raises(TypeError, match="weight_batches must be a pair"):
        tx.update(grads, tx.init(None), weight_batches=grads)
    with pytest.raises(ValueError, match="weight_batches\\[1\\]"):
        tx.update(grads, tx.init(None), weight_batches=(grads, jnp.ones((2, 4))))
    with pytest.raises(ValueError, match="num_tasks=2"):
        tx.update(jnp.ones((3, 3)), tx.init(None))
