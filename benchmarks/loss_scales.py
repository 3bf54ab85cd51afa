"""Loss scales: a SYNTHETIC 11-target regression benchmark with very different loss scales.

This is not QM9 and involves no molecules. It imitates the property of QM9
that the FAMO paper (Table 2) says makes it hard for multitask methods: eleven
regression targets of one shared input whose losses differ by orders of
magnitude, so the average loss is dominated by a few targets. The targets are
named after the QM9 properties whose role they play; their values are made up.

Data: inputs ``x ~ N(0, I_16)`` (standing for molecular descriptors). Each
target is ``y_j = std_j * (sqrt(1 - noise_j**2) * f_j(x) + noise_j * eps)``
where ``f_j`` (unit variance) mixes features shared by all targets
(``tanh(x W) a_j``) with a target-specific random two-layer network, the four
energy-like targets (``u0``, ``u``, ``h``, ``g``) share most of their
function as in QM9, and ``eps ~ N(0, 1)``. The target scales ``std_j`` run
from 0.02 to 10, so the mean squared errors (the training losses; their
scale is ``std_j**2``) span more than five orders of magnitude, at
initialisation and after training. Metric: mean absolute error (MAE) in the
targets' units. The heads start at zero, so every method starts from the
losses ``E[y_j**2] ~ std_j**2``.

Run (the tables in ``docs/benchmarks/loss_scales.md``)::

    python -m benchmarks.loss_scales --out DIR   # full settings
    python -m benchmarks.loss_scales --quick     # seconds; used by the tests
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from benchmarks import _mtl_bench as mtl

TASK_NAMES = ("mu", "alpha", "homo", "lumo", "r2", "zpve", "u0", "u", "h", "g", "cv")
# Scale (standard deviation) of each target.
TARGET_STD = np.array([1.5, 8.0, 0.02, 0.05, 10.0, 0.03, 4.0, 4.0, 4.0, 4.0, 3.0])
# Fraction of each target's variance that is noise (irreducible), squared-rooted.
NOISE = np.array([0.15, 0.05, 0.10, 0.10, 0.05, 0.05, 0.02, 0.02, 0.02, 0.02, 0.05])
# Fraction of each target's signal variance explained by the shared features.
SHARED = np.array([0.3, 0.6, 0.2, 0.2, 0.6, 0.4, 0.5, 0.5, 0.5, 0.5, 0.6])
ENERGY_TASKS = (6, 7, 8, 9)  # u0, u, h, g: nearly the same function, as in QM9
INPUT_DIM = 16
SHARED_FEATURES = 24
SPECIFIC_WIDTH = 6
DOCS_PATH = os.path.join(os.path.dirname(__file__), "..", "docs", "benchmarks", "loss_scales.md")


def _standardize(values: np.ndarray) -> np.ndarray:
    return (values - values.mean(axis=0)) / values.std(axis=0)


def make_targets(rng: np.random.Generator, x: np.ndarray) -> np.ndarray:
    """``(n, 11)`` float64 targets of inputs ``x`` (see the module docstring).

    The random functions are drawn from ``rng`` first (the same for every
    ``x`` given the same generator state), then the noise.
    """
    n = x.shape[0]
    k = len(TASK_NAMES)
    w_shared = rng.normal(size=(INPUT_DIM, SHARED_FEATURES)) * 1.5 / np.sqrt(INPUT_DIM)
    b_shared = rng.normal(size=SHARED_FEATURES) * 0.5
    readout = rng.normal(size=(SHARED_FEATURES, k))
    w_specific = rng.normal(size=(k, INPUT_DIM, SPECIFIC_WIDTH)) * 2.0 / np.sqrt(INPUT_DIM)
    c_specific = rng.normal(size=(k, SPECIFIC_WIDTH))
    energy_readout = rng.normal(size=SHARED_FEATURES)
    energy_w = rng.normal(size=(INPUT_DIM, SPECIFIC_WIDTH)) * 2.0 / np.sqrt(INPUT_DIM)
    energy_c = rng.normal(size=SPECIFIC_WIDTH)

    features = np.tanh(x @ w_shared + b_shared)
    shared_part = _standardize(features @ readout)
    specific_part = _standardize(
        np.einsum("nkw,kw->nk", np.tanh(np.einsum("nd,kdw->nkw", x, w_specific)), c_specific)
    )
    signal = np.sqrt(SHARED) * shared_part + np.sqrt(1.0 - SHARED) * specific_part
    # The energy-like targets: one common function plus 5% of their own.
    energy = _standardize(
        np.sqrt(0.5) * _standardize(features @ energy_readout)[:, None]
        + np.sqrt(0.5) * _standardize(np.tanh(x @ energy_w) @ energy_c)[:, None]
    )[:, 0]
    for j in ENERGY_TASKS:
        signal[:, j] = np.sqrt(0.95) * energy + np.sqrt(0.05) * _standardize(signal[:, j])
    signal = _standardize(signal)
    noise = rng.normal(size=(n, k))
    return TARGET_STD * (np.sqrt(1.0 - NOISE**2) * signal + NOISE * noise)


def load_loss_scales(
    num_train: int = 6000, num_val: int = 1000, num_test: int = 2000, data_seed: int = 0
) -> mtl.Benchmark:
    """Builds the synthetic loss-scales benchmark (deterministic given the arguments).

    Args:
      num_train, num_val, num_test: examples per split (drawn together, so the
        target functions and their normalisation are shared by the splits).
      data_seed: seed of the random functions, inputs and noise.

    Returns:
      A :class:`benchmarks._mtl_bench.Benchmark` of kind ``"regression"``.
    """
    rng = np.random.default_rng(data_seed)
    n = num_train + num_val + num_test
    x = rng.normal(size=(n, INPUT_DIM))
    y = make_targets(rng, x)
    x, y = x.astype(np.float32), y.astype(np.float32)
    cut1, cut2 = num_train, num_train + num_val
    scales = ", ".join(f"{name} {std:g}" for name, std in zip(TASK_NAMES, TARGET_STD, strict=True))
    description = (
        "Loss scales (SYNTHETIC stress test, not QM9): 11 regression targets of a shared 16-dim "
        "Gaussian input, each a mix of shared and target-specific random nonlinear "
        "functions plus noise; the energy-like targets u0, u, h, g share 95% of their "
        f"function. Target scales (std): {scales}; the mean squared errors that are "
        "trained on therefore span more than five orders of magnitude. Metric: MAE in "
        "the targets' units (lower is better). Training loss: MSE on the raw targets "
        "(no standardisation, so the loss scales differ as in the setting the FAMO "
        "paper targets); the heads start at zero."
    )
    return mtl.Benchmark(
        name="loss-scales",
        task_names=TASK_NAMES,
        kind="regression",
        num_classes=1,
        x_train=x[:cut1],
        y_train=y[:cut1],
        x_val=x[cut1:cut2],
        y_val=y[cut1:cut2],
        x_test=x[cut2:],
        y_test=y[cut2:],
        description=description,
    )


FULL = dict(num_train=6000, num_val=1000, num_test=2000)
QUICK = dict(num_train=512, num_val=128, num_test=128)


def main(argv: list[str] | None = None) -> mtl.Summary:
    """Runs the loss-scales comparison and prints (and optionally writes) the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mtl.add_common_arguments(parser, DOCS_PATH)
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv

    cfg = mtl.TrainConfig(
        hidden=(32,) if args.quick else (128, 128),
        epochs=args.epochs or (2 if args.quick else 40),
        batch_size=64 if args.quick else 128,
        learning_rate=args.lr or 1e-3,  # the authors' model lr on QM9
        num_seeds=args.seeds or (2 if args.quick else 3),
        zero_init_heads=True,
        compile_options=mtl.QUICK_COMPILE_OPTIONS if args.quick else None,
        task_gradients=args.gradients,
    )
    command = " ".join(["python -m benchmarks.loss_scales", *argv])
    clock = mtl.RunClock()
    bench = load_loss_scales(**(QUICK if args.quick else FULL))
    summary = mtl.run_benchmark(
        bench, cfg, args.methods, args.gamma, ablation_gammas=mtl.ablation_gammas(args)
    )
    text = (
        mtl.report(summary, command, "Loss scales (synthetic stress test)")
        + f"\n\n{clock.summary()}\n"
    )
    print("\n" + text)
    mtl.write_markdown(args, DOCS_PATH, "Loss scales (synthetic stress test)", text)
    return summary


if __name__ == "__main__":
    main()
