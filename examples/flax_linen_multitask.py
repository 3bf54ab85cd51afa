"""Flax Linen: a shared trunk with five task heads on scikit-learn's digits, trained with FAMO.

The model is a ``flax.linen`` module (an MLP trunk and one ``Dense`` head per
task, see ``_digits.py`` for the five tasks). Training follows the usual Linen
pattern: a ``flax.training.train_state.TrainState`` subclass carries the
parameters and the optax state, and here also FAMO's state (a pytree field)
and FAMO's functions (a static field), so one jitted ``train_step(state,
batch) -> state`` does everything.

Two ways of calling FAMO's ``update``:

- ``same-batch`` (the authors'): after ``state.apply_gradients`` the same
  batch's task losses are re-computed under the new parameters (one extra
  forward pass, no gradient) and ``update(losses_before, losses_after)`` is
  called;
- ``lagged`` (no extra forward pass): at step ``t``, ``update(losses_{t-1},
  losses_t)`` is applied with the losses just computed for the gradient, before
  the step is weighted; step 0 has no predecessor and skips it.

Each run shows a tqdm progress bar; the script prints the per-task test metrics
of both modes and, with ``--plot PATH``, saves a plot of the task losses and weights.

Run: ``python examples/flax_linen_multitask.py`` (about a minute on 2 CPU
cores) or ``python examples/flax_linen_multitask.py --quick`` (seconds).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from flax.training import train_state
from tqdm.auto import tqdm

import famo_jax

if __package__:
    from . import _digits
else:  # run as a script: this file's directory is on sys.path
    import _digits

MODES = ("same-batch", "lagged")


class Trunk(nn.Module):
    """The shared two-layer MLP."""

    hidden: int = 128

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        """Returns the shared features, ``(batch, hidden)``."""
        h = nn.relu(nn.Dense(self.hidden)(images))
        return nn.relu(nn.Dense(self.hidden)(h))


class MultiHeadMLP(nn.Module):
    """The shared trunk (parameters under ``"trunk"``) and one head per task.

    The heads' parameters are under ``"head_<task>"``, so an optimizer can treat
    the trunk and the heads differently by the top-level key (``optax.partition``).
    """

    hidden: int = 128
    head_sizes: Sequence[int] = _digits.HEAD_SIZES
    task_names: Sequence[str] = _digits.TASK_NAMES

    @nn.compact
    def __call__(self, images: jax.Array) -> tuple[jax.Array, ...]:
        """Returns every head's output, ``(batch, head_size)`` each."""
        features = Trunk(self.hidden, name="trunk")(images)
        return tuple(
            nn.Dense(size, name=f"head_{task}")(features)
            for task, size in zip(self.task_names, self.head_sizes, strict=True)
        )


class FamoTrainState(train_state.TrainState):
    """A ``TrainState`` that also carries FAMO.

    Attributes:
      weighting: FAMO's pure functions (static: not a pytree leaf).
      famo_state: FAMO's state, a pytree saved and restored like the parameters.
      prev_losses: ``(num_tasks,)`` the previous step's training losses (the
        lagged mode's ``prev``).
    """

    weighting: famo_jax.LossWeighting = struct.field(pytree_node=False)
    famo_state: famo_jax.FAMOState
    prev_losses: jax.Array


def create_train_state(
    key: jax.Array,
    *,
    hidden: int = 128,
    learning_rate: float = 1e-3,
    famo_learning_rate: float = 0.025,
    gamma: float = 0.001,
) -> FamoTrainState:
    """Initialises the model, Adam and FAMO (the authors' hyperparameters)."""
    model = MultiHeadMLP(hidden)
    params = model.init(key, jnp.zeros((1, _digits.INPUT_DIM)))["params"]
    weighting = famo_jax.famo(_digits.NUM_TASKS, learning_rate=famo_learning_rate, gamma=gamma)
    return FamoTrainState.create(
        apply_fn=model.apply,
        params=params,
        tx=optax.adam(learning_rate),
        weighting=weighting,
        famo_state=weighting.init(),
        prev_losses=jnp.zeros(_digits.NUM_TASKS),
    )


def _losses(state: FamoTrainState, params: Any, images: jax.Array, digits: jax.Array):
    return _digits.task_losses(state.apply_fn({"params": params}, images), digits)


def _record(
    state: FamoTrainState, losses: jax.Array, famo_state: famo_jax.FAMOState
) -> dict[str, jax.Array]:
    """What the history keeps of a step: losses and the weights that were used."""
    return {
        "losses": losses,
        "task_weights": famo_state.task_weights,
        "loss_weights": famo_jax.loss_weights(state.weighting, losses, famo_state),
    }


@jax.jit
def same_batch_step(
    state: FamoTrainState, images: jax.Array, digits: jax.Array
) -> tuple[FamoTrainState, dict[str, jax.Array]]:
    """One model step on FAMO's weighted loss, then FAMO's same-batch update."""

    def objective(params: Any) -> tuple[jax.Array, jax.Array]:
        losses = _losses(state, params, images, digits)
        return state.weighting.weigh(losses, state.famo_state), losses

    (_, losses), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    new_state = state.apply_gradients(grads=grads)
    # The authors' update: the same batch's losses under the new parameters.
    new_losses = _losses(new_state, new_state.params, images, digits)
    famo_state = state.weighting.update(losses, new_losses, state.famo_state)
    record = _record(state, losses, state.famo_state)
    return new_state.replace(famo_state=famo_state, prev_losses=losses), record


