"""Learning-rate choice, Δm%, mean rank and the markdown tables of a QM9 run."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from benchmarks.qm9.data import NUM_TARGETS, TARGET_NAMES, TARGET_UNITS
from benchmarks.qm9.train import QM9Config, RowResult
from famo_jax.metrics import delta_m, mean_rank

LOWER_IS_BETTER = np.zeros(NUM_TARGETS, bool)  # every metric is an MAE

# The FAMO paper's Table 2 (Liu et al., NeurIPS 2023; its baselines are Navon et
# al.'s, ICML 2022): test MAE of mu, alpha, homo, lumo, r2, zpve, U0, U, H, G,
# Cv (units of TARGET_UNITS), then MR and Δm% (None for STL). 3 seeds, full
# QM9 (110k training molecules), NNConv MPNN dim 64, 300 epochs.
PAPER_TABLE2 = {
    "STL": ((0.07, 0.18, 60.6, 53.9, 0.50, 4.53, 58.8, 64.2, 63.8, 66.2, 0.07), None, None),
    "LS": ((0.11, 0.33, 73.6, 89.7, 5.20, 14.06, 143.4, 144.2, 144.6, 140.3, 0.13), 6.45, 177.6),
    "SI": ((0.31, 0.35, 149.8, 135.7, 1.00, 4.51, 55.3, 55.8, 55.8, 55.3, 0.11), 3.55, 77.8),
    "RLW": ((0.11, 0.34, 76.9, 92.8, 5.87, 15.47, 156.3, 157.1, 157.6, 153.0, 0.14), 8.00, 203.8),
    "DWA": ((0.11, 0.33, 74.1, 90.6, 5.09, 13.99, 142.3, 143.0, 143.4, 139.3, 0.13), 6.27, 175.3),
    "UW": ((0.39, 0.43, 166.2, 155.8, 1.07, 4.99, 66.4, 66.8, 66.8, 66.2, 0.12), 4.91, 108.0),
    "MGDA": ((0.22, 0.37, 126.8, 104.6, 3.23, 5.69, 88.4, 89.4, 89.3, 88.0, 0.12), 5.91, 120.5),
    "PCGrad": ((0.11, 0.29, 75.9, 88.3, 3.94, 9.15, 116.4, 116.8, 117.2, 114.5, 0.11), 4.73, 125.7),
    "CAGrad": ((0.12, 0.32, 83.5, 94.8, 3.22, 6.93, 114.0, 114.3, 114.5, 112.3, 0.12), 5.45, 112.8),
    "IMTL-G": ((0.14, 0.29, 98.3, 93.9, 1.75, 5.70, 101.4, 102.4, 102.0, 100.1, 0.10), 4.36, 77.2),
    "Nash-MTL": ((0.10, 0.25, 82.9, 81.9, 2.43, 5.38, 74.5, 75.0, 75.1, 74.2, 0.09), 2.09, 62.0),
    "FAMO": ((0.15, 0.30, 94.0, 95.2, 1.63, 4.95, 70.82, 71.2, 71.2, 70.3, 0.10), 3.27, 58.5),
}


def stderr(values: np.ndarray) -> float:
    values = np.asarray(values, np.float64)
    if values.size < 2:
        return float("nan")
    return float(values.std(ddof=1) / math.sqrt(values.size))


@dataclasses.dataclass
class QM9Summary:
    """Every row of one run and the choices made on validation.

    Attributes:
      cfg: the settings.
      rows: row name -> :class:`RowResult` over all its learning rates.
      grid: row name -> the learning rates it was trained with.
      famo_lr, gamma: FAMO's logits learning rate and default decay.
      description: what the rows are, for the report.
    """

    cfg: QM9Config
    rows: dict[str, RowResult]
    grid: dict[str, tuple[float, ...]]
    famo_lr: float
    gamma: float
    num_train_available: int = 0

    # -- validation choices ---------------------------------------------------

    @property
    def stl_val_baseline(self) -> np.ndarray:
        """``(11,)`` STL validation MAE (mean over seeds, each task at its chosen lr)."""
        stl = self.rows["STL"]
        return np.array(
            [
                stl.for_lr(lr).val_mae_best[:, t].mean()
                for t, lr in enumerate(self.chosen_lrs("STL"))
            ]
        )

    def selection_weights(self) -> np.ndarray:
        """``1 / (k * B_val)``: the weights whose dot with validation MAEs is Δm%/100 + 1."""
        return 1.0 / (NUM_TARGETS * self.stl_val_baseline)

    def chosen_lrs(self, name: str) -> np.ndarray:
        """``(11,)`` learning rate chosen on validation for each task's metric.

        Multitask rows: one lr for all tasks, the lowest mean (over seeds)
        validation Δm% against STL at the selected epochs. STL: per task, the
        lowest mean validation MAE of that task.
        """
        row = self.rows[name]
        lrs = np.unique(row.learning_rates)
        if lrs.size == 1:
            return np.full(NUM_TARGETS, lrs[0])
        mean_val = np.stack([row.for_lr(lr).val_mae_best.mean(axis=0) for lr in lrs])
        if name == "STL":
            return lrs[np.argmin(mean_val, axis=0)]
        scores = mean_val @ self.selection_weights()
        return np.full(NUM_TARGETS, lrs[int(np.argmin(scores))])

    def val_delta_m(self, name: str, lr: float) -> np.ndarray:
        """``(seeds,)`` validation Δm% at ``lr`` (selected epochs) against STL's validation MAE."""
        values = self.rows[name].for_lr(lr).val_mae_best
        return np.asarray(delta_m(values, self.stl_val_baseline, LOWER_IS_BETTER))

    # -- test numbers ---------------------------------------------------------

    def test_mae(self, name: str, lr: float | None = None) -> np.ndarray:
        """``(seeds, 11)`` test MAE at the selected epochs (chosen lr unless ``lr``)."""
        row = self.rows[name]
        lrs = np.full(NUM_TARGETS, lr) if lr is not None else self.chosen_lrs(name)
        return np.stack([row.for_lr(lr_t).test_mae_best[:, t] for t, lr_t in enumerate(lrs)], 1)

    @property
    def baseline(self) -> np.ndarray:
        """``(11,)`` STL test MAE, mean over seeds: the B of Δm%."""
        return self.test_mae("STL").mean(axis=0)

    def delta_m(self, name: str, lr: float | None = None) -> np.ndarray:
        """``(seeds,)`` test Δm% against STL."""
        return np.asarray(delta_m(self.test_mae(name, lr), self.baseline, LOWER_IS_BETTER))

    def ranks(self, names: Sequence[str]) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """MR of the seed-mean MAEs, and MR per seed (ranked within each seed)."""
        per_seed = np.stack([self.test_mae(n) for n in names])  # (methods, seeds, k)
        of_means = np.asarray(mean_rank(per_seed.mean(axis=1), LOWER_IS_BETTER))
        seeds = per_seed.shape[1]
        by_seed = np.stack(
            [np.asarray(mean_rank(per_seed[:, s], LOWER_IS_BETTER)) for s in range(seeds)], 1
        )
        return (
            dict(zip(names, of_means.tolist(), strict=True)),
            dict(zip(names, by_seed, strict=True)),
        )

    def seconds_per_epoch(self, name: str) -> float:
        return self.rows[name].seconds_per_epoch


