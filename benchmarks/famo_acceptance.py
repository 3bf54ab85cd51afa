"""Robust FAMO against the reference on every benchmark: the acceptance table of issue 12.

Rows (the same settings on every problem, nothing tuned per benchmark): LS, SI,
reference FAMO at gamma in {0, 1e-3, 1e-2}, and the robust FAMO candidate
(``benchmarks.robust_famo``) with
its defaults, each FAMO row with the authors' same-batch update and with the
lagged one (``update(l_{t-1}, l_t)``). Columns:

- **toy**: the FAMO paper's toy (``examples/toy_pareto.py``'s problem): starts
  (of 5) that reach the Pareto front (Pareto-stationarity residual < 1e-4) in
  its middle half (``|theta_1| <= 3.5``);
- **full** and **mini-batch**: the multi-scale regressions of
  ``benchmarks/famo_dynamics.py`` (5 initialisations): seeds on which the worst
  task's late loss ratio is at most half of LS's, and on which no task's loss
  rises above 3x its initial value after the first 10% of training, with the
  median worst-task ratio;
- **quick start**: ``examples/quickstart.py``'s problem (8 tasks, loss scales
  1e-3..1e3), 5 seeds (data and initialisation): geometric mean over tasks of
  the test loss after training over the test loss at initialisation, mean ±
  standard error over seeds (and the worst task's ratio);
- **MultiDigits-pair / -many**: ``benchmarks/multidigits.py`` at its full
  settings but 5 seeds: Δm% against STL, mean ± standard error;
- **QM9**: left empty here (the real-QM9 benchmark is built separately).

Run::

    python -m benchmarks.famo_acceptance --out docs/benchmarks   # the full table
    python -m benchmarks.famo_acceptance --quick                 # seconds (smoke test)
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import famo_jax
from benchmarks import _mtl_bench as mtl
from benchmarks import famo_dynamics as dyn
from benchmarks import multidigits
from benchmarks.robust_famo import robust_famo
from examples import quickstart

GAMMAS = (0.0, 1e-3, 1e-2)


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of the table: a weighting and how its ``update`` is called."""

    name: str
    kind: str  # "ls", "si", "famo" or "robust"
    update: str = "same_batch"  # or "lagged"
    gamma: float = 1e-3
    robust_kwargs: tuple = ()

    def weighting(self, k: int, min_losses=None) -> famo_jax.LossWeighting:
        if self.kind == "ls":
            return famo_jax.linear_scalarization(k)
        if self.kind == "si":
            return famo_jax.scale_invariant(k)
        if self.kind == "famo":
            return famo_jax.famo(k, gamma=self.gamma, min_losses=min_losses)
        if self.kind == "robust":
            return robust_famo(k, min_losses=min_losses, **dict(self.robust_kwargs))
        raise ValueError(f"unknown kind {self.kind!r}.")

    def dynamics_variant(self) -> dyn.Variant:
        return dyn.Variant(
            self.name, self.kind, self.update, gamma=self.gamma, robust_kwargs=self.robust_kwargs
        )


def default_rows(robust_kwargs: tuple = ()) -> list[Row]:
    rows = [Row("LS", "ls"), Row("SI", "si")]
    for gamma in GAMMAS:
        rows.append(Row(f"FAMO γ={gamma:g}", "famo", gamma=gamma))
        rows.append(Row(f"FAMO-lagged γ={gamma:g}", "famo", "lagged", gamma=gamma))
    rows.append(Row("robust FAMO", "robust", robust_kwargs=robust_kwargs))
    rows.append(Row("robust FAMO-lagged", "robust", "lagged", robust_kwargs=robust_kwargs))
    return rows


def _stderr(values: np.ndarray) -> float:
    values = np.asarray(values, np.float64)
    return float(values.std(ddof=1) / math.sqrt(values.size)) if values.size > 1 else math.nan


# ----------------------------------------------------------------------------
# Quick start.


