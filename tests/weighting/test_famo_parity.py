"""FAMO matches the PyTorch reference (Algorithm 2 of the paper) at every step.

The fixtures in ``tests/reference/fixtures`` were produced by
``tests/reference/make_fixtures.py`` (see ``tests/reference/README.md``); this
module reads them with NumPy only, so torch is not needed here.

Every trajectory is 1,000 steps of the authors' protocol
``weigh(l_t) -> record -> update(l_t, l_{t+1}) -> record``, run in one jitted
``lax.scan`` (all configurations of one K and one precision share one compiled
program). Tolerances:

* float32: 1e-4, float64 (``jax.enable_x64``, ``logits_dtype=float64``): 1e-10.
* logits, weights ``softmax(logits)`` and the gradient of the weighted loss
  w.r.t. the losses are compared in **absolute** terms: weights and gradients lie
  on the simplex and the logits are O(1), so a relative test would only be
  ill-conditioned where a logit crosses zero.
* the weighted loss ``sum_i c z_i log D_i`` is compared **relative to the size
  of its terms** ``sum_i |c z_i log D_i|``: its scale follows the losses (which
  span six orders of magnitude) and the terms cancel (``log D`` changes sign), so
  neither a plain absolute nor a plain relative tolerance is meaningful, while
  the rounding error of the sum is bounded by a multiple of that size.
"""

from __future__ import annotations

import functools
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import famo_jax
from tests._compat import enable_x64

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "reference" / "fixtures"
NUM_STEPS = 1000
LEARNING_RATE = 0.025
GAMMAS = (0.0, 1e-3, 1e-2)
# Must mirror CONFIGS in tests/reference/make_fixtures.py (checked below).
FULL_GRID = tuple((gamma, nonzero) for nonzero in (False, True) for gamma in GAMMAS)
CONFIGS = {
    2: FULL_GRID,
    3: FULL_GRID,
    11: FULL_GRID,
    40: ((0.0, True), (1e-3, False), (1e-2, True)),
    100: ((0.0, False), (1e-3, True)),
}
PRECISIONS = {"f32": (jnp.float32, 1e-4), "f64": (jnp.float64, 1e-10)}
RECORDS = ("loss", "grad", "logits", "weights")


def _prefix(gamma: float, nonzero_min: bool) -> str:
    return f"{'m1' if nonzero_min else 'm0'}_g{GAMMAS.index(gamma)}"


@functools.cache
def _fixture(num_tasks: int) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / f"famo_k{num_tasks:03d}.npz") as data:
        return dict(data)


@functools.cache
def _jax_records(num_tasks: int, precision: str) -> dict[tuple[float, bool], dict]:
    """Runs every configuration of ``num_tasks`` in one jitted program of scans."""
    dtype, _ = PRECISIONS[precision]
    data = _fixture(num_tasks)
    # The x64 flag is scoped to tracing and running; only NumPy arrays leave.
    with enable_x64(precision == "f64"):
        weightings = {
            (gamma, nonzero): famo_jax.famo(
                num_tasks,
                learning_rate=LEARNING_RATE,
                gamma=gamma,
                min_losses=data[f"{'m1' if nonzero else 'm0'}_min_losses"],
                logits_dtype=dtype,
            )
            for gamma, nonzero in CONFIGS[num_tasks]
        }

        def trajectory(weighting, losses):
            def step(state, prev_and_curr):
                prev, curr = prev_and_curr
                loss, grad = jax.value_and_grad(weighting.weigh)(prev, state)
                state = weighting.update(prev, curr, state)
                return state, dict(
                    loss=loss, grad=grad, logits=state.logits, weights=state.task_weights
                )

            _, records = jax.lax.scan(step, weighting.init(), (losses[:-1], losses[1:]))
            return records

        @jax.jit
        def run_all(sequences):
            return {
                config: trajectory(weighting, sequences[config[1]])
                for config, weighting in weightings.items()
            }

        sequences = {
            nonzero: jnp.asarray(data[f"{'m1' if nonzero else 'm0'}_losses"], dtype)
            for nonzero in {nonzero for _, nonzero in CONFIGS[num_tasks]}
        }
        records = run_all(sequences)
        assert all(leaf.dtype == dtype for leaf in jax.tree.leaves(records)), (
            "the JAX run did not compute in the requested precision"
        )
        return jax.tree.map(lambda leaf: np.asarray(leaf, np.float64), records)


