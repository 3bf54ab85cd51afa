"""Generates the FAMO parity fixtures from the PyTorch reference (``famo_torch.py``).

Run from the repository root, with torch installed (it is not a test dependency)::

    python tests/reference/make_fixtures.py

It writes ``tests/reference/fixtures/famo_k{K:03d}.npz`` for K in {2, 3, 11, 40, 100},
one trajectory of ``NUM_STEPS`` steps for every (gamma, min_losses) pair in
``CONFIGS[K]`` and both reference precisions (``f32``: torch default dtype
float32, ``f64``: float64). With ``mins`` = ``m0`` (zero ``min_losses``) or
``m1`` (non-zero) and ``j`` the index of gamma in ``GAMMAS``, a file holds

* ``{mins}_losses``: ``(NUM_STEPS + 1, K)`` float32, the loss sequence ``l_0..l_T``;
* ``{mins}_min_losses``: ``(K,)`` float32, the lower bounds ``m``;

and the per-step records of the authors' protocol
``weigh(l_t) -> record -> update(l_t, l_{t+1}) -> record``:

* ``{mins}_g{j}_{prec}_loss``: ``(NUM_STEPS,)`` the weighted loss at ``l_t``;
* ``{mins}_g{j}_{prec}_grad``: ``(NUM_STEPS, K)`` its gradient w.r.t. ``l_t``
  (``torch.autograd``), i.e. the effective weights ``c z / D``;
* ``{mins}_g{j}_{prec}_logits``: ``(NUM_STEPS, K)`` the logits after the update;
* ``{mins}_g{j}_{prec}_weights``: ``(NUM_STEPS, K)`` ``softmax`` of those logits.

Records are stored in the precision they were computed in.

The inputs are stored rather than regenerated at test time (NumPy does not
promise stable random streams across versions), and they are float32 values so
that the float32 and the float64 runs see exactly the same numbers; the float64
runs still compute everything in float64.
"""

from __future__ import annotations

import pathlib

import numpy as np
import torch
from famo_torch import FamoReference

NUM_TASKS = (2, 3, 11, 40, 100)
GAMMAS = (0.0, 1e-3, 1e-2)
# (gamma, non-zero min_losses) pairs run for each K. The full grid for K <= 11;
# for K = 40 and 100 (most of the bytes) a subset that still covers every gamma
# and both min_losses settings, which keeps the fixtures under ~15 MB.
FULL_GRID = tuple((gamma, nonzero) for nonzero in (False, True) for gamma in GAMMAS)
CONFIGS = {
    2: FULL_GRID,
    3: FULL_GRID,
    11: FULL_GRID,
    40: ((0.0, True), (1e-3, False), (1e-2, True)),
    100: ((0.0, False), (1e-3, True)),
}
LEARNING_RATE = 0.025
NUM_STEPS = 1000
SEED = 20231210
FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"


def make_losses(rng: np.random.Generator, num_tasks: int, nonzero_min: bool):
    """Noisy, mostly decreasing loss sequences whose scales span 1e-3..1e3.

    Per task, ``log(l - m)`` is a random walk: a downward drift (a factor e^-1
    to e^-6 over the run), Gaussian noise (so many single steps increase), a
    window of sustained increase for about a third of the tasks, and rare
    transient spikes (up by e^0.5..e^2.5 for one step). The
    initial gaps ``l_0 - m`` are spread log-uniformly over six orders of
    magnitude. With ``nonzero_min``, ``m`` is drawn in ``[-2, 2]`` times the
    task's scale (negative bounds occur, as in the paper's toy problem).
    """
    scales = rng.permutation(10.0 ** np.linspace(-3.0, 3.0, num_tasks))
    drift = rng.uniform(1.0 / NUM_STEPS, 6.0 / NUM_STEPS, num_tasks)
    noise = rng.uniform(0.002, 0.03, num_tasks)
    steps = -drift + noise * rng.standard_normal((NUM_STEPS, num_tasks))
    for task in np.flatnonzero(rng.random(num_tasks) < 1 / 3):
        start, length = rng.integers(0, NUM_STEPS - 200), rng.integers(50, 200)
        steps[start : start + length, task] += rng.uniform(0.5, 1.5) / length
    # Transient spikes: up at one step, back down at the next.
    spikes = (rng.random((NUM_STEPS, num_tasks)) < 2e-3) * rng.uniform(
        0.5, 2.5, (NUM_STEPS, num_tasks)
    )
    steps += spikes - np.concatenate([np.zeros((1, num_tasks)), spikes[:-1]])
    log_gaps = np.concatenate([np.zeros((1, num_tasks)), np.cumsum(steps, axis=0)])
    gaps = scales * np.exp(log_gaps)
    if nonzero_min:
        min_losses = (scales * rng.uniform(-2.0, 2.0, num_tasks)).astype(np.float32)
    else:
        min_losses = np.zeros(num_tasks, np.float32)
    losses = (min_losses.astype(np.float64) + gaps).astype(np.float32)
    # Rounding to float32 must keep every loss clearly above its bound.
    margin = (losses - min_losses) / np.maximum(np.abs(min_losses), gaps.min())
    assert np.all(margin > 1e-4), margin.min()
    return losses, min_losses


def run_reference(losses: np.ndarray, min_losses: np.ndarray, gamma: float, dtype):
    """Runs Algorithm 2 along ``losses`` and returns the per-step records."""
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        reference = FamoReference(losses.shape[1], min_losses, lr=LEARNING_RATE, gamma=gamma)
        sequence = torch.as_tensor(losses, dtype=dtype)
        records = {"loss": [], "grad": [], "logits": [], "weights": []}
        for step in range(NUM_STEPS):
            prev = sequence[step].clone().requires_grad_(True)
            weighted = reference.get_weighted_loss(prev)
            (grad,) = torch.autograd.grad(weighted, prev)
            records["loss"].append(weighted.detach().numpy())
            records["grad"].append(grad.numpy())
            reference.update(prev.detach(), sequence[step + 1])
            records["logits"].append(reference.logits.numpy().copy())
            records["weights"].append(torch.softmax(reference.logits, -1).numpy())
        return {name: np.stack(values) for name, values in records.items()}
    finally:
        torch.set_default_dtype(previous_dtype)


def main() -> None:
    FIXTURES.mkdir(exist_ok=True)
    torch.use_deterministic_algorithms(True)
    for num_tasks in NUM_TASKS:
        rng = np.random.default_rng([SEED, num_tasks])
        arrays = {
            "gammas": np.asarray(GAMMAS),
            "learning_rate": np.asarray(LEARNING_RATE),
        }
        for mins, nonzero_min in (("m0", False), ("m1", True)):
            # Both loss sequences are drawn for every K, so each sequence does not
            # depend on which configurations are run.
            losses, min_losses = make_losses(rng, num_tasks, nonzero_min)
            gammas = [g for g, nonzero in CONFIGS[num_tasks] if nonzero == nonzero_min]
            if not gammas:
                continue
            arrays[f"{mins}_losses"] = losses
            arrays[f"{mins}_min_losses"] = min_losses
            for gamma in gammas:
                j = GAMMAS.index(gamma)
                for prec, dtype in (("f32", torch.float32), ("f64", torch.float64)):
                    records = run_reference(losses, min_losses, gamma, dtype)
                    for name, value in records.items():
                        arrays[f"{mins}_g{j}_{prec}_{name}"] = value
        path = FIXTURES / f"famo_k{num_tasks:03d}.npz"
        np.savez_compressed(path, **arrays)
        print(f"{path.name}: {path.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
