"""Run by ``tests/test_multi_host.py``: one process of a job in which one process dies mid-run.

Not a test module. Every process joins the job (``examples/multi_host.py``'s
``join_job``, from the environment that ``launch_local`` sets), trains FAMO
for a few steps with the others, then process ``DYING`` exits abruptly (no
shutdown, no message to the others) and the others go on training, which needs
the dead process at the next cross-process reduction. JAX's health check must
then stop them: the test measures how long it takes.

Usage: ``python tests/_multi_host_fault.py DYING STEPS_BEFORE HEARTBEAT_TIMEOUT``.
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from examples import multi_host

    dying, steps_before, heartbeat_timeout = (int(a) for a in sys.argv[1:4])
    multi_host.join_job(
        initialization_timeout=60, heartbeat_timeout=heartbeat_timeout, shutdown_timeout=10
    )
    import jax

    config = multi_host.RunConfig(steps=10_000, methods=("famo",), styles=("jit",))
    mesh = multi_host.make_global_mesh()
    states = multi_host.train(multi_host.initial_states(config, mesh), config, mesh, steps_before)
    jax.block_until_ready(states)
    print(f"process {jax.process_index()}: trained {steps_before} steps", flush=True)
    if jax.process_index() == dying:
        os._exit(3)
    jax.block_until_ready(multi_host.train(states, config, mesh, config.steps))
    print(f"process {jax.process_index()}: finished without process {dying}", flush=True)


if __name__ == "__main__":
    main()