def quickstart_ratios(
    row: Row, num_seeds: int = 5, steps: int = 3000, num_tasks: int = 8, quick: bool = False
) -> np.ndarray:
    """``(seeds, k)`` test loss after training / at initialisation on the quick start.

    Seed ``s`` draws the data, the initialisation and the batches from
    ``jax.random.key(s)`` as ``examples/quickstart.py --seed s`` does.
    """
    batch_size, learning_rate = 128, 1e-3
    kwargs = dict(num_train=256, num_test=128) if quick else {}
    problems = []
    for seed in range(num_seeds):
        k_problem, k_train = jax.random.split(jax.random.key(seed))
        problems.append(
            (quickstart.make_problem(k_problem, num_tasks=num_tasks, **kwargs), k_train)
        )
    scales = jnp.asarray(problems[0][0].scales, jnp.float32)
    stack = lambda field: jnp.stack([getattr(p, field) for p, _ in problems])
    x_train, y_train, x_test, y_test = map(stack, ("x_train", "y_train", "x_test", "y_test"))
    train_keys = jnp.stack([k for _, k in problems])
    weighting = row.weighting(num_tasks)
    model_opt = optax.adam(learning_rate)

    def one_seed(x_tr, y_tr, x_te, y_te, key):
        k_init, k_data = jax.random.split(key)
        params = quickstart.init_params(k_init, x_tr.shape[1], num_tasks)
        initial = quickstart.task_losses(params, x_te, y_te, scales)

        def step(carry, step_key):
            params, opt_state, state, prev = carry
            idx = jax.random.randint(step_key, (batch_size,), 0, x_tr.shape[0])
            x, y = x_tr[idx], y_tr[idx]

            def objective(p):
                losses = quickstart.task_losses(p, x, y, scales)
                return weighting.weigh(losses, state), losses

            (_, losses), grads = jax.value_and_grad(objective, has_aux=True)(params)
            updates, opt_state = model_opt.update(grads, opt_state, params)
            new_params = optax.apply_updates(params, updates)
            if row.update == "same_batch":
                curr = quickstart.task_losses(new_params, x, y, scales)
                state = weighting.update(losses, curr, state)
            else:  # the first step's NaN previous losses are skipped by update
                state = weighting.update(prev, losses, state)
            return (new_params, opt_state, state, losses), None

        carry = (params, model_opt.init(params), weighting.init(), jnp.full(num_tasks, jnp.nan))
        (params, *_), _ = jax.lax.scan(step, carry, jax.random.split(k_data, steps))
        return quickstart.task_losses(params, x_te, y_te, scales) / initial

    run = jax.jit(jax.vmap(one_seed))
    return np.asarray(run(x_train, y_train, x_test, y_test, train_keys))


# ----------------------------------------------------------------------------
# MultiDigits.


def multidigits_delta_m(
    rows: Sequence[Row], num_seeds: int = 5, quick: bool = False, log=print
) -> dict[str, dict[str, np.ndarray]]:
    """Δm% per seed of every row on MultiDigits-pair and -many (``{variant: {row: (S,)}}``)."""
    sizes = multidigits.QUICK if quick else multidigits.FULL
    cfg = mtl.TrainConfig(
        hidden=(32,) if quick else (128, 128),
        epochs=2 if quick else 20,
        learning_rate=1e-2,
        batch_size=64 if quick else 128,
        num_seeds=2 if quick else num_seeds,
        compile_options=mtl.QUICK_COMPILE_OPTIONS if quick else None,
    )
    out = {}
    for variant in multidigits.VARIANTS:
        bench = multidigits.load_multidigits(variant, **sizes)
        methods = {"STL": mtl.Method("STL", "stl")}
        for row in rows:
            update = "step" if row.kind in ("ls", "si") else row.update
            build = lambda k, key, row=row: row.weighting(k)
            methods[row.name] = mtl.Method(row.name, "weighting", build, update)
        results = {}
        for name, method in methods.items():
            results[name] = mtl.train_method(bench, method, cfg)
            log(f"  multidigits-{variant:<5} {name:<24} {results[name].seconds:6.1f} s")
        summary = mtl.Summary(bench, cfg, results, gamma=1e-3, famo_lr=0.025)
        out[variant] = {row.name: summary.delta_m_per_seed(row.name) for row in rows}
    return out


