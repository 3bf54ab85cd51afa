"""The FAMO paper's QM9 benchmark (Table 2) on real molecules, at CPU scale.

Run::

    pip install -e ".[qm9,examples]"
    nice python -m benchmarks.qm9                       # every row, 5 seeds
    python -m benchmarks.qm9 --quick                    # smoke test, about a minute
    python -m benchmarks.qm9 --methods STL LS SI FAMO   # some rows (STL is always run)

The first run reads qm9pack's CSV files and writes a cache (about 20 s, 26 MB,
see ``--cache``); later runs load it in under a second. Results go to
``--out DIR`` (default: a new temporary directory): ``qm9.md`` (the tables
and settings) and ``qm9_results.npz`` (every run's per-epoch numbers).

See :mod:`benchmarks.qm9.data` (targets, graphs, split),
:mod:`benchmarks.qm9.model` (the network), :mod:`benchmarks.qm9.train`
(training and model selection) and :mod:`benchmarks.qm9.report` (Δm%, MR).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence

import jax
import numpy as np

import famo_jax
from benchmarks._mtl_bench import Method, method_registry
from benchmarks.qm9 import data as qm9_data
from benchmarks.qm9 import report
from benchmarks.qm9.train import (
    QUICK_COMPILE_OPTIONS,
    TASK_GRADIENTS,
    QM9Config,
    RowResult,
    Trainer,
    make_splits,
)

# The settings of the full run (docs/benchmarks/qm9.md explains the choice).
# CPU scale (docs/benchmarks/qm9.md): the authors train dim 64 on 110,831
# molecules for 300 epochs at batch 120; every row x 5 seeds has to fit in
# about 45 minutes of 2 shared cores here, where an O(k) aggregator or STL
# costs 15-20x an LS epoch.
FULL = QM9Config(
    num_train=3_000,
    num_val=1_000,
    num_test=2_000,
    dim=16,
    edge_hidden=16,
    epochs=10,
    batch_size=64,
    learning_rate=4e-3,
)
QUICK = QM9Config(
    num_train=256,
    num_val=128,
    num_test=128,
    dim=16,
    edge_hidden=16,
    epochs=2,
    batch_size=32,
    num_seeds=2,
    eval_batch=128,
    compile_options=QUICK_COMPILE_OPTIONS,
)
# A first full run with the grid (1e-3, 2e-3, 4e-3) and 2e-3 for the other
# rows had LS choose 4e-3, the grid's edge (validation Δm% +101, +71, +38):
# 10 short epochs want a large step, so the grid is centred on 4e-3.
# The learning-rate grid, and the rows that get it by default: the two honest
# baselines (Xin et al. 2022; Kurin et al. 2022). Every other row trains at
# the grid's middle value; any row can get the grid with --grid-methods, but
# the grid for all rows x 5 seeds does not fit the time budget (an O(k)
# aggregator costs 15-20x LS per grid point).
LR_GRID = (2e-3, 4e-3, 8e-3)
GRID_ROWS = ("LS", "SI")
ABLATION_GAMMAS = (0.0, 1e-2)
QUICK_ROWS = ("STL", "LS", "FAMO", "PCGrad")


def famo_variants(gamma: float, famo_lr: float) -> dict[str, Method]:
    """FAMO same-batch and lagged at decay ``gamma`` (rows of the γ ablation)."""
    build = lambda k, key: famo_jax.famo(k, learning_rate=famo_lr, gamma=gamma)
    same, lagged = f"FAMO (γ={gamma:g})", f"FAMO-lagged (γ={gamma:g})"
    return {
        same: Method(same, "weighting", build, "same_batch"),
        lagged: Method(lagged, "weighting", build, "lagged"),
    }


def _trunk_last_dense(tree):
    """True for the leaves of the MPNN trunk's last Dense layer (named ``dense``)."""
    keys = lambda path: [getattr(entry, "key", None) for entry in path]
    return jax.tree_util.tree_map_with_path(lambda p, _: "dense" in keys(p), tree)


