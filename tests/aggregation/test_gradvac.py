r"""GradVac against LibMTL's and TorchJD's own code, with their task orders replayed.

Fixtures: ``tests/reference/make_breadth_b_fixtures.py`` (LibMTL at 4336804,
TorchJD 0.18, both run in float64), six steps per case with the targets
carried, for k in 2, 3, 5, 10 and 24. Bounds, relative to each step's largest
input or output entry (targets: absolute), and the errors seen:

- float64: 1e-10 for both algorithms (seen: ``"vectors"`` 1.1e-12 against
  LibMTL for all three groupings, ``"gram"`` 3.4e-12 against LibMTL and
  6.1e-12 against TorchJD, from the Gram matrix alone).
- float32, LibMTL's default (whole model): ``"gram"`` 1e-5 (seen 1.4e-6).
- float32, per leaf (2 to 6 entries, up to 24 tasks): ``"vectors"`` 1e-5 for
  the outputs (seen 2.5e-6), 1e-4 for the targets (seen 6.9e-5: cosines of
  the corrected 2-to-6-entry vectors).
- The degenerate sequences only in float64: their exactly opposite gradients
  make :math:`\sqrt{1 - \phi^2}` ill-conditioned (the cosine is :math:`-1 +
  10^{-9}`), so that LibMTL's own algorithm run in float32 NumPy is 8e-3 away
  from its float64 run.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import famo_jax
from famo_jax import aggregation
from tests.aggregation import _breadth_b_fixtures as fixtures

GRANULARITY = {0: "whole_model", 1: "all_layer", 2: "all_matrix"}
LIBMTL_CONFIGS = ["beta0.5_whole", "beta0.5_layer", "beta0.1_matrix"]


@functools.cache
def jitted(k, beta, granularity, algorithm="gram", implicit=False):
    tx = famo_jax.gradvac(k, beta=beta, granularity=granularity, algorithm=algorithm)
    if not implicit:
        return tx, jax.jit(tx.update)

    def update(grads, state, **kwargs):
        gradients = aggregation.ImplicitTaskGradients(
            gram=aggregation.gram_matrix(grads),
            combine=functools.partial(aggregation.combine, grads),
        )
        return tx.update(gradients, state, **kwargs)

    return tx, jax.jit(update)


def replay_case(arrays, k, beta, granularity, dtype, algorithm="gram", implicit=False):
    tx, update = jitted(k, beta, granularity, algorithm, implicit)
    steps = [
        {"grads": arrays["grads"][t], "task_orders": jnp.asarray(arrays["orders"][t], jnp.int32)}
        for t in range(len(arrays["grads"]))
    ]
    return fixtures.replay(tx, update, steps, dtype)


def check_libmtl(config, algorithm, dtype, rtol, *, skip_degenerate, targets_atol=None):
    configs, cases = fixtures.load("libmtl", "gradvac")
    beta, granularity = configs[config]["beta"], GRANULARITY[configs[config]["group_type"]]
    checked = 0
    for case in fixtures.case_names("libmtl", "gradvac", config):
        if skip_degenerate and case.startswith("degenerate"):
            continue
        arrays = cases[(config, case)]
        k = arrays["grads"].shape[1]
        outputs, states = replay_case(arrays, k, beta, granularity, dtype, algorithm)
        scales = fixtures.step_scales(arrays["grads"])
        # LibMTL sums the corrected gradients: k times the mean.
        fixtures.assert_steps_close(k * outputs, arrays["output"], rtol, scales, case)
        targets = np.stack([np.asarray(s.cosine_targets, np.float64) for s in states])
        np.testing.assert_allclose(
            targets, arrays["cosine_targets"], rtol=0, atol=targets_atol or rtol, err_msg=case
        )
        checked += 1
    assert checked >= 13


def test_gradvac_gram_matches_libmtl_in_float32():
    check_libmtl("beta0.5_whole", "gram", jnp.float32, 1e-5, skip_degenerate=True)


def test_gradvac_vectors_match_libmtl_in_float32_on_small_leaves():
    # Per leaf (leaves of 2 to 6 entries, up to 24 tasks): the outputs within
    # 1e-5; the targets are cosines of the corrected 2-to-6-entry vectors.
    check_libmtl(
        "beta0.1_matrix", "vectors", jnp.float32, 1e-5, skip_degenerate=True, targets_atol=1e-4
    )


@pytest.mark.parametrize("config", LIBMTL_CONFIGS)
def test_gradvac_vectors_match_libmtl_in_float64(config):
    with jax.enable_x64(True):
        check_libmtl(config, "vectors", jnp.float64, 1e-10, skip_degenerate=False)


def test_gradvac_gram_matches_libmtl_in_float64():
    with jax.enable_x64(True):
        check_libmtl("beta0.5_whole", "gram", jnp.float64, 1e-10, skip_degenerate=False)


def test_gradvac_on_implicit_gradients_matches_torchjd_in_float64():
    """TorchJD works in Gram-coefficient space, from the Gram matrix alone."""
    configs, cases = fixtures.load("torchjd", "gradvac")
    beta = configs["beta0.5"]["beta"]
    with jax.enable_x64(True):
        for case in fixtures.case_names("torchjd", "gradvac", "beta0.5"):
            arrays = cases[("beta0.5", case)]
            k = arrays["grads"].shape[1]
            outputs, _ = replay_case(
                arrays, k, beta, "whole_model", jnp.float64, "gram", implicit=True
            )
            scales = fixtures.step_scales(arrays["grads"])
            fixtures.assert_steps_close(k * outputs, arrays["output"], 1e-10, scales, case)


def test_gradvac_weights_on_the_gram_matrix_equal_the_vector_space_algorithm():
    grads = np.random.default_rng(0).standard_normal((4, 7))
    grads[1] -= 2.0 * grads[0]  # conflicting
    targets = np.full((4, 4), 0.3) - 0.3 * np.eye(4)
    orders = np.array([[1, 2, 3], [3, 0, 2], [0, 1, 3], [2, 1, 0]])
    with jax.enable_x64(True):
        weights, new_targets = aggregation.gradvac_weights(
            jnp.asarray(grads @ grads.T), jnp.asarray(targets), jnp.asarray(orders), beta=0.25
        )
        out, state = famo_jax.gradvac(4, beta=0.25, algorithm="vectors").update(
            jnp.asarray(grads),
            famo_jax.GradVacState(
                cosine_targets=jnp.asarray(targets)[None],
                key=jax.random.PRNGKey(0),
                num_updates=jnp.zeros((), jnp.int32),
                num_skipped=jnp.zeros((), jnp.int32),
            ),
            task_orders=jnp.asarray(orders),
        )
    np.testing.assert_allclose(np.asarray(weights) @ grads, out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(new_targets, state.cosine_targets[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("algorithm", ["gram", "vectors"])
def test_gradvac_groups_follow_the_pytree_nodes(algorithm):
    """all_layer: one group per node holding leaves (a Flax layer); all_matrix: per leaf."""
    params = {"dense": {"bias": jnp.zeros(2), "kernel": jnp.zeros((2, 2))}, "scale": jnp.zeros(3)}
    assert famo_jax.gradvac(3, granularity="all_layer").init(params).cosine_targets.shape == (
        2,
        3,
        3,
    )
    assert famo_jax.gradvac(3, granularity="all_matrix").init(params).cosine_targets.shape == (
        3,
        3,
        3,
    )
    # A group's correction uses only its own leaves: each group equals a separate run.
    rng = np.random.default_rng(1)
    grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal((3,) + p.shape)), params)
    orders = jnp.array([[1, 2], [2, 0], [0, 1]])
    tx = famo_jax.gradvac(3, granularity="all_layer", algorithm=algorithm)
    out, _ = tx.update(grads, tx.init(params), task_orders=orders)
    whole = famo_jax.gradvac(3, algorithm=algorithm)
    dense_out, _ = whole.update(grads["dense"], whole.init(None), task_orders=orders)
    scale_out, _ = whole.update(grads["scale"], whole.init(None), task_orders=orders)
    chex.assert_trees_all_close(out, {"dense": dense_out, "scale": scale_out}, rtol=1e-5, atol=1e-6)


def test_gradvac_draws_a_fresh_order_per_task_and_update_from_its_key():
    orders = [np.asarray(aggregation.gradvac_orders(jax.random.PRNGKey(s), 5)) for s in range(20)]
    for drawn in orders:
        for task, row in enumerate(drawn):
            assert sorted(row) == [j for j in range(5) if j != task]
    assert len({tuple(map(tuple, drawn)) for drawn in orders}) > 15
    tx = famo_jax.gradvac(3, seed=4)
    grads = jnp.asarray(np.random.default_rng(2).standard_normal((3, 5)))
    first = tx.update(grads, tx.init(None))
    again = tx.update(grads, tx.init(None))
    chex.assert_trees_all_equal(first, again)
    assert not np.array_equal(first[1].key, tx.init(None).key)


def test_gradvac_rejects_what_it_cannot_use():
    with pytest.raises(ValueError, match="beta must lie in"):
        famo_jax.gradvac(2, beta=1.5)
    with pytest.raises(ValueError, match="granularity"):
        famo_jax.gradvac(2, granularity="per_neuron")
    with pytest.raises(ValueError, match="algorithm"):
        famo_jax.gradvac(2, algorithm="exact")
    with pytest.raises(ValueError, match="init\\(params\\)"):
        famo_jax.gradvac(2, granularity="all_matrix").init(None)
    tx = famo_jax.gradvac(2, granularity="all_matrix")
    implicit = aggregation.ImplicitTaskGradients(gram=jnp.eye(2), combine=lambda w: w)
    with pytest.raises(TypeError, match="ImplicitTaskGradients"):
        tx.update(implicit, tx.init({"w": jnp.zeros(2)}))
    vectors = famo_jax.gradvac(2, algorithm="vectors")
    with pytest.raises(TypeError, match="ImplicitTaskGradients"):
        vectors.update(implicit, vectors.init(None))
    whole = famo_jax.gradvac(3)
    with pytest.raises(ValueError, match="task_orders"):
        whole.update(jnp.ones((3, 2)), whole.init(None), task_orders=jnp.zeros((3, 3), jnp.int32))
    with pytest.raises(ValueError, match="num_tasks=3"):
        whole.update(jnp.ones((2, 2)), whole.init(None))
