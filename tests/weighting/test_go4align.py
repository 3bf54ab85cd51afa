"""GO4Align matches the authors' ``GO4ALIGN`` step by step, and its grouping is k-means.

Fixtures: ``tests/reference/fixtures/breadth_c/go4align.npz``: the authors'
``methods/cluster_methods.py::GO4ALIGN`` with ``kmeans_pytorch`` 0.3 for 40
steps with its state carried, k = 2..40, 1, 2, 3 and k groups, robust step
sizes 1e-4 (the authors') and 1e-2 (where the probabilities cannot underflow),
random, badly scaled (1e-3..1e3), spiking and dominated losses (no tied ones:
the peer's k-means loops forever when a group is left empty, see the script).
In float32 only: ``kmeans_pytorch`` computes in float32.

- ``init = "spread"`` cases start the peer's k-means from famo_jax's
  deterministic initial centres (the one change to the peer's run): the whole
  method is compared, weights ``k * d weigh / d l`` (the authors' sum
  convention), values ``k * weigh``, and probabilities ``exp(log_probs)``
  against ``adv_probs``, to 1e-5 relative.
- ``init = "random"`` cases keep the peer's random draw: the grouping alone
  (:func:`famo_jax.weighting.go4align_groups` from the recorded indicators and
  initial centres) must give the peer's weights, to 1e-5.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import famo_jax
from famo_jax.weighting import go4align_groups
from tests.weighting import _breadth_c_replay as fixtures

RTOL = 1e-5
CASES, _ = fixtures.load("go4align")
SPREAD = fixtures.configurations("go4align", ("k", "num_groups", "robust_step_size", "init"))


def record(value, grad, state):
    return value, grad, jnp.exp(state.log_probs)


@pytest.mark.parametrize(
    "config",
    sorted(config for config in SPREAD if config[3] == "spread"),
    ids=lambda c: "k{}_g{}_eta{}".format(*c[:3]),
)
def test_go4align_matches_the_authors_code(config):
    k, num_groups, step_size, _ = config
    _, arrays = fixtures.load("go4align")
    names = SPREAD[config]
    losses = np.stack([arrays[f"{name}/losses"] for name in names])
    weighting = famo_jax.go4align(k, num_groups, robust_step_size=step_size, eps=0.0)
    values, grads, probs = fixtures.replay(weighting, losses, "f32", record)
    for b, name in enumerate(names):
        reference = {key: arrays[f"{name}/{key}_f32"] for key in ("value", "grad", "adv_probs")}
        fixtures.assert_close(k * grads[b], reference["grad"], RTOL, what=f"{name} weights")
        fixtures.assert_close(
            k * values[b][:, None], reference["value"][:, None], RTOL, what=f"{name} value"
        )
        fixtures.assert_close(probs[b], reference["adv_probs"], RTOL, what=f"{name} probs")
        # The weights the authors return are the gradient: the loss is linear in them.
        fixtures.assert_close(
            reference["grad"], arrays[f"{name}/weights_f32"], 1e-6, what=f"{name} returned"
        )


RANDOM = {}
for _name, _params in CASES.items():
    if _params["init"] == "random":
        RANDOM.setdefault((_params["k"], _params["num_groups"]), []).append(_name)


@pytest.mark.parametrize("config", sorted(RANDOM), ids=lambda c: "k{}_g{}".format(*c))
def test_go4align_grouping_replays_the_authors_random_kmeans(config):
    k, num_groups = config
    _, arrays = fixtures.load("go4align")
    groups_of = jax.jit(
        jax.vmap(lambda x, c: go4align_groups(x, num_groups, initial_centers=c)),
    )
    for name in RANDOM[config]:
        indicators = arrays[f"{name}/indicators_f32"]
        groups, centers = groups_of(indicators, arrays[f"{name}/initial_centers_f32"])
        weights = np.take_along_axis(np.asarray(centers), np.asarray(groups), axis=1)
        fixtures.assert_close(weights, arrays[f"{name}/weights_f32"], RTOL, what=name)


def test_go4align_groups_are_contiguous_and_preserve_the_sum():
    values = jnp.asarray(np.random.default_rng(0).lognormal(0.0, 2.0, 50), jnp.float32)
    groups, centers = jax.jit(lambda v: go4align_groups(v, 5))(values)
    order = np.argsort(np.asarray(values))
    assert np.all(np.diff(np.asarray(groups)[order]) >= 0)  # intervals, in centre order
    np.testing.assert_allclose(np.sum(np.asarray(centers)[groups]), np.sum(values), rtol=1e-5)
    # A fixed point of Lloyd's iteration: every task is nearest its own centre.
    distances = np.abs(np.asarray(values)[:, None] - np.asarray(centers)[None])
    assert np.all(np.argmin(distances, axis=1) == np.asarray(groups))


def test_go4align_groups_handle_ties_and_one_group_per_task():
    tied = jnp.array([2.0, 2.0, 2.0, 2.0])
    groups, centers = go4align_groups(tied, 3)  # all centres start equal: two stay empty
    np.testing.assert_array_equal(groups, [0, 0, 0, 0])
    np.testing.assert_allclose(centers, [2.0, 2.0, 2.0])
    values = jnp.array([3.0, 1.0, 2.0])
    groups, centers = go4align_groups(values, 3)
    np.testing.assert_allclose(np.asarray(centers)[groups], values)


def test_go4align_groups_survive_the_input_on_which_the_authors_kmeans_hangs():
    """Indicators met while making the fixtures (k = 10, 3 groups): from these centres
    Lloyd's second iteration leaves the middle group empty; kmeans_pytorch 0.3 then
    makes its centre NaN and never returns. Here the empty group keeps its centre."""
    indicators = jnp.array(
        [31.090591, 0.079642, 1.671924, 131.26117, 2354.6309, 1.148687, 1906.3303, 8.551560,
         4131.6938, 6.173908]
    )  # fmt: skip
    start = jnp.array([0.079642, 8.551560, 4131.6938])
    groups, centers = go4align_groups(indicators, 3, initial_centers=start)
    assert np.all(np.isfinite(centers))
    distances = np.abs(np.asarray(indicators)[:, None] - np.asarray(centers)[None])
    assert np.all(np.argmin(distances, axis=1) == np.asarray(groups))  # a fixed point
    np.testing.assert_allclose(np.sum(np.asarray(centers)[groups]), np.sum(indicators), rtol=1e-6)


def test_go4align_is_linear_scalarization_for_equal_losses_and_one_group():
    weighting = famo_jax.go4align(4, 1)
    losses = jnp.full((4,), 0.7)
    np.testing.assert_allclose(famo_jax.loss_weights(weighting, losses, weighting.init()), 0.25)


def test_go4align_probabilities_cannot_underflow():
    weighting = famo_jax.go4align(3, 2, robust_step_size=1.0)
    losses = jnp.array([100.0, 200.0, 400.0])  # exp(-100) and below underflow float32
    step = jax.jit(lambda s: weighting.update(losses, losses, s))
    state = weighting.init()
    for _ in range(3):
        state = step(state)
    assert np.all(np.isfinite(state.log_probs)) and int(state.num_skipped) == 0
    np.testing.assert_allclose(jax.nn.logsumexp(state.log_probs), 0.0, atol=1e-6)
    assert np.all(np.isfinite(famo_jax.loss_weights(weighting, losses, state)))


@pytest.mark.parametrize(
    "args, kwargs, pattern",
    [
        ((3, 0), {}, "num_groups"),
        ((3, 4), {}, "num_groups"),
        ((3, 2), {"robust_step_size": -1.0}, "robust_step_size"),
        ((3, 2), {"eps": -1.0}, "eps"),
        ((3, 2), {"num_iterations": 0}, "num_iterations"),
    ],
)
def test_go4align_rejects_bad_hyperparameters(args, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        famo_jax.go4align(*args, **kwargs)
