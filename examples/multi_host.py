"""Data-parallel FAMO and gradient aggregators across processes with ``jax.distributed``.

One process per host (here: several local CPU processes) joins one JAX job with
:func:`jax.distributed.initialize`; the devices of all processes form one
global mesh, every process feeds its own rows of each global batch, and every
process runs the same program. Every process then holds the same parameters,
optimizer state and FAMO state, equal (to float32 rounding) to a one-device
run on the global batch. The methods: FAMO with the authors' same-batch update
and with the lagged update, CAGrad and MGDA on the shared trunk
(``famo_jax.shared_trunk`` over ``famo_jax.task_gradients``).

Two styles, as on one host (``examples/data_parallel.py``):

- ``jit`` (the one most users need): the single-device training step, unchanged,
  under ``jax.jit`` over global arrays: the batch sharded along the mesh axis,
  the training state replicated. No ``axis_name``; XLA inserts the
  cross-process reductions.
- ``shard_map``: a per-device step under :func:`jax.shard_map`, with
  ``famo(..., axis_name="data")``; ``pmean`` reduces across all devices of all
  processes.

One machine, four local processes with two CPU devices each (this file starts
the processes, ``launch_local``)::

    python examples/multi_host.py --local-processes 4 --devices-per-process 2

Or start the processes yourself, one per terminal or host, with the same
coordinator (process 0's address and a free port) and each its own id::

    export JAX_COORDINATOR_ADDRESS=10.0.0.1:12345 JAX_NUM_PROCESSES=2
    JAX_PROCESS_ID=0 python examples/multi_host.py   # on 10.0.0.1
    JAX_PROCESS_ID=1 python examples/multi_host.py   # on the second host

``JAX_COORDINATOR_ADDRESS`` is read by ``jax.distributed.initialize`` itself;
``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` by :func:`join_job`. Under SLURM
leave them unset: ``jax.distributed.initialize()`` takes the coordinator
(first node of the step, a port derived from the job id), the process count
and the id from ``srun``'s environment::

    srun --nodes=2 --ntasks-per-node=1 python examples/multi_host.py

Checkpoints (orbax) are written collectively by all processes into a shared
directory, and restore into any number of processes (the training state is
replicated, so each restores the full arrays): ``--checkpoint-dir DIR
--checkpoint-step N`` saves after step ``N``; ``--resume`` continues from the
latest checkpoint in ``DIR``.

Failures: a process that dies makes the JAX distributed service stop the others
within about ``--heartbeat-timeout`` seconds (they abort with "Terminating
process because the JAX distributed service detected fatal errors"); a
coordinator that cannot be reached within ``--initialization-timeout`` seconds
raises :class:`CoordinatorUnreachableError`; ``launch_local`` kills whatever is
left after its own ``timeout``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import faulthandler
import functools
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import famo_jax

if __package__:
    from . import data_parallel
else:  # run as a script: this file's directory is on sys.path
    import data_parallel

AXIS = "data"
STYLES = ("jit", "shard_map")
METHODS = ("famo", "famo_lagged", "cagrad", "mgda")

# jax.distributed.initialize reads JAX_COORDINATOR_ADDRESS itself; the other two
# are read by join_job (jax takes them only as arguments or from a cluster
# environment such as SLURM's).
ENV_COORDINATOR_ADDRESS = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"

# --- joining a job -----------------------------------------------------------------------------


class CoordinatorUnreachableError(ConnectionError):
    """The JAX coordinator (process 0's service) did not accept a connection in time."""


def wait_for_coordinator(address: str, timeout: float, *, process_id: int | None = None) -> None:
    """Returns once a TCP connection to ``address`` (``host:port``) succeeds.

    ``jax.distributed.initialize`` retries for its ``initialization_timeout``
    too, but then aborts the whole process with a message that blames "another
    task"; checking first turns an unreachable coordinator into a Python
    exception that says what is wrong.

    Raises:
      CoordinatorUnreachableError: if no connection succeeded within ``timeout`` seconds.
    """
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    deadline = time.monotonic() + timeout
    last_error: OSError | None = None
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=min(5.0, timeout)):
                return
        except OSError as error:
            last_error = error
        if time.monotonic() >= deadline:
            who = "this process" if process_id is None else f"process {process_id}"
            raise CoordinatorUnreachableError(
                f"{who} could not reach the JAX coordinator at {address} within {timeout:g} s "
                f"({last_error}). Is process 0 running, and is {address} its address as seen "
                f"from this host, with the port open?"
            )
        time.sleep(0.2)


