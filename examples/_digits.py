"""Five tasks on scikit-learn's handwritten digits, shared by the Flax examples.

The data set ships with scikit-learn (1,797 grey-scale 8x8 images, no download).
Every image gets five targets derived from its digit label, so one shared trunk
feeds five heads whose losses have different kinds and scales:

======  ============================  =======  ===============  ===============
task    target                        outputs  loss             test metric
======  ============================  =======  ===============  ===============
digit   the digit, 10 classes         10       cross-entropy    accuracy
parity  odd digit                     1        logistic         accuracy
ge5     digit >= 5                    1        logistic         accuracy
prime   digit in {2, 3, 5, 7}         1        logistic         accuracy
value   the digit as a number 0..9    1        squared error    mean abs. error
======  ============================  =======  ===============  ===============

At initialisation the squared error of ``value`` is about 30 while the logistic
losses are about 0.7: linear scalarization is dominated by one task, FAMO is
invariant to such scales.

This module holds what both examples share: the data split, the task losses and
metrics (functions of the heads' outputs), a batch iterator and the plot of a
training history. The models and training loops live in the examples.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

TASK_NAMES = ("digit", "parity", "ge5", "prime", "value")
HEAD_SIZES = (10, 1, 1, 1, 1)  # outputs of each task's head
METRIC_NAMES = ("accuracy", "accuracy", "accuracy", "accuracy", "mean_abs_error")
LOSS_NAMES = ("cross_entropy", "logistic", "logistic", "logistic", "squared_error")
NUM_TASKS = len(TASK_NAMES)
INPUT_DIM = 64
PRIMES = (2, 3, 5, 7)


class Split(NamedTuple):
    """Images and digit labels of one split."""

    images: np.ndarray  # (n, 64) float32 in [0, 1]
    digits: np.ndarray  # (n,) int32 in 0..9


class History(NamedTuple):
    """What a training run records at every step (rows are steps)."""

    losses: np.ndarray  # (steps, num_tasks) training-batch task losses
    task_weights: np.ndarray  # (steps, num_tasks) FAMO's softmax(logits) used at the step
    loss_weights: np.ndarray  # (steps, num_tasks) effective weights of the losses


def load_split(test_fraction: float = 0.2, seed: int = 0) -> tuple[Split, Split]:
    """Returns a fixed, shuffled (train, test) split of scikit-learn's digits."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.data / 16.0).astype(np.float32)
    digits = data.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(digits))
    num_test = int(round(test_fraction * len(digits)))
    test, train = order[:num_test], order[num_test:]
    return Split(images[train], digits[train]), Split(images[test], digits[test])


def targets(digits: jax.Array) -> tuple[jax.Array, ...]:
    """The five targets of :data:`TASK_NAMES` for integer digit labels."""
    digits = jnp.asarray(digits)
    return (
        digits,
        (digits % 2).astype(jnp.float32),
        (digits >= 5).astype(jnp.float32),
        jnp.isin(digits, jnp.asarray(PRIMES)).astype(jnp.float32),
        digits.astype(jnp.float32),
    )


def task_losses(outputs: Sequence[jax.Array], digits: jax.Array) -> jax.Array:
    """Mean loss of every task over the batch, shape ``(num_tasks,)``.

    Args:
      outputs: the heads' outputs, shapes ``(batch, s)`` for ``s`` in
        :data:`HEAD_SIZES`.
      digits: ``(batch,)`` integer labels.
    """
    digit, parity, ge5, prime, value = targets(digits)
    logits_digit, logit_parity, logit_ge5, logit_prime, prediction = (
        o.astype(jnp.float32) for o in outputs
    )
    return jnp.stack(
        [
            jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits_digit, digit)),
            jnp.mean(optax.sigmoid_binary_cross_entropy(logit_parity[:, 0], parity)),
            jnp.mean(optax.sigmoid_binary_cross_entropy(logit_ge5[:, 0], ge5)),
            jnp.mean(optax.sigmoid_binary_cross_entropy(logit_prime[:, 0], prime)),
            jnp.mean((prediction[:, 0] - value) ** 2),
        ]
    )


def task_metrics(outputs: Sequence[jax.Array], digits: jax.Array) -> jax.Array:
    """Test metric of every task (see :data:`METRIC_NAMES`), shape ``(num_tasks,)``."""
    digit, parity, ge5, prime, value = targets(digits)
    logits_digit, logit_parity, logit_ge5, logit_prime, prediction = outputs
    return jnp.stack(
        [
            jnp.mean(jnp.argmax(logits_digit, axis=-1) == digit),
            jnp.mean((logit_parity[:, 0] > 0) == (parity > 0.5)),
            jnp.mean((logit_ge5[:, 0] > 0) == (ge5 > 0.5)),
            jnp.mean((logit_prime[:, 0] > 0) == (prime > 0.5)),
            jnp.mean(jnp.abs(prediction[:, 0] - value)),
        ]
    )


def batches(split: Split, batch_size: int, seed: int = 0) -> Iterator[tuple[np.ndarray, ...]]:
    """Endless shuffled mini-batches ``(images, digits)``, reshuffled every epoch.

    Incomplete final batches are dropped so every step has the same shapes (one
    compilation).
    """
    if not 0 < batch_size <= len(split.digits):
        raise ValueError(f"batch_size must be in [1, {len(split.digits)}], got {batch_size}.")
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(split.digits))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[start : start + batch_size]
            yield split.images[idx], split.digits[idx]


def format_table(
    metrics: Mapping[str, np.ndarray], metric_names: Sequence[str] = METRIC_NAMES
) -> str:
    """A markdown table of per-task values: one row per task, one column per run."""
    runs = list(metrics)
    lines = [
        f"| task   | metric         | {' | '.join(f'{r:>14}' for r in runs)} |",
        f"|--------|----------------|{'|'.join('-' * 16 for _ in runs)}|",
    ]
    for i, (task, metric) in enumerate(zip(TASK_NAMES, metric_names, strict=True)):
        cells = " | ".join(f"{float(metrics[r][i]):14.4f}" for r in runs)
        lines.append(f"| {task:<6} | {metric:<14} | {cells} |")
    return "\n".join(lines)


def plot_histories(histories: Mapping[str, History], path: str, title: str = "") -> None:
    """Saves a figure: one row per run; task losses, FAMO weights, loss weights.

    Uses matplotlib's non-interactive Agg backend, so it works without a display.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(histories)
    fig, axes = plt.subplots(len(runs), 3, figsize=(15, 3.6 * len(runs)), squeeze=False)
    for row, run in enumerate(runs):
        history = histories[run]
        steps = np.arange(1, len(history.losses) + 1)
        panels = (
            (history.losses, "training task loss", True),
            (history.task_weights, "FAMO task weights z = softmax(logits)", False),
            (history.loss_weights, "effective loss weights w = d weigh / d losses", True),
        )
        for col, (values, label, log_scale) in enumerate(panels):
            ax = axes[row, col]
            for i, task in enumerate(TASK_NAMES):
                ax.plot(steps, _smooth(values[:, i]), label=task, linewidth=1.2)
            if log_scale:
                ax.set_yscale("log")
            ax.set_title(f"{run}: {label}", fontsize=10)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        axes[row, 0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _smooth(values: np.ndarray, window: int = 25) -> np.ndarray:
    """Trailing moving average (mini-batch losses are noisy); identity if short."""
    window = min(window, len(values))
    if window <= 1:
        return values
    kernel = np.ones(window) / window
    head = np.cumsum(values[: window - 1]) / np.arange(1, window)
    return np.concatenate([head, np.convolve(values, kernel, mode="valid")])