# ----------------------------------------------------------------------------
# The table.


def _regression_cells(traces: dict[str, dyn.Trace]) -> dict[str, str]:
    ls = dyn.summarize_regression(traces["LS"]).late_worst
    cells = {}
    for name, trace in traces.items():
        s = dyn.summarize_regression(trace)
        half = int(np.sum(s.late_worst <= 0.5 * ls))
        bounded = int(np.sum((s.max_after_warmup <= 3.0) & s.finite))
        n = len(ls)
        ok = "**✓**" if half == n and bounded == n else "✗"
        cells[name] = (
            f"{ok} {half}/{n}, {bounded}/{n} (worst {np.median(s.late_worst):.2f}, "
            f"max {np.max(s.max_after_warmup):.3g})"
        )
    return cells


def _toy_cells(traces: dict[str, dyn.Trace]) -> dict[str, str]:
    cells = {}
    for name, trace in traces.items():
        residual, theta1, _ = dyn.toy_outcome(trace)
        reached = residual < dyn.FRONT_THRESHOLD
        middle = reached & (np.abs(theta1) <= dyn.TOY_MIDDLE)
        n = len(residual)
        ok = "**✓**" if middle.sum() == n else "✗"
        cells[name] = f"{ok} {int(middle.sum())}/{n} ({int(reached.sum())}/{n} on the front)"
    return cells


def _mean_se(values: np.ndarray, fmt: str) -> str:
    return f"{fmt.format(np.mean(values))} ± {fmt.replace('+', '').format(_stderr(values))}"