def join_job(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    initialization_timeout: int = 120,
    heartbeat_timeout: int = 30,
    shutdown_timeout: int = 60,
) -> bool:
    """Joins a multi-process JAX job; returns False (and does nothing) for a one-process run.

    Must run before anything touches a JAX device. The arguments default to the
    environment: ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
    ``JAX_PROCESS_ID``; without them, a SLURM step of more than one task is
    detected by ``jax.distributed.initialize`` itself. CPU collectives go
    through gloo (the setting matters only for the CPU backend).

    Args:
      coordinator_address: ``host:port`` of process 0, where it runs the
        coordination service.
      num_processes: the number of processes in the job.
      process_id: this process's id, in ``range(num_processes)``.
      initialization_timeout: seconds to wait for the coordinator and for all
        processes to join.
      heartbeat_timeout: seconds without a heartbeat after which a process
        counts as dead and the service stops the others.
      shutdown_timeout: seconds a finishing process waits for the others at exit.

    Raises:
      CoordinatorUnreachableError: if the coordinator does not answer in time.
      ValueError: if only some of the three settings are given.
    """
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR_ADDRESS)
    if num_processes is None and os.environ.get(ENV_NUM_PROCESSES):
        num_processes = int(os.environ[ENV_NUM_PROCESSES])
    if process_id is None and os.environ.get(ENV_PROCESS_ID):
        process_id = int(os.environ[ENV_PROCESS_ID])
    timeouts = dict(
        initialization_timeout=initialization_timeout,
        heartbeat_timeout_seconds=heartbeat_timeout,
        shutdown_timeout_seconds=shutdown_timeout,
    )
    given = [v is not None for v in (coordinator_address, num_processes, process_id)]
    if not any(given):
        if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_NODELIST" in os.environ:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
            jax.distributed.initialize(**timeouts)
            return True
        return False
    if not all(given):
        raise ValueError(
            f"set all of {ENV_COORDINATOR_ADDRESS}, {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} "
            f"(or none): got coordinator_address={coordinator_address!r}, "
            f"num_processes={num_processes!r}, process_id={process_id!r}."
        )
    if num_processes == 1:
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    started = time.monotonic()
    if process_id != 0:  # process 0 starts the service; the others connect to it
        wait_for_coordinator(coordinator_address, initialization_timeout, process_id=process_id)
    remaining = max(1, int(initialization_timeout - (time.monotonic() - started)))
    jax.distributed.initialize(
        coordinator_address,
        num_processes,
        process_id,
        **{**timeouts, "initialization_timeout": remaining},
    )
    return True


# --- the global mesh and each process's rows of the global batch --------------------------------