PARAMS = [
    pytest.param(
        k,
        gamma,
        nonzero,
        precision,
        id=f"K{k}-gamma{gamma:g}-{'m' if nonzero else 'zero_m'}-{precision}",
    )
    for k, configs in CONFIGS.items()
    for gamma, nonzero in configs
    for precision in PRECISIONS
]


@pytest.mark.parametrize("num_tasks,gamma,nonzero_min,precision", PARAMS)
def test_matches_pytorch_reference_at_every_step(num_tasks, gamma, nonzero_min, precision):
    _, tol = PRECISIONS[precision]
    data = _fixture(num_tasks)
    prefix = f"{_prefix(gamma, nonzero_min)}_{precision}"
    ref = {name: data[f"{prefix}_{name}"].astype(np.float64) for name in RECORDS}
    got = _jax_records(num_tasks, precision)[(gamma, nonzero_min)]

    chex.assert_shape(got["logits"], (NUM_STEPS, num_tasks))
    for name in ("logits", "weights", "grad"):
        chex.assert_trees_all_close(
            got[name], ref[name], atol=tol, rtol=0.0, custom_message=f"{name} ({prefix})"
        )

    # Size of the terms of sum_i c z_i log D_i; c z_i = grad_i * D_i.
    losses = data[f"{'m1' if nonzero_min else 'm0'}_losses"][:-1].astype(np.float64)
    mins = data[f"{'m1' if nonzero_min else 'm0'}_min_losses"].astype(np.float64)
    gaps = losses - mins + 1e-8
    size = np.sum(np.abs(ref["grad"] * gaps * np.log(gaps)), axis=-1)
    chex.assert_trees_all_close(
        got["loss"] / size,
        ref["loss"] / size,
        atol=tol,
        rtol=0.0,
        custom_message=f"weighted loss ({prefix})",
    )


def test_x64_does_not_leak():
    _jax_records(2, "f64")
    assert not jax.config.jax_enable_x64
    assert jnp.asarray(1.0).dtype == jnp.float32


@pytest.mark.parametrize("num_tasks", sorted(CONFIGS))
def test_fixtures_hold_the_documented_trajectories(num_tasks):
    data = _fixture(num_tasks)
    np.testing.assert_array_equal(data["gammas"], GAMMAS)
    assert float(data["learning_rate"]) == LEARNING_RATE
    expected = {
        f"{_prefix(gamma, nonzero)}_{precision}_{name}"
        for gamma, nonzero in CONFIGS[num_tasks]
        for precision in PRECISIONS
        for name in RECORDS
    }
    assert {key for key in data if key.count("_") == 3} == expected
    for key in expected:
        precision = key.split("_")[2]
        assert data[key].dtype == PRECISIONS[precision][0], key
        assert data[key].shape[0] == NUM_STEPS and np.all(np.isfinite(data[key])), key
    for mins in {_prefix(0.0, nonzero)[:2] for _, nonzero in CONFIGS[num_tasks]}:
        losses, bounds = data[f"{mins}_losses"], data[f"{mins}_min_losses"]
        assert losses.shape == (NUM_STEPS + 1, num_tasks) and losses.dtype == np.float32
        gaps = losses.astype(np.float64) - bounds
        assert np.all(gaps > 0)
        assert (mins == "m1") == bool(np.any(bounds != 0))
        # Initial scales span six orders of magnitude; the losses mostly
        # decrease, but increase at many single steps.
        assert gaps[0].max() / gaps[0].min() >= 0.99e6
        assert np.median(np.log(gaps[-1] / gaps[0])) < -1.0
        assert np.all(gaps[-1] < gaps[0] * 10)
        assert np.mean(np.diff(losses, axis=0) > 0) > 0.2