def acceptance_table(
    rows: Sequence[Row],
    toy: dict[str, str],
    full: dict[str, str],
    minibatch: dict[str, str],
    qs: dict[str, np.ndarray],
    digits: dict[str, dict[str, np.ndarray]],
) -> str:
    """The markdown table (rows x problems) and the robust row's verdict per column."""
    geo = {n: np.exp(np.mean(np.log(r), axis=1)) for n, r in qs.items()}
    worst = {n: np.max(r, axis=1) for n, r in qs.items()}
    header = [
        "row",
        "toy: middle of the front",
        "full: ≤ ½ LS, ≤ 3× (seeds)",
        "mini-batch: ≤ ½ LS, ≤ 3× (seeds)",
        "quick start: geo. mean ratio ↓",
        "quick start: worst ratio ↓",
        "MultiDigits-pair Δm% ↓",
        "MultiDigits-many Δm% ↓",
        "QM9 Δm% ↓",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        n = row.name
        cells = [
            n,
            toy.get(n, ""),
            full.get(n, ""),
            minibatch.get(n, ""),
            _mean_se(geo[n], "{:.2e}") if n in geo else "",
            _mean_se(worst[n], "{:.2e}") if n in worst else "",
            _mean_se(digits["pair"][n], "{:+.2f}") if n in digits.get("pair", {}) else "",
            _mean_se(digits["many"][n], "{:+.2f}") if n in digits.get("many", {}) else "",
            "(gap: real-QM9 column built separately)",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdicts(rows: Sequence[Row], qs, digits, toy, full, minibatch) -> list[str]:
    """Whether each robust row meets the issue's bars, column by column."""
    out = []
    references = [r.name for r in rows if r.kind in ("si", "famo")]

    def best_reference(values: dict[str, np.ndarray]) -> tuple[str, float, float]:
        name = min(references, key=lambda r: float(np.mean(values[r])))
        return name, float(np.mean(values[name])), _stderr(values[name])

    geo = {n: np.exp(np.mean(np.log(r), axis=1)) for n, r in qs.items()}
    worst = {n: np.max(r, axis=1) for n, r in qs.items()}
    for row in rows:
        if row.kind != "robust":
            continue
        parts = [f"- **{row.name}**:"]
        parts.append(f"toy {'met' if toy[row.name].startswith('**✓') else 'NOT met'};")
        parts.append(f"full {'met' if full[row.name].startswith('**✓') else 'NOT met'};")
        parts.append(f"mini-batch {'met' if minibatch[row.name].startswith('**✓') else 'NOT met'};")
        for label, values in (("quick start geo. mean", geo), ("quick start worst", worst)):
            ref, mean, se = best_reference(values)
            mine, mine_se = float(np.mean(values[row.name])), _stderr(values[row.name])
            ok = mine <= mean + max(se, mine_se)
            parts.append(
                f"{label} {mine:.2e} vs best reference {ref} {mean:.2e} ± {se:.2e}: "
                f"{'met' if ok else 'NOT met'};"
            )
        for variant in ("pair", "many"):
            if variant not in digits:
                continue
            ref, mean, se = best_reference(digits[variant])
            mine = float(np.mean(digits[variant][row.name]))
            mine_se = _stderr(digits[variant][row.name])
            ok = mine <= mean + max(se, mine_se)
            parts.append(
                f"MultiDigits-{variant} {mine:+.2f} vs best reference {ref} {mean:+.2f} ± "
                f"{se:.2f}: {'met' if ok else 'NOT met'};"
            )
        out.append(" ".join(parts))
    return out


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings (a smoke test)")
    parser.add_argument("--out", type=Path, default=None, help="directory for robust_famo.md")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument(
        "--columns",
        nargs="+",
        default=["toy", "full", "minibatch", "quickstart", "multidigits"],
        choices=["toy", "full", "minibatch", "quickstart", "multidigits"],
    )
    parser.add_argument(
        "--robust",
        nargs="*",
        default=[],
        help="robust_famo keyword arguments as name=value (to explore; default: none)",
    )
    parser.add_argument(
        "--rows", nargs="+", default=None, help="only LS and the rows containing these"
    )
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    robust_kwargs = tuple((k, float(v)) for k, v in (a.split("=") for a in args.robust))
    rows = default_rows(robust_kwargs)
    if args.rows:  # LS stays: the regression columns are measured against it
        rows = [r for r in rows if r.name == "LS" or any(x in r.name for x in args.rows)]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    problems = dyn.make_problems(args.quick, num_seeds=args.seeds)
    toy, full, minibatch, qs, digits = {}, {}, {}, {}, {}
    if "toy" in args.columns:
        traces = dyn.run_rows(problems["toy"], [r.dynamics_variant() for r in rows])
        toy = _toy_cells(traces)
    for column, store in (("full", full), ("minibatch", minibatch)):
        if column in args.columns:
            traces = dyn.run_rows(problems[column], [r.dynamics_variant() for r in rows])
            store.update(_regression_cells(traces))
    if "quickstart" in args.columns:
        for row in rows:
            t0 = time.perf_counter()
            qs[row.name] = quickstart_ratios(
                row,
                num_seeds=2 if args.quick else args.seeds,
                steps=50 if args.quick else 3000,
                quick=args.quick,
            )
            print(f"  quickstart {row.name:<24} {time.perf_counter() - t0:6.1f} s")
    if "multidigits" in args.columns:
        digits = multidigits_delta_m(rows, args.seeds, args.quick)
    command = " ".join(["python -m benchmarks.famo_acceptance", *argv])
    title = "## Robust FAMO: acceptance" + (
        " (QUICK SMOKE TEST: tiny settings, not results)" if args.quick else ""
    )
    text = "\n".join(
        [
            title,
            "",
            f"Command: `{command}`. Load average {load:.1f} at the start; "
            f"{time.perf_counter() - start:.0f} s wall; jax {jax.__version__}.",
            "",
            acceptance_table(rows, toy, full, minibatch, qs, digits),
            "",
            *(
                verdicts(rows, qs, digits, toy, full, minibatch)
                if len(args.columns) == 5 and not args.rows
                else []
            ),
        ]
    )
    print("\n" + text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "robust_famo_acceptance.md").write_text(text + "\n")
        print(f"wrote {args.out / 'robust_famo_acceptance.md'}")
    return text


if __name__ == "__main__":
    main()