def rows_to_run(
    names: Sequence[str] | None, gamma: float, famo_lr: float, ablation: Sequence[float]
) -> dict[str, Method]:
    registry = method_registry(gamma, famo_lr)
    # Every row of the registry (the library's methods) by default.
    names = list(names) if names else list(registry)
    missing = [n for n in names if n not in registry]
    if missing:
        raise SystemExit(f"unknown or unavailable rows {missing}; known: {list(registry)}")
    if "STL" not in names:
        names.insert(0, "STL")  # the baseline of Δm% and of the model selection
    rows = {n: registry[n] for n in names}
    if "GradNorm" in rows:
        # GradNorm's last shared layer: the registry's rule finds an MLP's last
        # Dense_i; the MPNN trunk's last layer is the Dense named "dense".
        rows["GradNorm"] = dataclasses.replace(
            rows["GradNorm"],
            build=lambda k, key, ctx: famo_jax.gradnorm(
                k,
                learning_rate=ctx.learning_rate,
                last_shared_layer=_trunk_last_dense,
                warmup_steps=ctx.steps_per_epoch,
            ),
        )
    if "FAMO" in rows or "FAMO-lagged" in rows:
        for g in ablation:
            if g != gamma:
                rows.update(famo_variants(g, famo_lr))
    return rows


class Progress:
    """Per-epoch lines or a tqdm bar for one row."""

    def __init__(self, mode: str, name: str, epochs: int, summary_ref):
        self.mode, self.name, self.epochs, self.summary = mode, name, epochs, summary_ref
        self.bar = None
        if mode == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=epochs, desc=f"{name:<22}", leave=False)

    def __call__(self, epoch: int, seconds: float, outputs) -> None:
        val_mae = outputs[0]  # (runs, k) or STL (runs, models, k)
        if val_mae.ndim == 3:
            val_mae = np.diagonal(val_mae, axis1=1, axis2=2)
        baseline = self.summary()
        text = f"{seconds:5.1f} s/epoch"
        if baseline is not None:
            dm = 100.0 * (np.mean(val_mae / baseline, axis=-1) - 1.0)
            text += f", val Δm% {np.mean(dm):+7.1f} (runs {np.min(dm):+.1f}..{np.max(dm):+.1f})"
        if self.bar is not None:
            self.bar.set_postfix_str(text)
            self.bar.update(1)
            if epoch + 1 == self.epochs:
                self.bar.close()
        elif self.mode == "lines":
            print(f"  {self.name:<22} epoch {epoch + 1:>3}/{self.epochs}  {text}", flush=True)


def machine_text() -> str:
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, {jax.device_count()} "
        f"{jax.devices()[0].platform} device(s), Python {platform.python_version()}, "
        f"jax {jax.__version__}"
    )