def make_global_mesh(devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A one-axis mesh ``"data"`` over ``devices`` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    return jax.make_mesh((len(devices),), (AXIS,), devices=devices)


def make_dataset(
    num_steps: int,
    batch_size: int,
    input_dim: int = 8,
    num_tasks: int = 3,
    seed: int = 0,
    dtype: str = "float32",
) -> data_parallel.Batch:
    """``num_steps`` global batches as NumPy arrays ``(num_steps, batch_size, ...)``.

    Targets ``scale_i * sin(x @ a_i)`` with scales 0.1..10 (so the tasks need
    balancing) and a fresh ``x`` for every step (so the lagged update compares
    two batches). Generated on the host, identically in every process; a real
    job would have each process read only the rows :func:`process_rows` names.
    """
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((input_dim, num_tasks)).astype(dtype) / np.sqrt(input_dim)
    x = rng.standard_normal((num_steps, batch_size, input_dim)).astype(dtype)
    scales = np.logspace(-1.0, 1.0, num_tasks).astype(dtype)
    return data_parallel.Batch(x=x, y=(np.sin(x @ a) * scales).astype(dtype))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Batches ``(num_steps, batch_size, ...)`` split along ``batch_size`` over the mesh."""
    return NamedSharding(mesh, P(None, AXIS))


def process_rows(mesh: jax.sharding.Mesh, batch_size: int) -> slice:
    """The rows of every global batch that this process's devices hold.

    Raises:
      ValueError: if ``batch_size`` does not split evenly over the mesh, or if
        this process's devices are not one contiguous block of the mesh.
    """
    num_devices = mesh.devices.size
    if batch_size % num_devices:
        raise ValueError(
            f"batch_size must be a multiple of the number of devices ({num_devices}), "
            f"got {batch_size}."
        )
    indices = batch_sharding(mesh).addressable_devices_indices_map((1, batch_size))
    starts = sorted(index[1].start or 0 for index in indices.values())
    per_device = batch_size // num_devices
    if starts != list(range(starts[0], starts[0] + per_device * len(starts), per_device)):
        raise ValueError(f"this process's devices hold non-contiguous rows {starts} of the mesh")
    return slice(starts[0], starts[0] + per_device * len(starts))


def shard_dataset(dataset: data_parallel.Batch, mesh: jax.sharding.Mesh) -> data_parallel.Batch:
    """Global arrays of the batches, built from this process's rows only."""
    rows = process_rows(mesh, dataset.x.shape[1])
    sharding = batch_sharding(mesh)
    return jax.tree.map(
        lambda a: jax.make_array_from_process_local_data(sharding, a[:, rows], a.shape), dataset
    )


def replicate(tree, mesh: jax.sharding.Mesh):
    """Places a pytree, identical in every process, on every device of the mesh.

    Not ``jax.device_put(tree, NamedSharding(mesh, P()))``: across processes it
    checks that the values agree, with ``==``, so the lagged update's NaN
    previous losses fail the check.
    """
    sharding = NamedSharding(mesh, P())

    def leaf(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(
                leaf(jax.random.key_data(x)), impl=jax.random.key_impl(x)
            )
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(leaf, tree)


def to_host(tree):
    """NumPy copies of a replicated pytree (this process's first replica of each leaf).

    Raises:
      AssertionError: if the local replicas of a leaf differ.
    """

    def leaf(a):
        a = jax.random.key_data(a) if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key) else a
        replicas = [np.asarray(shard.data) for shard in a.addressable_shards]
        for replica in replicas[1:]:
            np.testing.assert_array_equal(replica, replicas[0])
        return replicas[0]

    return jax.tree.map(leaf, tree)


# --- the methods and their training steps ------------------------------------------------------


class TrainState(NamedTuple):
    """Everything one method's training carries (replicated on every device)."""

    params: Any  # the model's parameter pytree (examples.data_parallel.init_params)
    opt_state: optax.OptState  # the model optimizer's state (the aggregator's included)
    weighting_state: Any  # the loss weighting's state, or optax.EmptyState() for an aggregator
    prev_losses: jax.Array  # (num_tasks,) float: the last step's global task losses, NaN at first
    step: jax.Array  # () int32: steps taken


IS_SHARED = {"trunk": True, "heads": False}


def _weighting(
    method: str, num_tasks: int, axis_name: str | None, dtype: str
) -> famo_jax.LossWeighting:
    # gamma 0.01 (the authors' Cityscapes setting): with the default 1e-3 the
    # logits barely move in a few steps, and the test would not cover them.
    return famo_jax.famo(num_tasks, gamma=0.01, axis_name=axis_name, logits_dtype=dtype)


def _is_weighting(method: str) -> bool:
    return method not in ("cagrad", "mgda")


def _optimizer(method: str, learning_rate: float) -> optax.GradientTransformation:
    if _is_weighting(method):
        return optax.adam(learning_rate)
    aggregator = {"cagrad": famo_jax.cagrad, "mgda": famo_jax.mgda}[method]()
    return optax.chain(famo_jax.shared_trunk(aggregator, IS_SHARED), optax.adam(learning_rate))


def init_train_state(
    method: str,
    key: jax.Array,
    input_dim: int = 8,
    hidden: int = 16,
    num_tasks: int = 3,
    learning_rate: float = 1e-2,
    dtype: str = "float32",
) -> TrainState:
    """The initial state of ``method`` (on the default device; see :func:`replicate`)."""
    params = data_parallel.init_params(key, input_dim, hidden, num_tasks, dtype)
    if _is_weighting(method):
        weighting_state = _weighting(method, num_tasks, None, dtype).init()
    else:
        weighting_state = optax.EmptyState()
    return TrainState(
        params=params,
        opt_state=_optimizer(method, learning_rate).init(params),
        weighting_state=weighting_state,
        prev_losses=jnp.full((num_tasks,), jnp.nan, dtype),
        step=jnp.zeros((), jnp.int32),
    )


def make_step(
    method: str,
    num_tasks: int,
    learning_rate: float = 1e-2,
    axis_name: str | None = None,
    dtype: str = "float32",
) -> Callable[[TrainState, data_parallel.Batch], TrainState]:
    """One training step of ``method`` on ``batch``.

    With ``axis_name=None`` the step sees the global batch (one device, or
    sharded ``jit`` over global arrays); with an ``axis_name`` it is the
    per-device step of ``shard_map``, whose ``batch`` is this device's shard.
    The pattern of ``examples/data_parallel.py``: differentiate ``pmean`` of the
    weighted loss (FAMO) or of the task losses (aggregators), then ``pmean`` the
    gradients, which is right under ``shard_map`` and ``pmap`` alike.
    """
    optimizer = _optimizer(method, learning_rate)
    task_losses = data_parallel.task_losses

    def pmean(tree):
        return tree if axis_name is None else jax.lax.pmean(tree, axis_name)

    if not _is_weighting(method):

        def aggregator_step(state: TrainState, batch) -> TrainState:
            mean_losses = lambda p: pmean(task_losses(p, batch))
            losses, task_grads = famo_jax.task_gradients(mean_losses)(state.params)
            updates, opt_state = optimizer.update(pmean(task_grads), state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            return TrainState(params, opt_state, state.weighting_state, losses, state.step + 1)

        return aggregator_step

    weighting = _weighting(method, num_tasks, axis_name, dtype)
    lagged = method.endswith("_lagged")

    def weighting_step(state: TrainState, batch) -> TrainState:
        def objective(p):
            losses = task_losses(p, batch)
            return pmean(weighting.weigh(losses, state.weighting_state)), losses

        (_, losses), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(pmean(grads), state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if lagged:
            # No extra forward pass: the previous step's (global) losses against
            # this step's. update() averages both over the axis itself; the first
            # step has NaN previous losses and is skipped.
            weighting_state = weighting.update(state.prev_losses, losses, state.weighting_state)
        else:  # the authors' update: this batch's losses after the step
            curr = task_losses(params, batch)
            weighting_state = weighting.update(losses, curr, state.weighting_state)
        return TrainState(params, opt_state, weighting_state, pmean(losses), state.step + 1)

    return weighting_step


@functools.cache
def compile_step(
    methods: tuple[str, ...],
    mesh: jax.sharding.Mesh,
    style: str,
    num_tasks: int,
    learning_rate: float = 1e-2,
    dtype: str = "float32",
) -> Callable[[dict[str, TrainState], data_parallel.Batch, Any], dict[str, TrainState]]:
    """``step(states, batches, t)``: step ``t`` of every method, ``states = {method: state}``.

    ``batches`` comes from :func:`shard_dataset`. ``style="jit"``:
    :func:`make_step` without ``axis_name``, jitted over the global arrays with
    the states replicated; ``style="shard_map"``: the per-device steps under
    ``jax.shard_map`` over ``mesh``. All methods go into one program, which
    compiles in about half the time of one program per method (XLA:CPU), and
    the program is cached, so every run on the same mesh reuses it.
    """
    axis_name = {"jit": None, "shard_map": AXIS}.get(style, "invalid")
    if axis_name == "invalid":
        raise ValueError(f"style must be one of {STYLES}, got {style!r}.")
    steps = {m: make_step(m, num_tasks, learning_rate, axis_name, dtype) for m in methods}

    def step_all(states, batches, t):
        batch = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, t, 0, False), batches)
        return {m: steps[m](states[m], batch) for m in methods}

    if style == "jit":
        return jax.jit(step_all, out_shardings=NamedSharding(mesh, P()))
    per_device = jax.shard_map(
        step_all,
        mesh=mesh,
        in_specs=(P(), P(None, AXIS), P()),
        out_specs=P(),  # the states stay replicated: every device applies the same update
    )
    return jax.jit(per_device)


# --- checkpoints (orbax; written by all processes together into one shared directory) -----------


def save_checkpoint(directory: str, step: int, tree) -> None:
    """Saves ``tree`` at ``step``; every process of the job must call it."""
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(os.path.abspath(directory)) as manager:
        manager.save(step, args=ocp.args.StandardSave(tree))
        manager.wait_until_finished()


def restore_checkpoint(directory: str, like, step: int | None = None):
    """Restores ``step`` (default: the latest) into the structure, dtypes and shardings of ``like``.

    ``like`` is a freshly built tree placed where the arrays should go (for
    example replicated on this job's mesh, whatever the number of processes
    that saved it); restoring into it gives back NamedTuples such as
    ``famo_jax.FAMOState``.
    """
    import orbax.checkpoint as ocp

    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    with ocp.CheckpointManager(os.path.abspath(directory)) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {directory}")
        return manager.restore(step, args=ocp.args.StandardRestore(abstract))


# --- a training run -----------------------------------------------------------------------------


@dataclasses.dataclass
class RunConfig:
    """What to train: the same in every process."""

    steps: int = 40
    batch_size: int = 64
    num_tasks: int = 3
    input_dim: int = 8
    hidden: int = 16
    learning_rate: float = 1e-2
    seed: int = 0
    methods: tuple[str, ...] = METHODS
    styles: tuple[str, ...] = STYLES
    dtype: str = "float32"  # "float64" needs jax_enable_x64


def initial_states(config: RunConfig, mesh: jax.sharding.Mesh) -> dict[str, dict[str, TrainState]]:
    """``{style: {method: state}}``, every state replicated on ``mesh``; same seed for all."""
    init_all = _compiled_init(
        config.methods,
        config.input_dim,
        config.hidden,
        config.num_tasks,
        config.learning_rate,
        config.dtype,
    )
    states = to_host(init_all(jax.random.key(config.seed)))
    return {style: replicate(states, mesh) for style in config.styles}


@functools.cache
def _compiled_init(methods: tuple[str, ...], *args) -> Callable[[jax.Array], dict]:
    # One jitted program for all initial states: run eagerly, each of their
    # small operations would compile on its own.
    return jax.jit(lambda key: {m: init_train_state(m, key, *args) for m in methods})


def train(
    states: dict[str, dict[str, TrainState]],
    config: RunConfig,
    mesh: jax.sharding.Mesh,
    stop: int,
    *,
    step_style: str | None = None,
) -> dict[str, dict[str, TrainState]]:
    """Trains every ``{style: {method: state}}`` from its ``step`` up to step ``stop``.

    Every process calls it with the same arguments. ``step_style`` trains every
    state with that style's step instead of its own.
    """
    dataset = shard_dataset(
        make_dataset(
            config.steps,
            config.batch_size,
            config.input_dim,
            config.num_tasks,
            config.seed,
            config.dtype,
        ),
        mesh,
    )
    steps = {
        # Sorted: a dict that went through jit comes back with sorted keys, and
        # the cache of compiled steps must see the same tuple every time.
        style: compile_step(
            tuple(sorted(by_method)),
            mesh,
            step_style or style,
            config.num_tasks,
            config.learning_rate,
            config.dtype,
        )
        for style, by_method in states.items()
    }
    # On CPU, a multi-process job with several devices per process deadlocks
    # within a few dozen steps when the next step is dispatched before the last
    # one finished (XLA:CPU's gloo collectives; seen with 2 and 4 processes of 2
    # devices, not with 1 device each): wait for each step there.
    wait = jax.process_count() > 1 and mesh.devices.flat[0].platform == "cpu"
    for t in range(current_step(states), stop):
        for style, step in steps.items():
            new_state = step(states[style], dataset, t)
            states = {**states, style: jax.block_until_ready(new_state) if wait else new_state}
    return states


def current_step(states: dict[str, dict[str, TrainState]]) -> int:
    """The step every state is at.

    Raises:
      ValueError: if the states are at different steps.
    """
    steps = {int(to_host(st.step)) for by_method in states.values() for st in by_method.values()}
    if len(steps) != 1:
        raise ValueError(f"every state must be at the same step, got steps {sorted(steps)}")
    return steps.pop()


def single_device_reference(states, config: RunConfig, stop: int):
    """The same training from the same (host) states on this process's first device only.

    Every style's states are trained with the single-device step (style ``jit``
    on a one-device mesh): what each style must reproduce.
    """
    mesh = make_global_mesh(jax.local_devices()[:1])
    host = {
        s: {m: replicate(to_host(st), mesh) for m, st in by.items()} for s, by in states.items()
    }
    return train(host, config, mesh, stop, step_style="jit")


def max_abs_difference(a, b) -> float:
    """The largest absolute difference between two pytrees of arrays (NaNs in the same places)."""
    diffs = jax.tree.map(
        lambda u, v: float(
            np.nanmax(np.abs(np.asarray(u, np.float64) - np.asarray(v, np.float64)), initial=0.0)
        ),
        a,
        b,
    )
    return max(jax.tree.leaves(diffs), default=0.0)


def flatten(tree, prefix: str = "") -> dict[str, np.ndarray]:
    """``{path: array}`` of a host pytree, the paths as ``jax.tree_util.keystr`` gives them."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {prefix + jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def save_process_arrays(directory: str, name: str, tree) -> str:
    """Writes this process's copy of a replicated tree to ``directory/{name}.process{i}.npz``."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{name}.process{jax.process_index()}.npz")
    np.savez(path, **flatten(to_host(tree)))
    return path


# --- launching local processes (plain subprocesses: no JAX in the launcher) ---------------------


def free_port() -> int:
    """A TCP port that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class ProcessResult:
    """How one process of a local job ended."""

    process_id: int
    pid: int  # the operating system's process id
    returncode: int | None  # negative: killed by that signal (-6: aborted by JAX's health check)
    stdout: str
    stderr: str
    killed: bool  # True if the launcher had to kill it (timeout, or it outlived a failure)
    elapsed: float  # seconds from the launch to its exit
    cpu_seconds: float  # user + system CPU time it used

    @property
    def error(self) -> str:
        """The line of stderr that says why the process failed, or ''."""
        return error_summary(self.stderr)


@dataclasses.dataclass
class JobResult:
    """The processes of a local job; ``ok`` if every one exited with 0."""

    processes: list[ProcessResult]
    elapsed: float
    timed_out: bool

    @property
    def cpu_seconds(self) -> float:
        """The CPU time of all processes together."""
        return sum(p.cpu_seconds for p in self.processes)

    @property
    def ok(self) -> bool:
        return not self.timed_out and all(p.returncode == 0 for p in self.processes)

    def describe(self) -> str:
        lines = [
            f"{len(self.processes)} processes, {self.elapsed:.1f} s ({self.cpu_seconds:.1f} s CPU)"
            + (" (timed out)" if self.timed_out else "")
        ]
        for p in self.processes:
            state = "killed by the launcher" if p.killed else f"exit code {p.returncode}"
            lines.append(
                f"  process {p.process_id}: {state} after {p.elapsed:.1f} s "
                f"({p.cpu_seconds:.1f} s CPU)"
                + (f": {p.error}" if p.returncode and p.error else "")
            )
        return "\n".join(lines)

    def check(self) -> JobResult:
        """Returns self if ``ok``, else raises :class:`JobFailed`."""
        if not self.ok:
            raise JobFailed(self)
        return self


class JobFailed(RuntimeError):
    """A local job had a process that failed, or ran out of time."""

    def __init__(self, result: JobResult):
        super().__init__("local JAX job failed: " + result.describe())
        self.result = result


_GLOG_PREFIX = re.compile(r"^[FE]\d{4} [\d:.]+\s+\d+ [\w.]+:\d+\] ")


def error_summary(stderr: str) -> str:
    """Why a process failed: its Python exception, else JAX's fatal abort, else the last line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    tracebacks = [
        i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")
    ]
    if tracebacks:
        for line in lines[tracebacks[-1] + 1 :]:
            if re.match(r"^[\w.]+(Error|Exception|Exit|Interrupt|Failed)\b", line):
                return line
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("F") and _GLOG_PREFIX.match(lines[i]):
            fatal = _GLOG_PREFIX.sub("", lines[i])
            if i + 1 < len(lines) and not lines[i + 1].startswith(("*", "@", "RPC:")):
                fatal += " " + lines[i + 1]  # e.g. the ids of the tasks that stopped
            if "absl::Status:" in fatal:  # keep the status, drop JAX's generic advice
                head, _, status = fatal.partition("absl::Status:")
                fatal = head.split(".")[0] + ": " + status.strip()
            return fatal
    return lines[-1] if lines else ""


