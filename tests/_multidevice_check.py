"""Run by ``tests/test_data_parallel.py`` in a subprocess with 8 simulated CPU devices.

Not a test module (pytest does not collect it): the device count of a JAX
process is fixed when JAX initialises, so the multi-device runs need their own
process, started with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``.
Trains the example's multi-head model with every data-parallel style and on
one device, in float32 and float64, plus a deliberately wrong control (FAMO
without ``axis_name`` inside ``pmap``: each replica weighs its own shard's
losses), and prints the largest deviations as one JSON object on stdout.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, repo)

    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import optax

    import famo_jax
    from examples import data_parallel as dp

    num_steps, num_tasks = int(sys.argv[1]), 3
    result = {"device_count": jax.device_count()}
    # float32 through the example's command line (what the README runs), with a
    # positive gamma so that every part of the update is exercised.
    args = ["--steps", str(num_steps), "--batch-size", "64", "--gamma", "0.01"]
    result["float32"] = dp.main(args)
    # float64, also with a per-task min_losses.
    result["float64"] = dp.compare_styles(
        num_steps=num_steps,
        num_tasks=num_tasks,
        dtype=jnp.float64,
        gamma=0.01,
        min_losses=[0.0, 1e-3, 0.0],
        logits_dtype=jnp.float64,
    )

    # Control: per-replica FAMO weights (no axis_name) inside the same pmap step.
    key_params, key_batch = jax.random.split(jax.random.key(0))
    params = dp.init_params(key_params, 8, 16, num_tasks)
    batch = dp.make_batch(key_batch, 64, 8, num_tasks)
    optimizer = optax.adam(1e-2)
    local_weighting = famo_jax.famo(num_tasks, gamma=0.01)
    state = dp.init_train_state(params, local_weighting, optimizer)
    reference, _ = dp.train_single_device(
        state, batch, num_steps, num_tasks=num_tasks, optimizer=optimizer, gamma=0.01
    )
    step = dp.make_train_step(local_weighting, optimizer, axis_name=dp.AXIS)
    replicated, _ = jax.pmap(dp._scan_steps(step, num_steps), dp.AXIS, in_axes=(None, 0))(
        state, dp.split_batch(batch, jax.device_count())
    )
    result["control_without_axis_name"] = {
        "params": dp.max_abs_difference(
            jax.tree.map(lambda a: a[0], replicated.params), reference.params
        ),
        "logits": dp.max_abs_difference(
            replicated.famo_state.logits[0], reference.famo_state.logits
        ),
    }
    # Every loss weighting of the test registry that takes axis_name, the same way.
    from tests import registry

    result["registry"] = {
        case.name: dp.compare_styles(
            num_steps=num_steps,
            num_tasks=num_tasks,
            factory=lambda k, axis_name=None, case=case: case.build_with_axis_name(k, axis_name),
        )
        for case in registry.WEIGHTINGS
        if case.axis_name
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
