"""Data-parallel FAMO on JAX's own SPMD machinery: ``pmap``, ``shard_map`` and sharded ``jit``.

A shared-trunk MLP with one linear head per task is trained with FAMO on a
global batch split across all devices, in the three styles JAX offers, and each
run is compared with a single-device run on the same global batch:

- ``pmap``: :func:`famo_jax.famo` with ``axis_name`` inside :func:`jax.pmap`;
  each device holds one shard of the batch and a replica of the parameters,
  optimizer state and FAMO state.
- ``shard_map``: the same per-device step inside :func:`jax.shard_map` over a
  one-axis :class:`jax.sharding.Mesh`.
- ``jit``: the single-device step, unchanged, jitted over a batch laid out with
  a :class:`jax.sharding.NamedSharding`. No ``axis_name``: inside ``jit`` the
  code sees global arrays, so the task losses already are global-batch losses
  and XLA inserts the cross-device reductions itself.

With ``axis_name``, FAMO averages the task losses over the axis (``pmean``), so
every replica computes the same weights and the same logits update, and the
gradient of ``weigh`` with respect to each replica's own losses is the *global*
weight vector. The per-device step therefore differentiates
``pmean(weigh(local_losses))`` and averages the gradients over the axis; that
pair is right both under ``pmap`` (where the gradient of the ``pmean`` is the
local one) and under ``shard_map`` (where the gradient of a replicated parameter
is already reduced across the axis, so the second ``pmean`` is a no-op). All
shards must hold the same number of examples, so that the mean of the shard
means is the global mean.

On a CPU, simulate eight devices with::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/data_parallel.py

On a multi-GPU host or a TPU slice the same script uses every local device.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import famo_jax

AXIS = "data"
STYLES = ("pmap", "shard_map", "jit")


class Batch(NamedTuple):
    """A global batch of multitask regression data."""

    x: jax.Array  # (batch_size, input_dim)
    y: jax.Array  # (batch_size, num_tasks)


class TrainState(NamedTuple):
    """Everything a training step carries."""

    params: Any  # the model's parameter pytree
    opt_state: optax.OptState  # the model optimizer's state
    famo_state: famo_jax.FAMOState  # FAMO's logits and logits-optimizer state


def init_params(key: jax.Array, input_dim: int, hidden: int, num_tasks: int, dtype=jnp.float32):
    """A tanh trunk shared by ``num_tasks`` linear heads."""
    k1, k2 = jax.random.split(key)
    return {
        "trunk": {
            "w": jax.random.normal(k1, (input_dim, hidden), dtype) / np.sqrt(input_dim),
            "b": jnp.zeros((hidden,), dtype),
        },
        "heads": {
            "w": jax.random.normal(k2, (num_tasks, hidden), dtype) / np.sqrt(hidden),
            "b": jnp.zeros((num_tasks,), dtype),
        },
    }


def task_losses(params, batch: Batch) -> jax.Array:
    """Per-task mean squared errors over the examples in ``batch``: shape ``(num_tasks,)``."""
    features = jnp.tanh(batch.x @ params["trunk"]["w"] + params["trunk"]["b"])
    predictions = features @ params["heads"]["w"].T + params["heads"]["b"]
    return jnp.mean((predictions - batch.y) ** 2, axis=0)


def make_batch(
    key: jax.Array, batch_size: int, input_dim: int, num_tasks: int, dtype=jnp.float32
) -> Batch:
    """Targets ``scale_i * sin(x @ a_i)``; scales from 0.1 to 10, so the tasks need balancing."""
    kx, ka = jax.random.split(key)
    x = jax.random.normal(kx, (batch_size, input_dim), dtype)
    a = jax.random.normal(ka, (input_dim, num_tasks), dtype) / np.sqrt(input_dim)
    scales = jnp.logspace(-1.0, 1.0, num_tasks, dtype=dtype)
    return Batch(x=x, y=jnp.sin(x @ a) * scales)


def init_train_state(
    params, weighting: famo_jax.LossWeighting, optimizer: optax.GradientTransformation
) -> TrainState:
    return TrainState(params, optimizer.init(params), weighting.init())


def make_train_step(
    weighting: famo_jax.LossWeighting,
    optimizer: optax.GradientTransformation,
    axis_name: Any | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, jax.Array]]:
    """One FAMO training step with the authors' same-batch update.

    Args:
      weighting: ``famo_jax.famo(num_tasks, axis_name=axis_name)``.
      optimizer: the model optimizer.
      axis_name: None for a step on the whole batch (single device or sharded
        ``jit``), or the name of the mapped axis for a per-device step under
        ``pmap``/``shard_map``, whose ``batch`` is this device's shard.

    Returns:
      ``step(train_state, batch) -> (train_state, weighted_loss)``.
    """

    def mean_over_devices(tree):
        return tree if axis_name is None else jax.lax.pmean(tree, axis_name)

    def step(train_state: TrainState, batch: Batch):
        params, opt_state, famo_state = train_state

        def objective(p):
            losses = task_losses(p, batch)
            return mean_over_devices(weighting.weigh(losses, famo_state)), losses

        (loss, losses), grads = jax.value_and_grad(objective, has_aux=True)(params)
        grads = mean_over_devices(grads)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        # Same-batch update: the losses of this (shard of the) batch after the
        # step; with axis_name, ``update`` averages both loss vectors itself.
        famo_state = weighting.update(losses, task_losses(params, batch), famo_state)
        return TrainState(params, opt_state, famo_state), loss

    return step


def _scan_steps(step, num_steps: int):
    def run(train_state, batch):
        return jax.lax.scan(lambda s, _: step(s, batch), train_state, length=num_steps)

    return run


def split_batch(batch: Batch, num_devices: int) -> Batch:
    """Reshapes leaves ``(size, ...)`` to ``(num_devices, size // num_devices, ...)``."""
    size = batch.x.shape[0]
    if size % num_devices:
        raise ValueError(
            f"batch_size must be a multiple of the number of devices ({num_devices}), got {size}."
        )
    return jax.tree.map(lambda a: a.reshape(num_devices, size // num_devices, *a.shape[1:]), batch)


def train_single_device(
    train_state, batch, num_steps, *, num_tasks, optimizer, factory=famo_jax.famo, **famo_kwargs
):
    """Reference: ``num_steps`` steps on the whole batch, on one device.

    ``factory(num_tasks, axis_name=..., **famo_kwargs)`` builds the weighting
    (``famo_jax.famo`` by default; any loss weighting that takes ``axis_name``).
    """
    weighting = factory(num_tasks, **famo_kwargs)
    step = make_train_step(weighting, optimizer)
    return jax.jit(_scan_steps(step, num_steps))(train_state, batch)


def train_pmap(
    train_state,
    batch,
    num_steps,
    *,
    num_tasks,
    optimizer,
    devices=None,
    factory=famo_jax.famo,
    **famo_kwargs,
):
    """``pmap`` over ``devices``: returns the state of device 0 and every device's losses.

    The state is replicated on the way in (``in_axes=None``) and every replica
    ends with the same state, since they all apply the same averaged updates.
    """
    devices = jax.local_devices() if devices is None else devices
    weighting = factory(num_tasks, axis_name=AXIS, **famo_kwargs)
    step = make_train_step(weighting, optimizer, axis_name=AXIS)
    run = jax.pmap(_scan_steps(step, num_steps), axis_name=AXIS, in_axes=(None, 0), devices=devices)
    replicated_state, losses = run(train_state, split_batch(batch, len(devices)))
    return replicated_state, losses


def make_data_mesh(devices=None) -> jax.sharding.Mesh:
    """A one-axis mesh named ``"data"`` over ``devices`` (default: all devices)."""
    devices = jax.devices() if devices is None else devices
    return jax.make_mesh((len(devices),), (AXIS,), devices=devices)


def train_shard_map(
    train_state,
    batch,
    num_steps,
    *,
    num_tasks,
    optimizer,
    mesh,
    factory=famo_jax.famo,
    **famo_kwargs,
):
    """``shard_map`` over ``mesh``: the batch is split on its leading axis, the state replicated."""
    weighting = factory(num_tasks, axis_name=AXIS, **famo_kwargs)
    step = make_train_step(weighting, optimizer, axis_name=AXIS)
    run = jax.shard_map(
        _scan_steps(step, num_steps),
        mesh=mesh,
        in_specs=(P(), P(AXIS)),
        # The state is replicated (invariant along the axis); the weighted loss
        # too, since the step averages it.
        out_specs=(P(), P()),
    )
    replicated = NamedSharding(mesh, P())
    batch = jax.device_put(batch, NamedSharding(mesh, P(AXIS)))
    train_state = jax.device_put(train_state, replicated)
    return jax.jit(run)(train_state, batch)


def train_sharded_jit(train_state, batch, num_steps, *, num_tasks, optimizer, mesh, **famo_kwargs):
    """The single-device code, jitted over a batch sharded on ``mesh``; no ``axis_name``."""
    batch = jax.device_put(batch, NamedSharding(mesh, P(AXIS)))
    train_state = jax.device_put(train_state, NamedSharding(mesh, P()))
    with jax.set_mesh(mesh):
        return train_single_device(
            train_state, batch, num_steps, num_tasks=num_tasks, optimizer=optimizer, **famo_kwargs
        )


def max_abs_difference(a, b) -> float:
    """The largest absolute difference between two pytrees of arrays of the same structure."""
    diffs = jax.tree.map(
        lambda u, v: float(np.max(np.abs(np.asarray(u, np.float64) - np.asarray(v, np.float64)))),
        a,
        b,
    )
    return max(jax.tree.leaves(diffs))


def compare_styles(
    num_steps: int = 20,
    batch_size: int = 64,
    input_dim: int = 8,
    hidden: int = 16,
    num_tasks: int = 3,
    learning_rate: float = 1e-2,
    dtype=jnp.float32,
    seed: int = 0,
    styles=STYLES,
    factory=famo_jax.famo,
    **famo_kwargs,
) -> dict[str, dict[str, float]]:
    """Trains with every style and with one device; returns the largest deviations.

    Returns:
      For each style, the largest absolute difference from the single-device
      run of the final ``params``, ``famo_state`` (logits, logits-optimizer
      state, counters), ``opt_state`` and of the per-step weighted losses, and
      for ``pmap`` the largest difference between the state replicas.
    """
    key_params, key_batch = jax.random.split(jax.random.key(seed))
    params = init_params(key_params, input_dim, hidden, num_tasks, dtype)
    batch = make_batch(key_batch, batch_size, input_dim, num_tasks, dtype)
    optimizer = optax.adam(learning_rate)
    state = init_train_state(params, factory(num_tasks, **famo_kwargs), optimizer)
    common = dict(num_tasks=num_tasks, optimizer=optimizer, factory=factory, **famo_kwargs)
    single_state, single_losses = train_single_device(state, batch, num_steps, **common)

    def deviations(other_state, other_losses):
        return {
            "params": max_abs_difference(other_state.params, single_state.params),
            "famo_state": max_abs_difference(other_state.famo_state, single_state.famo_state),
            "opt_state": max_abs_difference(other_state.opt_state, single_state.opt_state),
            "weighted_loss": max_abs_difference(other_losses, single_losses),
        }

    report = {}
    if "pmap" in styles:
        replicated, losses = train_pmap(state, batch, num_steps, **common)
        first = jax.tree.map(lambda a: a[0], replicated)
        report["pmap"] = deviations(first, losses[0])
        report["pmap"]["replicas"] = max(
            max_abs_difference(jax.tree.map(lambda a, i=i: a[i], replicated), first)
            for i in range(jax.tree.leaves(replicated)[0].shape[0])
        )
    mesh = make_data_mesh()
    if "shard_map" in styles:
        report["shard_map"] = deviations(
            *train_shard_map(state, batch, num_steps, mesh=mesh, **common)
        )
    if "jit" in styles:
        report["jit"] = deviations(*train_sharded_jit(state, batch, num_steps, mesh=mesh, **common))
    report["single"] = {
        "final_task_weights": np.asarray(jax.nn.softmax(single_state.famo_state.logits)).tolist(),
        "num_updates": int(single_state.famo_state.num_updates),
    }
    return report


def main(argv=None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-tasks", type=int, default=3)
    parser.add_argument("--gamma", type=float, default=0.001)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"{jax.device_count()} devices: {jax.devices()}")
    if jax.device_count() == 1:
        print(
            "Only one device: set XLA_FLAGS=--xla_force_host_platform_device_count=8 "
            "to simulate eight CPU devices."
        )
    report = compare_styles(
        num_steps=args.steps,
        batch_size=args.batch_size,
        num_tasks=args.num_tasks,
        gamma=args.gamma,
        seed=args.seed,
    )
    single = report["single"]
    print(
        f"single device: {single['num_updates']} FAMO updates, final task weights "
        f"{np.round(single['final_task_weights'], 4)}"
    )
    print("largest |difference| from the single-device run on the same global batch:")
    for style in (s for s in report if s != "single"):
        deviation = report[style]
        print(f"  {style:10s} " + "  ".join(f"{k} {v:.2e}" for k, v in deviation.items()))
    return report


if __name__ == "__main__":
    main()