def run(args: argparse.Namespace, argv: Sequence[str]) -> report.QM9Summary:
    wall, cpu, load_start = time.perf_counter(), time.process_time(), os.getloadavg()
    base = QUICK if args.quick else FULL
    overrides = {
        "epochs": args.epochs,
        "num_seeds": args.seeds,
        "num_train": args.num_train,
        "dim": args.dim,
        "batch_size": args.batch_size,
        "learning_rate": args.lr,
    }
    cfg = dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})
    ablation = (
        ()
        if args.quick and args.ablation_gammas is None
        else (ABLATION_GAMMAS if args.ablation_gammas is None else tuple(args.ablation_gammas))
    )
    methods = rows_to_run(
        args.methods or (QUICK_ROWS if args.quick else None), args.gamma, args.famo_lr, ablation
    )
    lr_grid = (
        tuple(args.lr_grid)
        if args.lr_grid is not None
        else ((1e-3, 2e-3) if args.quick else LR_GRID)
    )
    grid_rows = (
        set(args.grid_methods)
        if args.grid_methods is not None
        else ({"LS"} if args.quick else set(GRID_ROWS))
    )
    if "all" in grid_rows:
        grid_rows = set(methods)
    grid = {n: (lr_grid if n in grid_rows else (cfg.learning_rate,)) for n in methods}

    molecules, cache_path = qm9_data.load_qm9(args.cache)
    splits = make_splits(molecules, cfg)
    label = "SMOKE TEST (--quick): tiny slice, 2 epochs; not a result. " if args.quick else ""
    print(
        f"{label}QM9 from {cache_path} ({molecules.num_molecules} molecules, data "
        f"{qm9_data.fingerprint(molecules)}): {cfg.num_train} train / {cfg.num_val} val / "
        f"{cfg.num_test} test; {len(methods)} rows x {cfg.num_seeds} seeds; {machine_text()}; "
        f"load {load_start[0]:.1f}",
        flush=True,
    )
    trainer = Trainer(splits, cfg, args.gradients)
    summary = report.QM9Summary(cfg, {}, grid, args.famo_lr, args.gamma)
    mode = args.progress
    if mode == "auto":
        try:
            import tqdm  # noqa: F401

            mode = "bar" if sys.stderr.isatty() else "lines"
        except ImportError:
            mode = "lines"
    baseline = lambda: summary.stl_val_baseline if "STL" in summary.rows else None
    out = args.out or tempfile.mkdtemp(prefix="famo_jax_qm9_")
    os.makedirs(out, exist_ok=True)
    command = " ".join(["python -m benchmarks.qm9", *argv])
    for directory in args.reuse_from or ():
        path = os.path.join(directory, "qm9_results.npz")
        reused = []
        for name in saved_rows(path):
            if name not in methods or name in summary.rows:
                continue
            row = load_row(path, name, cfg)
            # A row is reused only with the learning rates it would be trained
            # with, and (aggregators) the same task-gradient path (--gradients).
            saved_lrs, wanted = np.unique(row.learning_rates), np.sort(grid[name])
            same_lrs = saved_lrs.shape == wanted.shape and np.allclose(saved_lrs, wanted, rtol=1e-6)
            # Aggregator rows saved before --gradients existed used jacrev.
            saved_gradients = row.task_gradients or (
                "jacrev" if methods[name].family == "aggregator" else None
            )
            same_gradients = args.reuse_either_gradients or (
                saved_gradients == trainer.gradients_for(methods[name])
            )
            if same_lrs and same_gradients:
                summary.rows[name] = row._replace(task_gradients=saved_gradients)
                reused.append(name)
        print(f"rows from {path} (same settings): {', '.join(reused)}", flush=True)
    # STL first (every other row's selection needs its validation MAE), then
    # the O(1) weightings, the O(k) aggregators last; tables keep the registry's order.
    reused = set(summary.rows)

    def write() -> str:
        # After every row, so an interrupted run keeps its finished rows.
        summary.rows = {n: summary.rows[n] for n in methods if n in summary.rows}
        text = render(
            summary,
            command,
            time.perf_counter() - wall,
            time.process_time() - cpu,
            load_start,
            os.getloadavg(),
            args.quick,
            missing=[n for n in methods if n not in summary.rows],
            reused=[n for n in summary.rows if n in reused],
        )
        with open(os.path.join(out, "qm9.md"), "w") as f:
            f.write(text)
        save_results(summary, cfg, os.path.join(out, "qm9_results.npz"))
        return text

    order = sorted(methods, key=lambda n: (n != "STL", methods[n].family == "aggregator"))
    for name in order:
        if name in summary.rows:
            continue
        method = methods[name]
        selection = summary.selection_weights() if name != "STL" else None
        row = trainer.train(
            method, grid[name], selection, progress=Progress(mode, name, cfg.epochs, baseline)
        )
        summary.rows[name] = row
        line = (
            f"{name:<22} {row.seconds_per_epoch:6.2f} s/epoch per lr ({len(grid[name])} lr), "
            f"compile {row.compile_seconds:4.1f} s, other {row.other_seconds:4.1f} s; "
            f"load {os.getloadavg()[0]:.1f}"
        )
        if row.task_gradients is not None:
            line += f"; task gradients: {row.task_gradients}"
        if name != "STL":
            dm = summary.delta_m(name)
            line += f"; test Δm% {dm.mean():+.1f} ± {report.stderr(dm):.1f}"
        print(line, flush=True)
        write()
    text = write()
    print("\n" + text)
    print(f"wrote {os.path.join(out, 'qm9.md')} and qm9_results.npz")
    return summary