@jax.jit
def lagged_step(
    state: FamoTrainState, images: jax.Array, digits: jax.Array
) -> tuple[FamoTrainState, dict[str, jax.Array]]:
    """FAMO's update from ``state.prev_losses``, then one model step."""

    def objective(params: Any) -> tuple[jax.Array, Any]:
        losses = _losses(state, params, images, digits)
        # FAMO's state must not depend on the parameters: its update only sees
        # the values of the losses.
        observed = jax.lax.stop_gradient(losses)
        famo_state = jax.lax.cond(
            state.step == 0,
            lambda s: s,
            lambda s: state.weighting.update(state.prev_losses, observed, s),
            state.famo_state,
        )
        return state.weighting.weigh(losses, famo_state), (losses, famo_state)

    (_, (losses, famo_state)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    new_state = state.apply_gradients(grads=grads)
    record = _record(state, losses, famo_state)
    return new_state.replace(famo_state=famo_state, prev_losses=losses), record


@jax.jit
def evaluate(
    state: FamoTrainState, images: jax.Array, digits: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Task losses and task metrics (``_digits.METRIC_NAMES``) on a whole split."""
    outputs = state.apply_fn({"params": state.params}, images)
    return _digits.task_losses(outputs, digits), _digits.task_metrics(outputs, digits)


def train(
    mode: str,
    train_split: _digits.Split,
    *,
    steps: int = 1500,
    batch_size: int = 64,
    hidden: int = 128,
    learning_rate: float = 1e-3,
    famo_learning_rate: float = 0.025,
    gamma: float = 0.001,
    seed: int = 0,
    progress: bool = True,
) -> tuple[FamoTrainState, _digits.History]:
    """Trains a fresh model with FAMO in ``mode`` (one of :data:`MODES`).

    Returns:
      The final train state (parameters, optimizer state, FAMO state) and the
      per-step history.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    step_fn = same_batch_step if mode == "same-batch" else lagged_step
    state = create_train_state(
        jax.random.key(seed),
        hidden=hidden,
        learning_rate=learning_rate,
        famo_learning_rate=famo_learning_rate,
        gamma=gamma,
    )
    records = []
    data = _digits.batches(train_split, batch_size, seed=seed)
    bar = tqdm(range(steps), desc=f"linen {mode}", disable=not progress, leave=False)
    for step in bar:
        images, digits = next(data)
        state, record = step_fn(state, images, digits)
        records.append(record)
        if step % 50 == 0 or step == steps - 1:
            bar.set_postfix(losses=np.array2string(np.asarray(record["losses"]), precision=2))
    history = _digits.History(
        **{name: np.stack([np.asarray(r[name]) for r in records]) for name in records[0]}
    )
    return state, history


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Trains both modes, prints per-task test metrics and saves the plot."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--famo-learning-rate", type=float, default=0.025)
    parser.add_argument("--gamma", type=float, default=0.001)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default=None, help="where to save the plot (default: no plot)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--quick", action="store_true", help="tiny setting for tests: 30 steps, hidden 16"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.hidden, args.batch_size = 30, 16, 32
        print("(--quick: a smoke test of 30 steps; the metrics mean nothing.)")

    train_split, test_split = _digits.load_split(seed=args.seed)
    print(
        f"digits: {len(train_split.digits)} train / {len(test_split.digits)} test images, "
        f"tasks {', '.join(_digits.TASK_NAMES)}; {args.steps} Adam steps per mode."
    )
    results: dict[str, Any] = {"metrics": {}, "test_losses": {}, "histories": {}, "states": {}}
    for mode in args.modes:
        state, history = train(
            mode,
            train_split,
            steps=args.steps,
            batch_size=args.batch_size,
            hidden=args.hidden,
            learning_rate=args.learning_rate,
            famo_learning_rate=args.famo_learning_rate,
            gamma=args.gamma,
            seed=args.seed,
            progress=not args.no_progress,
        )
        losses, metrics = evaluate(state, test_split.images, test_split.digits)
        results["test_losses"][mode] = np.asarray(losses)
        results["metrics"][mode] = np.asarray(metrics)
        results["histories"][mode] = history
        results["states"][mode] = state.famo_state
    print("\nTest metrics (accuracy: higher is better; mean_abs_error: lower is better):\n")
    print(_digits.format_table(results["metrics"]))
    print("\nTest losses:\n")
    print(_digits.format_table(results["test_losses"], _digits.LOSS_NAMES))
    for mode, famo_state in results["states"].items():
        weights = np.array2string(np.asarray(famo_state.task_weights), precision=3)
        print(f"\n{mode}: final FAMO task weights {weights}")
    if args.plot:
        _digits.plot_histories(results["histories"], args.plot, title="Flax Linen + FAMO on digits")
        print(f"saved {args.plot}")
    return results


if __name__ == "__main__":
    main()
