"""The Gramian engine against the jacrev path: step time, memory and FLOPs against k.

Model: the shared-trunk MLP of ``benchmarks/scaling.py`` (input 512 -> 1024 ->
512, ReLU, 1,050,112 trunk parameters, one linear head 512 -> 1 per task, batch
128, mean squared errors, Adam lr 1e-3), imported from that script. For each k
in {10, 40, 100, 400, 1000} and each method this script compiles one jitted
training step, reads XLA's memory and cost analyses, and times the step:

- ``LS``: the gradient of the mean loss (one forward, one backward pass).
- ``MGDA jacrev``, ``CAGrad jacrev``: the scaling benchmark's aggregator step:
  ``famo_jax.task_gradients`` (``jax.jacrev``) of the trunk, the aggregator on
  the stacked task gradients, the heads get the gradient of the mean loss.
- ``MGDA engine``, ``CAGrad engine``: ``famo_jax.gramian_task_gradients``
  with ``is_shared`` marking the trunk: the Gram matrix of the trunk's task
  gradients from the layers' inputs and per-task output cotangents, the same
  aggregator on it, and the update from one weight-gradient product per layer
  (the heads again get the gradient of the mean loss). Same update as the
  jacrev path, to rounding.
- ``MGDA TorchJD`` (optional, when ``torch`` and ``torchjd`` are installed):
  TorchJD's ``autogram.Engine`` on the same model in PyTorch (CPU, float32,
  the process's cores), ``MGDAWeighting`` on its Gramian, then ``losses.backward(weights)``
  and ``torch.optim.Adam``. PyTorch is imported inside this script only, with
  ``OMP_WAIT_POLICY=PASSIVE`` (its OpenMP threads otherwise spin while they
  wait, which slowed it down up to 10x on this shared machine).

Timing: at each k every compiled step is timed in interleaved rounds (one call
of each per round, rotating order; medians), so the ratios to LS are measured in
the same conditions; a method is skipped at k (and above) when its per-task
gradients or its compiled memory exceed ``--memory-budget-gib`` or its predicted
step time exceeds ``--time-budget-s``. TorchJD is timed in its own block right
after (its ratio is to its own LS step).

Memory: ``argument + output + temp - alias`` bytes of XLA's buffer assignment.
FLOPs: XLA's cost analysis. It counts a loop body once, and the engine runs
its batched backward pass and its Gram products in loops over chunks of tasks,
so its FLOPs are read from the same step compiled with ``task_chunks=1`` (no
loop; same arithmetic). MGDA's and CAGrad's solvers are loops too, so all
aggregator FLOPs undercount the solvers (they are O(k^3) per iteration, small
next to the rest here).

Where the engine's time goes: at each k the script also times (interleaved with
the steps) and counts the FLOPs of (a) the forward pass and the per-task output
cotangents of the two trunk layers, written by hand for this model (the part
of the engine's work that any per-task backward pass has to do), (b) the
engine's losses and Gram matrix, and (c) (b) plus the weighted sum; the
differences attribute the step to the batched backward pass, the Gram
products, the weighted sum, and the solver and Adam.

Run from the repository root: ``python -m benchmarks.gramian --out DIR`` (full;
tens of minutes) or ``python -m benchmarks.gramian --quick --out DIR`` (tiny
model, seconds; a smoke test, not a measurement). Writes ``DIR/gramian.md`` (the tables),
``DIR/gramian.png`` (the plot) and ``DIR/gramian.json`` (raw results).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# PyTorch's OpenMP threads spin while they wait for work; on a shared or loaded
# machine that slows PyTorch down by up to 10x (measured here). Passive waiting
# must be chosen before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import famo_jax  # noqa: E402
from benchmarks import _timing, scaling  # noqa: E402

FULL_KS = (10, 40, 100, 400, 1000)
QUICK_KS = (3,)
AGGREGATORS = {"MGDA": "mgda", "CAGrad": "cagrad"}
STEPS = ("LS", "MGDA jacrev", "MGDA engine", "CAGrad jacrev", "CAGrad engine")
PARTS = ("cotangents (hand-written)", "engine Gram", "engine Gram + sum")
TORCHJD = "MGDA TorchJD"
IS_SHARED = {"trunk": True, "heads": False}
# Targets of the issue: time as a ratio to LS, memory as a fraction of the jacrev path's.
TIME_TARGETS = {10: 6.0, 100: 40.0}  # k -> step time / LS
MEMORY_FRACTION_OF_JACREV = 1 / 3
MEMORY_LIMIT_K1000 = 2 * 2**30


# --- Steps ---------------------------------------------------------------------------


def make_engine_step(aggregator: str, **engine_kwargs: Any) -> Callable:
    """The engine's training step for an aggregator (the jacrev one is scaling's)."""
    factory = getattr(famo_jax, AGGREGATORS[aggregator])

    def make(params: dict, x: jax.Array, y: jax.Array) -> tuple[Callable, Any]:
        tx = factory()
        engine = famo_jax.gramian_task_gradients(
            scaling.task_losses, is_shared=IS_SHARED, **engine_kwargs
        )

        def step(carry, x, y):
            params, opt_state, agg_state = carry
            _, task_grads = engine(params, x, y)
            # Trunk: the aggregate; heads: the gradient of the mean loss (as scaling's).
            grads, agg_state = tx.update(task_grads, agg_state, params)
            params, opt_state = scaling._apply(params, opt_state, grads)
            return params, opt_state, agg_state

        return step, (params, scaling.MODEL_OPTIMIZER.init(params), tx.init(params))

    return make


def step_factories() -> dict[str, Callable]:
    return {
        "LS": scaling.make_ls,
        "MGDA jacrev": scaling.make_aggregator("MGDA"),
        "MGDA engine": make_engine_step("MGDA"),
        "CAGrad jacrev": scaling.make_aggregator("CAGrad"),
        "CAGrad engine": make_engine_step("CAGrad"),
    }


def hand_written_cotangents(params: dict, x: jax.Array, y: jax.Array):
    """Forward pass and the per-task cotangents of both trunk layers' outputs.

    The floor of any method that backpropagates every task separately through
    the trunk: it is what the engine's batched backward pass computes, without
    the Gram products.
    """
    trunk, heads = params["trunk"], params["heads"]
    z1 = x @ trunk["w1"] + trunk["b1"]
    z2 = jax.nn.relu(z1) @ trunk["w2"] + trunk["b2"]
    predictions = jax.nn.relu(z2) @ heads["w"].T + heads["b"]
    residuals = 2 * (predictions - y) / x.shape[0]  # (batch, k): d loss_i / d pred_i
    d2 = residuals.T[:, :, None] * heads["w"][:, None, :] * (z2 > 0)  # (k, batch, 512)
    d1 = (d2 @ trunk["w2"].T) * (z1 > 0)  # (k, batch, 1024)
    return d1.sum(axis=1), d2.sum(axis=1)  # reduced, so that the output is small


def part_functions(**engine_kwargs: Any) -> dict[str, Callable]:
    engine = famo_jax.gramian_task_gradients(
        scaling.task_losses, is_shared=IS_SHARED, **engine_kwargs
    )

    def gram(params, x, y):
        return engine(params, x, y)[1].gram

    def gram_and_sum(params, x, y):
        _, task_grads = engine(params, x, y)
        k = task_grads.gram.shape[0]
        return task_grads.gram, task_grads.combine(jnp.full((k,), 1.0 / k))

    return {PARTS[0]: hand_written_cotangents, PARTS[1]: gram, PARTS[2]: gram_and_sum}


def flops_of(fn: Callable, *args: Any) -> float | None:
    compiled = jax.jit(fn).lower(*args).compile()
    try:
        cost = compiled.cost_analysis()
        if isinstance(cost, (list, tuple)):
            cost = cost[0] if cost else None
        return float(cost["flops"]) if cost and "flops" in cost else None
    except Exception:  # noqa: BLE001 - an analysis a backend lacks is reported as n/a
        return None


# --- Measurement -----------------------------------------------------------------------


@dataclass
class Result:
    method: str
    num_tasks: int
    seconds: float | None = None
    times: list[float] = field(default_factory=list)
    memory_total: int | None = None
    flops: float | None = None
    compile_seconds: float | None = None
    skipped: str | None = None


@dataclass
class Settings:
    model: scaling.ModelConfig
    ks: tuple[int, ...]
    methods: tuple[str, ...]
    warmup: int
    rounds: int
    round_budget_s: float  # at most this many seconds of timed rounds per k
    time_budget_s: float
    memory_budget_bytes: float
    parts: bool
    torchjd: bool


def _timed_rounds(settings: Settings, seconds_per_round: float) -> int:
    fits = int(settings.round_budget_s // max(seconds_per_round, 1e-9))
    return max(3, min(settings.rounds, fits))


def run(settings: Settings, log: Callable[[str], None] = print) -> list[Result]:
    cfg = settings.model
    factories = step_factories()
    results: list[Result] = []
    skip_from: dict[str, str] = {}  # not compiled from this k on
    untimed_from: dict[str, str] = {}  # compiled (memory, FLOPs) but not timed
    last: dict[str, tuple[int, float]] = {}
    key = jax.random.key(0)
    for k in settings.ks:
        k_params, k_batch = jax.random.split(jax.random.fold_in(key, k))
        params = scaling.init_params(k_params, cfg, k)
        x, y = scaling.make_batch(k_batch, cfg, k)
        row: dict[str, Result] = {}
        entries: dict[str, tuple[Callable, Any, tuple]] = {}
        for method in settings.methods:
            result = row[method] = Result(method, k)
            if method in skip_from:
                result.skipped = skip_from[method]
                continue
            if method.endswith("jacrev"):
                grads_bytes = 4 * k * cfg.trunk_params
                if grads_bytes > settings.memory_budget_bytes:
                    skip_from[method] = result.skipped = (
                        f"per-task gradients {_timing.format_bytes(grads_bytes)} > memory budget"
                    )
                    continue
            untimed = untimed_from.get(method)
            if method in last and untimed is None:
                last_k, last_s = last[method]
                predicted = last_s * k / last_k  # linear in k (optimistic at large k)
                if predicted > settings.time_budget_s:
                    # Still compiled: its memory is what the engine's is compared to.
                    untimed = f"predicted step {predicted:.1f} s > time budget"
            step, carry = factories[method](params, x, y)
            compiled = _timing.compile_step(step, carry, x, y)
            result.compile_seconds = compiled.seconds
            result.memory_total = compiled.memory.total if compiled.memory else None
            result.flops = compiled.flops
            if method.endswith("engine"):  # the same step without loops, for XLA's count
                aggregator = method.split()[0]
                flat_step, flat_carry = make_engine_step(aggregator, task_chunks=1)(params, x, y)
                result.flops = flops_of(flat_step, flat_carry, x, y)
            if result.memory_total and result.memory_total > settings.memory_budget_bytes:
                skip_from[method] = result.skipped = (
                    f"compiled memory {_timing.format_bytes(result.memory_total)} > memory budget"
                )
                continue
            if untimed:  # compiled for its memory and FLOPs, not timed
                untimed_from[method] = result.skipped = untimed
                continue
            entries[method] = (compiled.fn, carry, (x, y))
        if settings.parts:
            flat_parts = part_functions(task_chunks=1)  # no loops: XLA counts every FLOP
            for name, fn in part_functions().items():
                result = row[name] = Result(name, k)
                jitted = jax.jit(fn)
                start = time.perf_counter()
                jitted.lower(params, x, y).compile()
                result.compile_seconds = time.perf_counter() - start
                result.flops = flops_of(flat_parts[name], params, x, y)
                # A function of (params, x, y) as a "step" whose carry is the params.
                entries[name] = (_as_step(jitted), params, (x, y))
        # One warm-up call of each estimates the round's length.
        per_round = 0.0
        for fn, carry, args in entries.values():
            start = time.perf_counter()
            jax.block_until_ready(fn(_timing.fresh_copy(carry), *args))
            per_round += time.perf_counter() - start
        rounds = _timed_rounds(settings, per_round)
        times = _timing.time_interleaved(
            entries, warmup=settings.warmup, rounds=rounds, label=f"k={k}"
        )
        for name, values in times.items():
            row[name].times = values
            row[name].seconds = _timing.median(values)
            if name in settings.methods:
                last[name] = (k, row[name].seconds)
        if settings.torchjd:
            if TORCHJD in skip_from:
                row[TORCHJD] = Result(TORCHJD, k, skipped=skip_from[TORCHJD])
            else:
                row.update(torchjd_results(params, x, y, settings, rounds, log))
                last_k, last_s = k, row[TORCHJD].seconds
                # Skip the next k when its step, linear in k, would exceed the budget.
                next_ks = [n for n in settings.ks if n > k]
                if next_ks and last_s * next_ks[0] / last_k > settings.time_budget_s:
                    skip_from[TORCHJD] = (
                        f"predicted step {last_s * next_ks[0] / last_k:.1f} s > time budget"
                    )
        for name, result in row.items():
            results.append(result)
            status = (
                f"skipped ({result.skipped})"
                if result.skipped
                else f"{_timing.format_seconds(result.seconds)} median of {len(result.times)}"
                + (
                    f", memory {_timing.format_bytes(result.memory_total)}"
                    if result.memory_total
                    else ""
                )
            )
            log(f"  k={k:<5} {name:<26} {status}")
        del entries, params, x, y
    return results


def _as_step(fn: Callable) -> Callable:
    def step(params, x, y):
        jax.block_until_ready(fn(params, x, y))
        return params

    return step


# --- TorchJD (optional) ------------------------------------------------------------------


def torchjd_available() -> bool:
    try:
        import torch  # noqa: F401
        import torchjd  # noqa: F401
    except ImportError:
        return False
    return True


def torchjd_results(params, x, y, settings, rounds, log) -> dict[str, Result]:
    """TorchJD's autogram MGDA step and a PyTorch LS step on the same model and data."""
    import torch
    from torchjd.aggregation import MGDAWeighting
    from torchjd.autogram import Engine

    try:  # the cores this process may use (os.cpu_count() counts the whole host)
        torch.set_num_threads(len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        torch.set_num_threads(os.cpu_count() or 1)
    k = y.shape[1]
    cfg = settings.model

    def build():
        trunk = torch.nn.Sequential(
            torch.nn.Linear(cfg.input_dim, cfg.hidden_dim),
            torch.nn.ReLU(),
            torch.nn.Linear(cfg.hidden_dim, cfg.feature_dim),
            torch.nn.ReLU(),
        )
        heads = torch.nn.Linear(cfg.feature_dim, k)
        with torch.no_grad():
            for layer, w, b in (
                (trunk[0], params["trunk"]["w1"], params["trunk"]["b1"]),
                (trunk[2], params["trunk"]["w2"], params["trunk"]["b2"]),
            ):
                layer.weight.copy_(torch.from_numpy(np.asarray(w).T.copy()))
                layer.bias.copy_(torch.from_numpy(np.asarray(b)))
            heads.weight.copy_(torch.from_numpy(np.asarray(params["heads"]["w"])))
            heads.bias.copy_(torch.from_numpy(np.asarray(params["heads"]["b"])))
        return trunk, heads

    xt, yt = torch.from_numpy(np.asarray(x)), torch.from_numpy(np.asarray(y))

    def ls_step(state):
        trunk, heads, opt = state
        losses = ((heads(trunk(xt)) - yt) ** 2).mean(dim=0)
        opt.zero_grad()
        losses.mean().backward()
        opt.step()

    def mgda_step(state):
        trunk, heads, opt, engine, weighting = state
        losses = ((heads(trunk(xt)) - yt) ** 2).mean(dim=0)
        gramian = engine.compute_gramian(losses)  # the trunk's task-gradient Gramian
        weights = weighting(gramian)
        opt.zero_grad()
        # Trunk: sum_i w_i g_i; the heads get the mean loss's gradient, as in famo_jax.
        losses.backward(weights.detach(), inputs=list(trunk.parameters()), retain_graph=True)
        losses.mean().backward(inputs=list(heads.parameters()))
        opt.step()

    trunk, heads = build()
    ls_state = (trunk, heads, torch.optim.Adam([*trunk.parameters(), *heads.parameters()], 1e-3))
    trunk, heads = build()
    engine = Engine(trunk, batch_dim=None)
    mgda_state = (
        trunk,
        heads,
        torch.optim.Adam([*trunk.parameters(), *heads.parameters()], 1e-3),
        engine,
        MGDAWeighting(),
    )
    steps = {"LS (PyTorch)": (ls_step, ls_state), TORCHJD: (mgda_step, mgda_state)}
    for fn, state in steps.values():
        for _ in range(settings.warmup):
            fn(state)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(rounds):
        names = list(steps)
        for name in names[r % 2 :] + names[: r % 2]:
            fn, state = steps[name]
            start = time.perf_counter()
            fn(state)
            times[name].append(time.perf_counter() - start)
    out = {}
    for name, values in times.items():
        out[name] = Result(name, k, seconds=_timing.median(values), times=values)
    return out


# --- Reporting ---------------------------------------------------------------------------


def _table(results: list[Result]) -> dict[tuple[str, int], Result]:
    return {(r.method, r.num_tasks): r for r in results}


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def tables(results: list[Result], settings: Settings) -> str:
    table = _table(results)
    ks = settings.ks
    names = list(settings.methods) + ([TORCHJD] if settings.torchjd else [])
    out = []

    def cell(method, k, what):
        r = table.get((method, k))
        if r is None:
            return "n/a"
        if r.skipped and (what == "time" or r.memory_total is None):
            return "skipped"
        ls_name = "LS (PyTorch)" if method == TORCHJD else "LS"
        base = table.get((ls_name, k))
        if what == "time":
            if r.seconds is None:
                return "n/a"
            return f"{_timing.format_seconds(r.seconds)} ({_ratio(r.seconds, base.seconds):.1f}x)"
        if what == "memory":
            if r.memory_total is None:
                return "n/a"
            jac = table.get((method.replace("engine", "jacrev"), k))
            rel = ""
            if method.endswith("engine") and jac is not None and jac.memory_total:
                rel = f" ({r.memory_total / jac.memory_total:.2f} of jacrev)"
            elif base is not None and base.memory_total:
                rel = f" ({r.memory_total / base.memory_total:.1f}x LS)"
            return f"{_timing.format_bytes(r.memory_total)}{rel}"
        if r.flops is None or base is None or not base.flops:
            return "n/a"
        return f"{r.flops / 1e9:.3g} G ({r.flops / base.flops:.1f}x)"

    for what, title in (
        ("time", "Median step time (ratio to LS at the same k, same run)"),
        ("memory", "Compiled memory (argument + output + temp - alias)"),
        ("flops", "XLA FLOPs of one step (ratio to LS; solvers' loops counted once)"),
    ):
        headers = ["k", *[n for n in names if not (what != "time" and n == TORCHJD)]]
        rows = [[str(k), *[cell(n, k, what) for n in headers[1:]]] for k in ks]
        out += [f"{title}:\n", _timing.markdown_table(headers, rows), ""]
    if settings.parts:
        headers = ["k", "LS", *PARTS, "MGDA engine"]
        rows = []
        for k in ks:
            ls = table.get(("LS", k))
            cells = [str(k)]
            for name in headers[1:]:
                r = table.get((name, k))
                if r is None or r.seconds is None or ls is None:
                    cells.append("n/a")
                    continue
                gflops = f"{r.flops / 1e9:.3g} GFLOP, " if r.flops else ""
                rate = f", {r.flops / r.seconds / 1e9:.0f} GFLOP/s" if r.flops else ""
                cells.append(
                    f"{gflops}{_timing.format_seconds(r.seconds)} "
                    f"({r.seconds / ls.seconds:.1f}x LS){rate}"
                )
            rows.append(cells)
        out += [
            "Where the engine's time goes (FLOPs, median time, ratio to LS, achieved rate):\n",
            _timing.markdown_table(headers, rows),
            "",
        ]
    return "\n".join(out)


def targets(results: list[Result], settings: Settings) -> str:
    table = _table(results)
    lines = ["Targets:"]
    for aggregator in AGGREGATORS:
        engine = f"{aggregator} engine"
        for k, limit in TIME_TARGETS.items():
            r, ls = table.get((engine, k)), table.get(("LS", k))
            if r is None or ls is None or r.seconds is None:
                continue
            ratio = r.seconds / ls.seconds
            verdict = "met" if ratio <= limit else "MISSED"
            lines.append(f"- {engine} time at k={k}: {ratio:.1f}x LS (<= {limit}x): {verdict}")
        for k in settings.ks:
            r, jac = table.get((engine, k)), table.get((f"{aggregator} jacrev", k))
            if r is None or r.memory_total is None:
                continue
            if jac is not None and jac.memory_total:  # compiled (timed or not)
                frac = r.memory_total / jac.memory_total
                verdict = "met" if frac <= MEMORY_FRACTION_OF_JACREV else "MISSED"
                lines.append(
                    f"- {engine} memory at k={k}: {frac:.2f} of jacrev's (<= 1/3): {verdict}"
                )
            elif k == 1000:
                verdict = "met" if r.memory_total <= MEMORY_LIMIT_K1000 else "MISSED"
                lines.append(
                    f"- {engine} memory at k=1000: {_timing.format_bytes(r.memory_total)} "
                    f"(<= 2 GiB): {verdict}"
                )
    return "\n".join(lines)


def plot(results: list[Result], settings: Settings, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = _table(results)
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.8))
    styles = {
        "MGDA jacrev": dict(color="tab:red", marker="s", linestyle="--"),
        "MGDA engine": dict(color="tab:red", marker="o"),
        "CAGrad jacrev": dict(color="tab:blue", marker="s", linestyle="--"),
        "CAGrad engine": dict(color="tab:blue", marker="o"),
        TORCHJD: dict(color="tab:green", marker="^", linestyle=":"),
    }
    for method, style in styles.items():
        base_name = "LS (PyTorch)" if method == TORCHJD else "LS"
        points = [
            (k, table[(method, k)], table.get((base_name, k)))
            for k in settings.ks
            if (method, k) in table and table[(method, k)].seconds is not None
        ]
        if points:
            ks = [k for k, _, _ in points]
            ax_time.plot(ks, [r.seconds / b.seconds for _, r, b in points], label=method, **style)
        # Memory wherever the step was compiled, timed or not.
        mems = [
            (k, table[(method, k)].memory_total)
            for k in settings.ks
            if (method, k) in table and table[(method, k)].memory_total
        ]
        if mems:
            ax_mem.plot(
                *zip(*[(k, m / 2**20) for k, m in mems], strict=True), label=method, **style
            )
    ls_mem = [(k, table[("LS", k)].memory_total) for k in settings.ks if ("LS", k) in table]
    if ls_mem:
        ax_mem.plot(
            *zip(*[(k, m / 2**20) for k, m in ls_mem], strict=True), label="LS", color="gray"
        )
    for k, limit in TIME_TARGETS.items():
        ax_time.plot([k], [limit], marker="_", markersize=20, color="black")
    ax_time.axhline(1.0, color="gray", linewidth=0.8)
    for ax in (ax_time, ax_mem):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("number of tasks k")
        ax.grid(True, which="both", alpha=0.3)
    ax_time.set_ylabel("step time / LS step time (same run)")
    ax_mem.set_ylabel("compiled step memory (MiB)")
    ax_time.set_title("Training-step time relative to LS (black: targets)")
    ax_mem.set_title("Memory (XLA: argument + output + temp - alias)")
    ax_time.legend(fontsize=8)
    ax_mem.legend(fontsize=8)
    info = _timing.machine_info()
    fig.suptitle(
        f"Scaling MLP, trunk {settings.model.trunk_params:,} parameters, batch "
        f"{settings.model.batch_size}; {jax.default_backend()}, {info['cpu count']}; "
        f"load average {info.get('load average (1, 5, 15 min)', 'n/a')}",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, seconds (smoke test)")
    parser.add_argument("--ks", type=int, nargs="+", help="numbers of tasks")
    parser.add_argument("--methods", nargs="+", choices=STEPS, help="steps to measure")
    parser.add_argument("--rounds", type=int, help="interleaved timing rounds (at most)")
    parser.add_argument("--round-budget-s", type=float, default=60.0)
    parser.add_argument("--time-budget-s", type=float, default=15.0)
    parser.add_argument("--memory-budget-gib", type=float, default=3.0)
    parser.add_argument("--no-parts", action="store_true", help="skip the time breakdown")
    parser.add_argument(
        "--torchjd",
        choices=("auto", "yes", "no"),
        default="auto",
        help="TorchJD's autogram MGDA (auto: when torch and torchjd are installed)",
    )
    parser.add_argument("--out", type=Path, help="directory for gramian.md/.png/.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[Result]:
    args = parse_args(argv)
    model = scaling.QUICK_MODEL if args.quick else scaling.ModelConfig()
    use_torchjd = args.torchjd == "yes" or (args.torchjd == "auto" and torchjd_available())
    if args.torchjd == "yes" and not torchjd_available():
        raise SystemExit("--torchjd yes: torch and torchjd are not installed")
    settings = Settings(
        model=model,
        ks=tuple(args.ks or (QUICK_KS if args.quick else FULL_KS)),
        methods=tuple(args.methods or STEPS),
        warmup=1 if args.quick else 2,
        rounds=args.rounds or (3 if args.quick else 21),
        round_budget_s=2.0 if args.quick else args.round_budget_s,
        time_budget_s=args.time_budget_s,
        memory_budget_bytes=args.memory_budget_gib * 2**30,
        parts=not args.no_parts,
        torchjd=use_torchjd,
    )
    if "LS" not in settings.methods:
        raise SystemExit("--methods must include LS (every ratio is to LS)")
    header = ["# famo_jax Gramian engine benchmark", ""]
    if args.quick:
        header += ["**--quick: a smoke test on a tiny model, not a measurement.**", ""]
    print("\n".join(header))
    _timing.print_machine_info()
    print(f"Model: {model.describe()}.")
    print(
        "Timing: median wall time per step over interleaved rounds (every step at a k in "
        f"each round, rotating order), up to {settings.rounds} rounds or "
        f"{settings.round_budget_s:.0f} s per k, after {settings.warmup} warm-up calls."
    )
    if not use_torchjd:
        print("TorchJD: not measured (torch and torchjd are not installed).")
    print()
    start = time.perf_counter()
    results = run(settings)
    elapsed = time.perf_counter() - start
    target_lines = targets(results, settings)
    if args.quick:
        target_lines += "\n(--quick: a tiny model; the targets are about the full-size run.)"
    text = "\n".join(["", tables(results, settings), target_lines])
    print(text)
    print(f"\nTotal benchmark time: {elapsed:.0f} s.")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        info = _timing.machine_info()
        machine = "\n".join(f"- {key}: {value}" for key, value in info.items())
        (args.out / "gramian.md").write_text(
            "\n".join(header)
            + f"\nMachine:\n{machine}\n\nModel: {model.describe()}.\n"
            + text
            + "\n"
        )
        (args.out / "gramian.json").write_text(
            json.dumps(
                {"machine": info, "model": asdict(model), "results": [asdict(r) for r in results]},
                indent=1,
            )
        )
        try:
            plot(results, settings, args.out / "gramian.png")
            print(f"Wrote {args.out / 'gramian.md'}, gramian.json and gramian.png.")
        except ImportError:
            print(f"Wrote {args.out / 'gramian.md'} and gramian.json (no matplotlib: no plot).")
    return results


if __name__ == "__main__":
    main()