def _gradients_text(summary: report.QM9Summary) -> str:
    """Which aggregator rows used the Gramian engine and which jax.jacrev."""
    paths: dict[str, list[str]] = {}
    for name, row in summary.rows.items():
        if row.task_gradients is not None:
            paths.setdefault(row.task_gradients, []).append(name)
    if not paths:
        return ""
    words = {"engine": "the Gramian engine", "jacrev": "`jax.jacrev`"}
    listed = "; ".join(f"{words[p]}: {', '.join(n)}" for p, n in sorted(paths.items()))
    return f"Task gradients ({listed})."


def settings_text(summary: report.QM9Summary, command: str) -> str:
    cfg = summary.cfg
    grids = sorted({g for g in summary.grid.values() if len(g) > 1})
    gridded = [n for n, g in summary.grid.items() if len(g) > 1]
    parts = [
        f"Command: `{command}`.",
        f"Data: QM9 (qm9pack, 130,831 molecules), fixed split; the first {cfg.num_train} "
        f"training, {cfg.num_val} validation and {cfg.num_test} test molecules of it. "
        "Targets standardised with the training molecules' mean and standard deviation; "
        "training loss = per-target MSE of the standardised targets; metric = test MAE in "
        "the paper's units.",
        f"Model: heavy-atom complete graphs; MPNN dim {cfg.dim}, {cfg.num_steps} rounds of "
        f"an edge-conditioned convolution ({cfg.edge_network} edge network, hidden "
        f"{cfg.edge_hidden}) + GRU, Set2Set (3 steps), dense; one linear head per target.",
        f"Adam, {cfg.schedule} schedule, batch {cfg.batch_size}, {cfg.epochs} epochs, "
        f"{cfg.num_seeds} seeds (the same {cfg.num_seeds} initialisations and batch orders "
        "for every row). Learning rate "
        + (
            f"{cfg.learning_rate:g}, except {', '.join(gridded)}: the grid "
            f"{', '.join(f'{x:g}' for x in grids[0])}, chosen per row on validation."
            if gridded
            else f"{cfg.learning_rate:g}."
        ),
        "Model selection: each run keeps the epoch with the lowest validation Δm% "
        "against STL's validation MAE (STL: each task's model its lowest validation "
        "MAE); the test set is evaluated once, at that epoch.",
        f"FAMO: logits lr {summary.famo_lr:g}, **γ = {summary.gamma:g}** unless stated; "
        "FAMO = same-batch update (the authors'), FAMO-lagged = "
        "`update(losses[t-1], losses[t])`. Aggregators act on the shared trunk (sum "
        "convention: k × the aggregate; no gradient clipping for any row); each head "
        "gets its own task's gradient.",
        _gradients_text(summary),
        "Δm% against STL's test MAE (lower is better), mean ± standard error over "
        "seeds; MR = mean rank of the seed-mean MAEs among the rows of the table "
        "other than STL, ± the standard error of the per-seed mean ranks. "
        "s/epoch: median wall time of one epoch of all seeds (training steps and the "
        "validation pass), per learning rate.",
    ]
    return " ".join(parts)


def render(summary, command, wall, cpu, load_start, load_end, quick, missing=(), reused=()) -> str:
    names = list(summary.rows)
    main = [n for n in names if "γ=" not in n]
    famo_rows = [n for n in names if n.startswith("FAMO")]
    parts = []
    if quick:
        parts += [
            "**SMOKE TEST (--quick): a tiny slice for 2 epochs; these numbers mean nothing.**",
            "",
        ]
    if missing:
        parts += [f"**Partial: rows not run yet: {', '.join(missing)}.**", ""]
    parts += [
        settings_text(summary, command),
        "",
        "Summary (Δm% against STL, mean ± s.e. over seeds; the lr chosen on validation, "
        "and every row at the common lr):",
        "",
        report.summary_table(summary, main),
        "",
        "Test MAE per target (mean over seeds):",
        "",
        report.main_table(summary, main),
    ]
    if any(n in report.PAPER_TABLE2 for n in main if n != "STL"):
        parts += ["", "Beside the FAMO paper's Table 2:", "", report.paper_table(summary, main)]
    if any(len(summary.grid[n]) > 1 for n in summary.rows):
        parts += ["", "Learning-rate grid:", "", report.lr_table(summary)]
    if famo_rows:
        parts += ["", "FAMO variants:", "", report.famo_table(summary, famo_rows)]
    compile_total = sum(
        r.compile_seconds + r.other_seconds for n, r in summary.rows.items() if n not in reused
    )
    parts += [
        "",
        (
            f"Rows {', '.join(reused)} were trained by an earlier run with the same settings "
            "(--reuse-from); the times below are this invocation's. "
            if reused
            else ""
        )
        + f"Whole run: {wall:.0f} s wall ({compile_total:.0f} s of it compiling, "
        f"initialising and evaluating), {cpu:.0f} s CPU on {machine_text()}; load "
        f"average {load_start[0]:.1f} at the start and {load_end[0]:.1f} at the end "
        "(above the core count the machine was shared and wall times are inflated).",
        "",
    ]
    return "\n".join(parts)