def _reap(process: subprocess.Popen, cpu: dict, index: int, block: bool = False) -> bool:
    """Whether ``process`` has exited; if so, sets its returncode and records its CPU time."""
    if process.returncode is not None:
        return True
    pid, status, usage = os.wait4(process.pid, 0 if block else os.WNOHANG)
    if pid == 0:
        return False
    process.returncode = os.waitstatus_to_exitcode(status)
    cpu[index] = usage.ru_utime + usage.ru_stime
    return True


def _request_stacks(processes: Sequence[subprocess.Popen]) -> None:
    """Sends SIGUSR1, on which ``run_worker`` prints every thread's Python stack."""
    for process in processes:
        try:
            os.killpg(process.pid, signal.SIGUSR1)
        except ProcessLookupError:
            pass
    time.sleep(1.0)


def _kill(process: subprocess.Popen) -> None:
    # Each process leads its own session, so this also reaches anything it started.
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def launch_local(
    command: Sequence[str],
    num_processes: int,
    *,
    devices_per_process: int = 1,
    timeout: float = 300.0,
    failure_grace: float = 60.0,
    process_ids: Sequence[int] | None = None,
    coordinator_address: str | None = None,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    poll_interval: float = 0.05,
) -> JobResult:
    """Runs ``command`` as local processes of one JAX job of ``num_processes``; waits for them.

    Each process gets ``JAX_COORDINATOR_ADDRESS`` (default ``127.0.0.1`` and a
    free port), ``JAX_NUM_PROCESSES``, its own ``JAX_PROCESS_ID``,
    ``JAX_PLATFORMS=cpu`` and ``devices_per_process`` CPU devices (through
    ``XLA_FLAGS``), so that :func:`join_job` joins them into one job.
    ``process_ids`` starts only some of the job's processes here (default:
    all), for example the ones of this host when every host runs a launcher
    with the same ``coordinator_address``.

    Never hangs: once a process fails, the others have ``failure_grace``
    seconds to exit on their own (JAX's health check stops them after its
    heartbeat timeout) before they are killed; after ``timeout`` seconds every
    process still running gets SIGUSR1 (on which this example's workers print
    every thread's Python stack to their stderr) and a second later SIGKILL;
    and they are killed if the launcher itself is interrupted
    (KeyboardInterrupt included; SIGTERM too within :func:`exit_on_sigterm`,
    which ``main`` uses). Each process leads its own session, so
    killing it reaches anything it started.

    Returns:
      A :class:`JobResult`; ``.check()`` raises :class:`JobFailed` unless every process succeeded.
    """
    process_ids = list(range(num_processes) if process_ids is None else process_ids)
    coordinator_address = coordinator_address or f"127.0.0.1:{free_port()}"
    base_env = dict(os.environ if env is None else env)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", base_env.get("XLA_FLAGS", ""))
    base_env.update(
        {
            ENV_COORDINATOR_ADDRESS: coordinator_address,
            ENV_NUM_PROCESSES: str(num_processes),
            "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": (
                f"{flags} --xla_force_host_platform_device_count={devices_per_process}".strip()
            ),
            "PYTHONUNBUFFERED": "1",  # output up to a crash reaches the log
        }
    )
    processes: list[subprocess.Popen] = []
    logs = []
    ended: dict[int, float] = {}  # index in processes -> seconds from the launch to its exit
    cpu: dict[int, float] = {}  # index in processes -> CPU seconds it used
    killed: set[int] = set()
    start = time.monotonic()
    timed_out = False
    with tempfile.TemporaryDirectory(prefix="famo_jax_job_") as log_dir:
        try:
            for process_id in process_ids:
                out = open(os.path.join(log_dir, f"{process_id}.out"), "w+")
                err = open(os.path.join(log_dir, f"{process_id}.err"), "w+")
                logs.append((out, err))
                processes.append(
                    subprocess.Popen(
                        list(command),
                        env={**base_env, ENV_PROCESS_ID: str(process_id)},
                        cwd=cwd,
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=err,
                        start_new_session=True,
                    )
                )
            first_failure = None
            while len(ended) < len(processes):
                now = time.monotonic()
                for i, process in enumerate(processes):
                    if i not in ended and _reap(process, cpu, i):
                        ended[i] = now - start
                        if process.returncode != 0 and first_failure is None:
                            first_failure = now
                timed_out = now - start > timeout
                if len(ended) < len(processes) and (
                    timed_out or (first_failure is not None and now - first_failure > failure_grace)
                ):
                    break
                time.sleep(poll_interval)
        finally:
            running = [
                i for i, p in enumerate(processes) if i not in ended and not _reap(p, cpu, i)
            ]
            if timed_out and running:  # the stacks of a hung job say where it hangs
                _request_stacks([processes[i] for i in running])
            for i in running:
                if not _reap(processes[i], cpu, i):
                    _kill(processes[i])
                    _reap(processes[i], cpu, i, block=True)
                killed.add(i)
            for i in range(len(processes)):
                ended.setdefault(i, time.monotonic() - start)
            results = []
            for i, process in enumerate(processes):
                out, err = logs[i]
                out.seek(0)
                err.seek(0)
                results.append(
                    ProcessResult(
                        process_id=process_ids[i],
                        pid=process.pid,
                        returncode=process.returncode,
                        stdout=out.read(),
                        stderr=err.read(),
                        killed=i in killed,
                        elapsed=ended[i],
                        cpu_seconds=cpu.get(i, float("nan")),
                    )
                )
            for out, err in logs:
                out.close()
                err.close()
    return JobResult(results, time.monotonic() - start, timed_out and bool(killed))