# ----------------------------------------------------------------------------
# Tables.


def _fmt(value: float) -> str:
    if value == 0 or not math.isfinite(value):
        return f"{value:.3g}"
    digits = max(0, 2 - int(math.floor(math.log10(abs(value)))))
    return f"{value:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _lr_cell(summary: QM9Summary, name: str) -> str:
    lrs = summary.chosen_lrs(name)
    grid = summary.grid[name]
    if len(grid) == 1:
        return f"{grid[0]:g}"
    if np.all(lrs == lrs[0]):
        return f"**{lrs[0]:g}** of {len(grid)}"
    return "per task"


def main_table(summary: QM9Summary, names: Sequence[str]) -> str:
    """Per-target test MAE (mean over seeds), MR, Δm% ± s.e., lr, time per epoch."""
    ranked = [n for n in names if n != "STL"]
    mr, mr_seed = summary.ranks(ranked) if len(ranked) > 1 else ({}, {})
    ls = summary.seconds_per_epoch("LS") if "LS" in summary.rows else None
    header = (
        ["Method"]
        + [f"{t} ({u})" for t, u in zip(TARGET_NAMES, TARGET_UNITS, strict=True)]
        + ["MR ↓ (± s.e.)", "Δm% ↓ (± s.e.)", "lr", "s/epoch (× LS)"]
    )
    rows = []
    for name in names:
        cells = [name] + [_fmt(v) for v in summary.test_mae(name).mean(axis=0)]
        if name == "STL":
            cells += ["", ""]
        else:
            dm = summary.delta_m(name)
            rank_cell = f"{mr[name]:.2f} (± {stderr(mr_seed[name]):.2f})" if mr else ""
            cells += [rank_cell, f"{dm.mean():+.1f} ± {stderr(dm):.1f}"]
        cells.append(_lr_cell(summary, name))
        sec = summary.seconds_per_epoch(name)
        cells.append(f"{sec:.2f}" + (f" ({sec / ls:.2f}×)" if ls else ""))
        rows.append(cells)
    return _table(header, rows)