def config_text(cfg: QM9Config) -> str:
    """The settings that make two runs' rows comparable (not the XLA options)."""
    return repr(dataclasses.replace(cfg, compile_options=None))


def saved_rows(path: str) -> list[str]:
    """The row names in a ``qm9_results.npz``, in the order they were saved."""
    with np.load(path) as f:
        names = [key.split("/")[0] for key in f.files if key.endswith("/test_mae_best")]
    return names


def load_row(path: str, name: str, cfg: QM9Config) -> RowResult:
    """Row ``name`` of a ``qm9_results.npz`` written with the same settings as ``cfg``."""
    with np.load(path) as f:
        saved = str(f["config"]) if "config" in f else None
        if saved != config_text(cfg):
            raise SystemExit(f"{path} was written with {saved}, not {config_text(cfg)}")
        fields = {}
        for field in RowResult._fields:
            key = f"{name}/{field}"
            fields[field] = f[key] if key in f else None
    for field in ("compile_seconds", "other_seconds"):
        fields[field] = float(fields[field])
    if fields["task_gradients"] is not None:
        fields["task_gradients"] = str(fields["task_gradients"])
    return RowResult(**fields)


def save_results(summary: report.QM9Summary, cfg: QM9Config, path: str) -> None:
    arrays = {"config": np.asarray(config_text(cfg))}
    for name, row in summary.rows.items():
        for field, value in row._asdict().items():
            if value is not None:
                arrays[f"{name}/{field}"] = np.asarray(value)
    np.savez_compressed(path, **arrays)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.qm9", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="smoke test on a tiny slice")
    parser.add_argument("--methods", nargs="+", default=None, help="rows (default: all)")
    parser.add_argument("--out", default=None, help="output directory (default: a new temp dir)")
    parser.add_argument("--cache", default=None, help="directory of the .npz cache")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--num-train", type=int, default=None)
    parser.add_argument("--dim", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None, help="Adam lr of rows without a grid")
    parser.add_argument("--lr-grid", type=float, nargs="+", default=None)
    parser.add_argument(
        "--grid-methods",
        nargs="*",
        default=None,
        help=f"rows on the grid ('all'; default {GRID_ROWS})",
    )
    parser.add_argument("--gamma", type=float, default=0.001, help="FAMO's default γ")
    parser.add_argument("--famo-lr", type=float, default=0.025)
    parser.add_argument(
        "--ablation-gammas",
        type=float,
        nargs="*",
        default=None,
        help=f"extra FAMO rows (same-batch and lagged) at these γ (default {ABLATION_GAMMAS})",
    )
    parser.add_argument(
        "--reuse-from",
        nargs="+",
        default=None,
        help="reuse the rows of earlier --out DIRs with the same settings (train the rest)",
    )
    parser.add_argument(
        "--gradients",
        choices=TASK_GRADIENTS,
        default="engine",
        help="aggregators' task gradients: the Gramian engine for the Gram-based rows "
        "(gramian_task_gradients, default; jacrev for the others) or jax.jacrev "
        "(task_gradients) for every row",
    )
    parser.add_argument(
        "--reuse-either-gradients",
        action="store_true",
        help="with --reuse-from: reuse an aggregator row whichever task-gradient path "
        "trained it (the first DIR that has the row wins; the report names each row's path)",
    )
    parser.add_argument("--progress", choices=("auto", "bar", "lines", "none"), default="auto")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> report.QM9Summary:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        return run(args, argv)
    except qm9_data.MissingDependencyError as error:
        raise SystemExit(str(error)) from None


if __name__ == "__main__":
    main()