@contextlib.contextmanager
def exit_on_sigterm():
    """Within it, SIGTERM raises ``SystemExit(143)``, so that :func:`launch_local` cleans up.

    A scheduler cancelling a job (SLURM's ``scancel``, a CI timeout) sends
    SIGTERM, on which Python exits without running ``finally`` blocks; the
    launched processes, each leading its own session, would be left running.
    The previous handler comes back on exit. Main thread only.
    """

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# --- the example --------------------------------------------------------------------------------


def states_equal(a, b) -> bool:
    """Whether two host pytrees are identical: same structure, dtypes and bits (NaNs included)."""
    flat_a, flat_b = flatten(a), flatten(b)
    return flat_a.keys() == flat_b.keys() and all(
        flat_a[k].dtype == flat_b[k].dtype and np.array_equal(flat_a[k], flat_b[k], equal_nan=True)
        for k in flat_a
    )


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    """One process of the job: join, train every method in every style, check, report.

    Returns a report (the same in every process): the job's size, the steps
    run, whether the checkpoint restored bit for bit and the resumed run
    matched the uninterrupted one, and with ``--reference`` the largest
    difference of each style and method from a one-device run.
    """
    # SIGUSR1 prints every thread's Python stack: launch_local sends it to a
    # job that outlives its timeout, before killing it.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    joined = join_job(
        initialization_timeout=args.initialization_timeout,
        heartbeat_timeout=args.heartbeat_timeout,
        shutdown_timeout=args.shutdown_timeout,
    )
    config = RunConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        seed=args.seed,
        methods=tuple(args.methods.split(",")) if args.methods else METHODS,
        styles=tuple(args.styles.split(",")),
        dtype=args.dtype,
    )
    mesh = make_global_mesh()
    states = initial_states(config, mesh)
    if args.resume:
        # Into freshly built states on this job's mesh: any number of processes
        # (and devices) can restore what any other number saved.
        states = restore_checkpoint(args.checkpoint_dir, states)
    start = current_step(states)
    if args.out:
        save_process_arrays(args.out, "start", states)
    first = states
    report: dict[str, Any] = {
        "processes": jax.process_count(),
        "devices": jax.device_count(),
        "start": start,
        "stop": args.steps,
    }
    if args.checkpoint_step is not None and start < args.checkpoint_step < args.steps:
        states = train(states, config, mesh, args.checkpoint_step)
        save_checkpoint(args.checkpoint_dir, args.checkpoint_step, states)
        if args.out:
            save_process_arrays(args.out, "checkpointed", states)
        # Read it back as a restarted job would (into fresh states), and carry on
        # with both copies: the resumed run must be the uninterrupted one, bit for bit.
        restored = restore_checkpoint(args.checkpoint_dir, initial_states(config, mesh))
        report["restored_bit_for_bit"] = states_equal(to_host(restored), to_host(states))
        resumed = to_host(train(restored, config, mesh, args.steps))
    else:
        resumed = None
    states = train(states, config, mesh, args.steps)
    host_states = to_host(states)
    # Every process must hold the same states: compared across processes, bit for bit.
    multihost_utils.assert_equal(flatten(host_states), "the processes ended with different states")
    if resumed is not None:
        report["resumed_bit_for_bit"] = states_equal(resumed, host_states)
    if args.out:
        save_process_arrays(args.out, "final", states)
    if args.reference:
        reference = to_host(single_device_reference(first, config, args.steps))
        report["max_difference_from_one_device"] = {
            f"{style}/{method}": max_abs_difference(
                (st.params, st.opt_state, st.weighting_state),
                (ref.params, ref.opt_state, ref.weighting_state),
            )
            for style, by_method in host_states.items()
            for method, st in by_method.items()
            for ref in [reference[style][method]]
        }
    if jax.process_index() == 0:
        print(
            f"{jax.process_count()} process(es), {jax.device_count()} devices "
            f"({jax.local_device_count()} per process), global batch {args.batch_size}, "
            f"steps {start}..{args.steps}" + (" (joined with jax.distributed)" if joined else "")
        )
        print("every process holds the same parameters, optimizer and method states: yes")
        if "restored_bit_for_bit" in report:
            print(
                f"checkpoint at step {args.checkpoint_step}: restored bit for bit: "
                f"{_yes(report['restored_bit_for_bit'])}; resumed run equals the uninterrupted "
                f"one bit for bit: {_yes(report['resumed_bit_for_bit'])}"
            )
        for style, by_method in host_states.items():
            for method, st in by_method.items():
                losses = np.array2string(st.prev_losses, precision=4)
                line = f"  {style:9s} {method:18s} final losses {losses}"
                if args.reference:
                    deviation = report["max_difference_from_one_device"][f"{style}/{method}"]
                    line += f"  max |difference| from one device {deviation:.1e}"
                print(line)
    return report