def paper_table(summary: QM9Summary, names: Sequence[str]) -> str:
    """This run's Δm% and MR beside the FAMO paper's Table 2, with both orderings."""
    names = [n for n in names if n != "STL" and n in PAPER_TABLE2]
    ours = {n: float(summary.delta_m(n).mean()) for n in names}
    mr, _ = summary.ranks(names)
    paper = {n: PAPER_TABLE2[n][2] for n in names}
    order_ours = {n: i + 1 for i, n in enumerate(sorted(names, key=ours.get))}
    order_paper = {n: i + 1 for i, n in enumerate(sorted(names, key=paper.get))}
    header = [
        "Method",
        "paper Δm%",
        "paper MR",
        "paper place (Δm)",
        "here Δm% (± s.e.)",
        "here MR (same rows)",
        "here place (Δm)",
    ]
    rows = []
    for n in sorted(names, key=paper.get):
        dm = summary.delta_m(n)
        rows.append(
            [
                n,
                f"{paper[n]:+.1f}",
                f"{PAPER_TABLE2[n][1]:.2f}",
                str(order_paper[n]),
                f"{dm.mean():+.1f} ± {stderr(dm):.1f}",
                f"{mr[n]:.2f}",
                str(order_ours[n]),
            ]
        )
    rho = _spearman([order_paper[n] for n in names], [order_ours[n] for n in names])
    return (
        _table(header, rows)
        + f"\n\nSpearman rank correlation of the two Δm% orderings: {rho:+.2f}."
    )


def _spearman(a: Sequence[int], b: Sequence[int]) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.size < 2:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def lr_table(summary: QM9Summary) -> str:
    """Rows trained on a learning-rate grid: validation and test Δm% at each lr."""
    gridded = [n for n, g in summary.grid.items() if len(g) > 1 and n in summary.rows]
    rows = []
    for name in gridded:
        chosen = summary.chosen_lrs(name)
        for lr in summary.grid[name]:
            if name == "STL":
                mark = ", ".join(t for t, c in zip(TARGET_NAMES, chosen, strict=True) if c == lr)
                val_cell, test_cell = "", ""
                val_mae = summary.rows[name].for_lr(lr).val_mae_best.mean(axis=0)
                val_cell = f"{np.mean(val_mae / summary.stl_val_baseline - 1) * 100:+.1f}"
                rows.append([name, f"{lr:g}", val_cell, test_cell, mark or "–"])
                continue
            val = summary.val_delta_m(name, lr)
            test = summary.delta_m(name, lr)
            rows.append(
                [
                    name,
                    f"{lr:g}",
                    f"{val.mean():+.1f} ± {stderr(val):.1f}",
                    f"{test.mean():+.1f} ± {stderr(test):.1f}",
                    "chosen" if lr == chosen[0] else "",
                ]
            )
    header = ["Row", "Adam lr", "val Δm% (± s.e.)", "test Δm% (± s.e.)", "chosen on validation"]
    return _table(header, rows)


