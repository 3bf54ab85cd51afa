"""Flax NNX: a shared trunk with five task heads on scikit-learn's digits, trained with FAMO.

The model is an ``nnx.Module`` (an MLP trunk and one linear head per task, see
``_digits.py`` for the five tasks); its parameters are trained by
``nnx.Optimizer(model, optax.adam(...), wrt=nnx.Param)`` on FAMO's weighted
loss. FAMO is a ``famo_jax.nnx.Weighting``: an NNX object, like the optimizer,
whose state (a ``famo_jax.FAMOState``) is NNX state updated in place inside the
``nnx.jit``-compiled step.

Two ways of calling ``update``:

- ``same-batch`` (the authors'): after the model step the same batch's task
  losses are re-computed under the new parameters (one extra forward pass, no
  gradient) and ``update(losses_before, losses_after)`` is called;
- ``lagged`` (no extra forward pass): after the model step on ``losses_t``,
  ``update(losses_{t-1}, losses_t)`` compares the losses of two consecutive
  steps (on two different batches). Step 0 has no predecessor: the previous
  losses start at NaN, so FAMO skips that update by its rule for non-finite
  losses, without a branch.

Each run shows a tqdm progress bar; the script prints the per-task test metrics
of both modes and, with ``--plot PATH``, saves a plot of the task losses and weights.

Run: ``python examples/flax_nnx_multitask.py`` (about a minute on 2 CPU cores)
or ``python examples/flax_nnx_multitask.py --quick`` (seconds).
"""

from __future__ import annotations

import argparse
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

import famo_jax
import famo_jax.nnx

if __package__:
    from . import _digits
else:  # run as a script: this file's directory is on sys.path
    import _digits

MODES = ("same-batch", "lagged")


class MultiHeadMLP(nnx.Module):
    """A shared MLP trunk and one linear head per task."""

    def __init__(
        self,
        hidden: int = 128,
        head_sizes: tuple[int, ...] = _digits.HEAD_SIZES,
        input_dim: int = _digits.INPUT_DIM,
        *,
        rngs: nnx.Rngs,
    ) -> None:
        self.trunk = nnx.Sequential(
            nnx.Linear(input_dim, hidden, rngs=rngs),
            nnx.relu,
            nnx.Linear(hidden, hidden, rngs=rngs),
            nnx.relu,
        )
        self.heads = nnx.List([nnx.Linear(hidden, size, rngs=rngs) for size in head_sizes])

    def __call__(self, images: jax.Array) -> tuple[jax.Array, ...]:
        """Returns every head's output, ``(batch, head_size)`` each."""
        features = self.trunk(images)
        return tuple(head(features) for head in self.heads)


def _record(weighting: famo_jax.nnx.Weighting, losses: jax.Array) -> dict[str, jax.Array]:
    """What the history keeps of a step: losses and the weights that were used."""
    return {
        "losses": losses,
        "task_weights": weighting.task_weights,
        "loss_weights": weighting.loss_weights(losses),
    }


def _weighted_step(
    model: MultiHeadMLP,
    optimizer: nnx.Optimizer,
    weighting: famo_jax.nnx.Weighting,
    images: jax.Array,
    digits: jax.Array,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """One model step on FAMO's weighted loss; returns the losses and the record."""

    def objective(model: MultiHeadMLP) -> tuple[jax.Array, jax.Array]:
        losses = _digits.task_losses(model(images), digits)
        return weighting(losses), losses

    (_, losses), grads = nnx.value_and_grad(objective, has_aux=True)(model)
    record = _record(weighting, losses)
    optimizer.update(model, grads)
    return losses, record


@nnx.jit
def same_batch_step(
    model: MultiHeadMLP,
    optimizer: nnx.Optimizer,
    weighting: famo_jax.nnx.Weighting,
    images: jax.Array,
    digits: jax.Array,
) -> dict[str, jax.Array]:
    """One model step on FAMO's weighted loss, then FAMO's same-batch update."""
    losses, record = _weighted_step(model, optimizer, weighting, images, digits)
    # The authors' update: the same batch's losses under the new parameters.
    weighting.update(losses, _digits.task_losses(model(images), digits))
    return record


@nnx.jit
def lagged_step(
    model: MultiHeadMLP,
    optimizer: nnx.Optimizer,
    weighting: famo_jax.nnx.Weighting,
    prev_losses: jax.Array,
    images: jax.Array,
    digits: jax.Array,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """One model step, then FAMO's update from the previous step's losses to these.

    Returns this step's losses (the next step's ``prev_losses``) and the record.
    """
    losses, record = _weighted_step(model, optimizer, weighting, images, digits)
    weighting.update(prev_losses, losses)
    return losses, record


@nnx.jit
def evaluate(model: MultiHeadMLP, images: jax.Array, digits: jax.Array) -> tuple[jax.Array, ...]:
    """Task losses and task metrics (``_digits.METRIC_NAMES``) on a whole split."""
    outputs = model(images)
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
) -> tuple[MultiHeadMLP, famo_jax.FAMOState, _digits.History]:
    """Trains a fresh model with FAMO in ``mode`` (one of :data:`MODES`).

    Returns:
      The trained model, FAMO's final state and the per-step history.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    model = MultiHeadMLP(hidden, rngs=nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, optax.adam(learning_rate), wrt=nnx.Param)
    weighting = famo_jax.nnx.famo(_digits.NUM_TASKS, learning_rate=famo_learning_rate, gamma=gamma)
    prev_losses = jnp.full(_digits.NUM_TASKS, jnp.nan)  # step 0 has no predecessor
    records = []
    data = _digits.batches(train_split, batch_size, seed=seed)
    bar = tqdm(range(steps), desc=f"nnx {mode}", disable=not progress, leave=False)
    for step in bar:
        images, digits = next(data)
        if mode == "same-batch":
            record = same_batch_step(model, optimizer, weighting, images, digits)
        else:
            prev_losses, record = lagged_step(
                model, optimizer, weighting, prev_losses, images, digits
            )
        records.append(record)
        if step % 50 == 0 or step == steps - 1:
            bar.set_postfix(losses=np.array2string(np.asarray(record["losses"]), precision=2))
    history = _digits.History(
        **{name: np.stack([np.asarray(r[name]) for r in records]) for name in records[0]}
    )
    return model, weighting.value, history


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
        model, famo_state, history = train(
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
        losses, metrics = evaluate(model, test_split.images, test_split.digits)
        results["test_losses"][mode] = np.asarray(losses)
        results["metrics"][mode] = np.asarray(metrics)
        results["histories"][mode] = history
        results["states"][mode] = famo_state
    print("\nTest metrics (accuracy: higher is better; mean_abs_error: lower is better):\n")
    print(_digits.format_table(results["metrics"]))
    print("\nTest losses:\n")
    print(_digits.format_table(results["test_losses"], _digits.LOSS_NAMES))
    for mode, state in results["states"].items():
        weights = np.array2string(np.asarray(state.task_weights), precision=3)
        print(f"\n{mode}: final FAMO task weights {weights}")
    if args.plot:
        _digits.plot_histories(results["histories"], args.plot, title="Flax NNX + FAMO on digits")
        print(f"saved {args.plot}")
    return results


if __name__ == "__main__":
    main()