def _yes(flag: bool) -> str:
    return "yes" if flag else "NO"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    launch = parser.add_argument_group(
        "starting local processes (omit to run as one process of a job)"
    )
    launch.add_argument(
        "--local-processes", type=int, default=0, help="start this many local processes"
    )
    launch.add_argument("--devices-per-process", type=int, default=2, help="CPU devices of each")
    launch.add_argument(
        "--timeout", type=float, default=600.0, help="seconds before the job is killed"
    )
    run = parser.add_argument_group("training (the same in every process)")
    run.add_argument("--steps", type=int, default=40)
    run.add_argument("--batch-size", type=int, default=64, help="the global batch size")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    run.add_argument("--methods", default="", help=f"comma-separated subset of {METHODS}")
    run.add_argument(
        "--styles", default=",".join(STYLES), help="comma-separated subset of jit,shard_map"
    )
    run.add_argument(
        "--checkpoint-dir", default=None, help="orbax checkpoints (shared by all hosts)"
    )
    run.add_argument(
        "--checkpoint-step",
        type=int,
        default=None,
        help="save after this step, then check the restore",
    )
    run.add_argument(
        "--resume", action="store_true", help="start from the latest checkpoint in --checkpoint-dir"
    )
    run.add_argument("--out", default=None, help="write each process's states here (.npz)")
    run.add_argument(
        "--no-reference", dest="reference", action="store_false", help="skip the one-device run"
    )
    run.add_argument(
        "--initialization-timeout",
        type=int,
        default=120,
        help="seconds to wait for the job to form",
    )
    run.add_argument(
        "--heartbeat-timeout",
        type=int,
        default=30,
        help="seconds before a silent process counts as dead",
    )
    run.add_argument(
        "--shutdown-timeout", type=int, default=60, help="seconds to wait for the others at exit"
    )
    return parser


def worker_command(argv: Sequence[str] = ()) -> list[str]:
    """The command that runs this example as one process of a job, with ``argv``."""
    return [sys.executable, "-u", os.path.abspath(__file__), *argv]


_LAUNCH_OPTIONS = ("--local-processes", "--devices-per-process", "--timeout")


def _worker_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` without the options of the local launch."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg.split("=", 1)[0] in _LAUNCH_OPTIONS:
            skip = "=" not in arg
        else:
            out.append(arg)
    return out


def main(argv: Sequence[str] | None = None):
    """Starts ``--local-processes`` copies of this example, or runs as one process of a job."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.checkpoint_step is not None or args.resume:
        if not args.checkpoint_dir:
            raise SystemExit("--checkpoint-step and --resume need --checkpoint-dir")
    if not args.local_processes:
        return run_worker(args)
    with exit_on_sigterm():
        result = launch_local(
            worker_command(_worker_argv(argv)),
            args.local_processes,
            devices_per_process=args.devices_per_process,
            timeout=args.timeout,
            failure_grace=args.heartbeat_timeout + 30,
        )
    print(result.processes[0].stdout, end="")
    print(result.describe())
    return result.check()


if __name__ == "__main__":
    main()