def famo_table(summary: QM9Summary, names: Sequence[str]) -> str:
    """FAMO's update mode and γ: Δm%, final training loss against LS, spread of the weights."""
    rows = []
    ls_row = summary.rows.get("LS")
    ls = None
    for name in names:
        lr = summary.chosen_lrs(name)[0]
        row = summary.rows[name].for_lr(lr)
        if ls_row is not None:
            # LS at the row's learning rate when LS was trained at it (a fair loss ratio).
            same = np.isclose(ls_row.learning_rates, lr, rtol=1e-6).any()
            ls = ls_row.for_lr(lr if same else summary.chosen_lrs("LS")[0])
        dm = summary.delta_m(name)
        cells = [
            name,
            "lagged" if "lagged" in name else "same-batch",
            "– (robust_famo)" if "robust" in name else f"{_gamma_of(name, summary.gamma):g}",
        ]
        cells.append(f"{dm.mean():+.1f} ± {stderr(dm):.1f}")
        if ls is not None:
            ratio = row.train_loss[:, -1] / ls.train_loss[:, -1]
            cells.append(f"{float(np.exp(np.mean(np.log(ratio)))):.2f}")
        if row.task_weights is not None:
            z = row.task_weights[:, -1]
            cells.append(f"{float(np.mean(z.max(-1) / z.min(-1))):.1f}")
            top = np.argmax(z.mean(axis=0))
            cells.append(f"{TARGET_NAMES[top]} {z.mean(axis=0)[top]:.2f}")
        else:
            cells += ["", ""]
        rows.append(cells)
    header = ["Row", "update", "γ", "Δm% ↓ (± s.e.)"]
    if ls is not None:
        header.append("last-epoch train loss / LS at the same lr (geo. mean)")
    header += ["max z / min z (last epoch)", "largest weight (last epoch)"]
    return _table(header, rows)


def _gamma_of(name: str, default: float) -> float:
    if "γ=" in name:
        return float(name.split("γ=")[1].rstrip(")"))
    return default


def summary_table(summary: QM9Summary, names: Sequence[str]) -> str:
    """One line per row: Δm% at its chosen lr and at the common lr, MR, the paper's Δm%, time."""
    common = summary.cfg.learning_rate
    ranked = [n for n in names if n != "STL"]
    mr, _ = summary.ranks(ranked) if len(ranked) > 1 else ({}, {})
    ls = summary.seconds_per_epoch("LS") if "LS" in summary.rows else None
    rows = []
    for name in ranked:
        row = summary.rows[name]
        dm = summary.delta_m(name)
        has_common = np.isclose(row.learning_rates, common, rtol=1e-6).any()
        dm_common = summary.delta_m(name, common) if has_common else None
        paper = PAPER_TABLE2.get(name)
        sec = summary.seconds_per_epoch(name)
        rows.append(
            [
                name,
                f"{dm.mean():+.1f} ± {stderr(dm):.1f}",
                f"{float(summary.chosen_lrs(name)[0]):g}",
                "" if dm_common is None else f"{dm_common.mean():+.1f} ± {stderr(dm_common):.1f}",
                f"{mr[name]:.2f}" if name in mr else "",
                "" if paper is None else f"{paper[2]:+.1f}",
                f"{sec / ls:.2f}×" if ls else "",
            ]
        )
    header = [
        "Method",
        "Δm% ↓ (± s.e.)",
        "lr",
        f"Δm% at lr {common:g}",
        "MR ↓",
        "paper Δm%",
        "s/epoch × LS",
    ]
    return _table(header, rows)
