"""Data-parallel FAMO (pmap, shard_map, sharded jit) equals one device on the same global batch.

The multi-device runs happen in a subprocess (``tests/_multidevice_check.py``)
started with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``: a JAX
process fixes its device count when it initialises, so setting the flag here
would either come too late or change the device count of every other test.

Tolerance. The data-parallel runs compute the same arithmetic as the
single-device run except for the order of the batch reduction (eight shard
means averaged by ``pmean`` versus one mean over the global batch), a
difference of an ulp or so per reduction that then goes through 20 steps of
Adam and FAMO. In float32 the deviations measured are below 1e-7 (values are
O(1)), in float64 below 1e-15; the test allows 1e-6 and 1e-13 (ten times or
more above what is measured, and far below the 1e-1 that a wrong weighting
produces: the control run, FAMO without ``axis_name`` inside ``pmap``, where each
replica weighs its own shard's losses, must miss by more than 1e-3).
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests import registry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 20
TOLERANCE = {"float32": 1e-6, "float64": 1e-13}


@pytest.fixture(scope="module")
def multidevice_report():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    completed = subprocess.run(
        [sys.executable, os.path.join(REPO, "tests", "_multidevice_check.py"), str(NUM_STEPS)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    # The example's main prints its comparison (float32 run), then the helper its JSON.
    assert "largest |difference| from the single-device run" in completed.stdout
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_subprocess_sees_eight_devices_and_this_process_is_unchanged(multidevice_report):
    assert multidevice_report["device_count"] == 8
    # The flag was given to the child only.
    assert "xla_force_host_platform_device_count=8" not in os.environ.get("XLA_FLAGS", "")
    assert jax.device_count() == len(jax.devices())


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("style", ["pmap", "shard_map", "jit"])
def test_data_parallel_equals_single_device(multidevice_report, style, dtype):
    deviations = multidevice_report[dtype][style]
    assert set(deviations) >= {"params", "famo_state", "opt_state", "weighted_loss"}
    for what, deviation in deviations.items():
        assert deviation <= TOLERANCE[dtype], (style, dtype, what, deviation)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_pmap_replicas_hold_identical_state(multidevice_report, dtype):
    # Every replica applies the same averaged updates: the states agree exactly.
    assert multidevice_report[dtype]["pmap"]["replicas"] == 0.0


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_single_device_reference_trained_famo(multidevice_report, dtype):
    single = multidevice_report[dtype]["single"]
    assert single["num_updates"] == NUM_STEPS
    weights = np.asarray(single["final_task_weights"])
    np.testing.assert_allclose(weights.sum(), 1.0, rtol=1e-6)
    # The weights moved away from uniform, so the comparison covers FAMO's update.
    assert np.ptp(weights) > 0.05


@pytest.mark.parametrize("case", [c.name for c in registry.WEIGHTINGS if c.axis_name], ids=str)
@pytest.mark.parametrize("style", ["pmap", "shard_map", "jit"])
def test_every_weighting_with_axis_name_equals_single_device(multidevice_report, case, style):
    deviations = multidevice_report["registry"][case][style]
    for what, deviation in deviations.items():
        assert deviation <= TOLERANCE["float32"], (case, style, what, deviation)
    assert multidevice_report["registry"][case]["single"]["num_updates"] == NUM_STEPS


def test_control_without_axis_name_differs(multidevice_report):
    control = multidevice_report["control_without_axis_name"]
    assert control["params"] > 1e-3 and control["logits"] > 1e-3


def test_split_batch_rejects_uneven_shards():
    from examples import data_parallel

    batch = data_parallel.make_batch(jax.random.key(0), 10, 4, 2)
    with pytest.raises(ValueError, match="multiple of the number of devices"):
        data_parallel.split_batch(batch, 8)
