"""Step time and memory of every method against the number of tasks k.

A shared-trunk MLP (input 512 -> 1024 -> 512, ReLU, 1,050,112 trunk parameters)
with one linear regression head (512 -> 1, 513 parameters) per task is trained
with Adam (lr 1e-3) on mean squared errors, one loss per task, batch 128. For
each k in {2, 4, 10, 40, 100, 400, 1000} and each method this script compiles
one jitted training step, reads XLA's compiled memory analysis, and times the
step (median over repeats after warm-up, ``block_until_ready`` after each call):

- ``LS``: linear scalarization, the gradient of the mean loss (one forward and
  one backward pass); every ratio is to LS at the same k, measured in the same
  run.
- ``FAMO lagged``: one forward and one backward pass of FAMO's weighted loss,
  then ``update(losses[t-1], losses[t])`` with the losses the step computed
  anyway (no extra forward pass).
- ``FAMO same-batch``: the authors' mode: after the model step, the losses are
  re-computed on the same batch (one extra forward pass, no gradient) and
  ``update(prev, curr)`` is called.
- ``CAGrad``, ``MGDA``, ``PCGrad``, ``IMTL-G``, ``Nash-MTL``, ``DB-MTL``,
  ``ExcessMTL``, ``GradNorm`` (on the trunk's last layer), ``GradVac``,
  ``MoCo``, ``MoDo`` and ``SDMGrad`` (both with the weights from the step's own
  Gram matrix, their single-batch mode), ``UPGrad``, ``DualProj``,
  ``Aligned-MTL``, ``ConFIG``, ``FairGrad``, ``Krum`` (``n_byzantine=0``, from
  k = 3), ``TrimmedMean`` (``trim_number=1``, from k = 3), ``CR-MOGM (UPGrad)``:
  gradient aggregators (their default hyperparameters; the step's losses as
  ``losses=``): the per-task gradients of the
  shared trunk (``famo_jax.task_gradients``, i.e. ``jax.jacrev`` of the loss
  vector: one forward pass and k vectorised backward passes, stacked on a
  leading task axis) are combined by the aggregator; the heads get the gradient
  of the mean loss (each head its own task's gradient / k).
- ``O(k) floor``: the same per-task gradients combined with closed-form
  weights ``w_i ~ 1 / ||g_i||`` read off their Gram matrix: what every
  Gram-based aggregator pays before its simplex solver.

LS and both FAMO modes are timed in interleaved rounds (one call of each per
round, rotating order), so their ratios are robust to drifts of the machine's
load. Memory is ``argument + output + temp - alias`` bytes of XLA's buffer
assignment for the step (``alias``: outputs written into the donated input
buffers of parameters and optimizer states).

Budgets: an aggregator is skipped at k (and every larger k) when its per-task
gradients alone, or its compiled memory, exceed ``--memory-budget-gib``, or
when its step time predicted from the previous k (linear in k) exceeds
``--time-budget-s``; the tables say which.

No recompilation in the timed loops: every step is compiled ahead of time
(``jax.jit(step).lower(...).compile()``, which also fills jit's cache), and
each timed loop runs inside a counter of ``jax.monitoring`` trace and
compilation events that raises if any happened (the count is printed).

Run from the repository root: ``python -m benchmarks.scaling --out DIR`` (full; a
few minutes) or ``python -m benchmarks.scaling --quick`` (tiny sizes, seconds).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import famo_jax
from benchmarks import _timing
from famo_jax import aggregation

FULL_KS = (2, 4, 10, 40, 100, 400, 1000)
QUICK_KS = (2, 4, 10)
LOSS_WEIGHTINGS = ("LS", "FAMO lagged", "FAMO same-batch")


def of_num_tasks(
    build: Callable[[int], optax.GradientTransformation],
) -> Callable[[int], optax.GradientTransformation]:
    """Marks an ``AGGREGATORS`` factory that takes the number of tasks."""
    build.takes_num_tasks = True  # type: ignore[attr-defined]
    return build


# The paper's last shared layer: the trunk's second (last) linear layer.
TRUNK_LAST_LAYER = {"w1": False, "b1": False, "w2": True, "b2": True}

# Display name -> factory of the O(k) methods (the floor is defined below): no
# argument, or the number of tasks for those marked with ``of_num_tasks``.
AGGREGATORS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "O(k) floor": lambda: floor_aggregator(),
    "CAGrad": famo_jax.cagrad,
    "MGDA": famo_jax.mgda,
    "PCGrad": famo_jax.pcgrad,
    "IMTL-G": famo_jax.imtl_g,
    "Nash-MTL": famo_jax.nash_mtl,
    # LibMTL's and TorchJD's (issue 14); MoDo and SDMGrad in their single-batch mode.
    "DB-MTL": of_num_tasks(famo_jax.db_mtl),
    "ExcessMTL": of_num_tasks(famo_jax.excess_mtl),
    "GradNorm": of_num_tasks(lambda k: famo_jax.gradnorm(k, last_shared_layer=TRUNK_LAST_LAYER)),
    "GradVac": of_num_tasks(famo_jax.gradvac),
    "MoCo": of_num_tasks(famo_jax.moco),
    "MoDo": of_num_tasks(famo_jax.modo),
    "SDMGrad": of_num_tasks(famo_jax.sdmgrad),
    # TorchJD's aggregators and FairGrad (issue 14, breadth_a), defaults as in TorchJD.
    "UPGrad": famo_jax.upgrad,
    "DualProj": famo_jax.dualproj,
    "Aligned-MTL": famo_jax.aligned_mtl,
    "ConFIG": famo_jax.con_fig,
    "FairGrad": famo_jax.fairgrad,
    "Krum": lambda: famo_jax.krum(n_byzantine=0),
    "TrimmedMean": lambda: famo_jax.trimmed_mean(1),
    "CR-MOGM (UPGrad)": of_num_tasks(lambda k: famo_jax.cr_mogm(k, aggregation.upgrad_weights)),
}
# The fewest tasks a method accepts: below, it is skipped at that k only.
MIN_TASKS = {"Krum": 3, "TrimmedMean": 3}
METHODS = LOSS_WEIGHTINGS + tuple(AGGREGATORS)


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of the shared-trunk MLP and its batch."""

    input_dim: int = 512
    hidden_dim: int = 1024
    feature_dim: int = 512
    batch_size: int = 128

    @property
    def trunk_params(self) -> int:
        return (
            self.input_dim * self.hidden_dim
            + self.hidden_dim
            + self.hidden_dim * self.feature_dim
            + self.feature_dim
        )

    def head_params(self, num_tasks: int) -> int:
        return num_tasks * (self.feature_dim + 1)

    def describe(self) -> str:
        return (
            f"trunk {self.input_dim} -> {self.hidden_dim} -> {self.feature_dim} (ReLU), "
            f"{self.trunk_params:,} parameters; one linear head {self.feature_dim} -> 1 "
            f"({self.feature_dim + 1} parameters) per task; batch {self.batch_size}; "
            "float32; Adam lr 1e-3"
        )


QUICK_MODEL = ModelConfig(input_dim=16, hidden_dim=32, feature_dim=16, batch_size=8)


# --- The model -----------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(1, 2))  # one compilation, not one per op
def init_params(key: jax.Array, cfg: ModelConfig, num_tasks: int) -> dict:
    """Trunk and stacked heads: ``heads["w"]`` is ``(num_tasks, feature_dim)``."""
    k1, k2, k3 = jax.random.split(key, 3)
    he = jax.nn.initializers.he_normal()
    return {
        "trunk": {
            "w1": he(k1, (cfg.input_dim, cfg.hidden_dim)),
            "b1": jnp.zeros(cfg.hidden_dim),
            "w2": he(k2, (cfg.hidden_dim, cfg.feature_dim)),
            "b2": jnp.zeros(cfg.feature_dim),
        },
        "heads": {
            "w": jax.nn.initializers.lecun_normal()(k3, (num_tasks, cfg.feature_dim)),
            "b": jnp.zeros(num_tasks),
        },
    }


def features(trunk: dict, x: jax.Array) -> jax.Array:
    h = jax.nn.relu(x @ trunk["w1"] + trunk["b1"])
    return jax.nn.relu(h @ trunk["w2"] + trunk["b2"])


def head_losses(heads: dict, feats: jax.Array, y: jax.Array) -> jax.Array:
    """Mean squared error of every task, shape ``(num_tasks,)``."""
    predictions = feats @ heads["w"].T + heads["b"]
    return jnp.mean((predictions - y) ** 2, axis=0)


def task_losses(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    return head_losses(params["heads"], features(params["trunk"], x), y)


@functools.partial(jax.jit, static_argnums=(1, 2))
def make_batch(key: jax.Array, cfg: ModelConfig, num_tasks: int) -> tuple[jax.Array, jax.Array]:
    kx, ky = jax.random.split(key)
    x = jax.random.normal(kx, (cfg.batch_size, cfg.input_dim))
    y = jax.random.normal(ky, (cfg.batch_size, num_tasks))
    return x, y


# --- Training steps: carry = step(carry, x, y) ---------------------------------------

MODEL_OPTIMIZER = optax.adam(1e-3)


def _apply(params, opt_state, grads):
    updates, opt_state = MODEL_OPTIMIZER.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def make_ls(params: dict, x: jax.Array, y: jax.Array) -> tuple[Callable, Any]:
    num_tasks = y.shape[1]
    weighting = famo_jax.linear_scalarization(num_tasks)

    def step(carry, x, y):
        params, opt_state, state = carry
        objective = lambda p: weighting.weigh(task_losses(p, x, y), state)
        grads = jax.grad(objective)(params)
        params, opt_state = _apply(params, opt_state, grads)
        return params, opt_state, state

    return step, (params, MODEL_OPTIMIZER.init(params), weighting.init())


def make_famo_lagged(
    params: dict, x: jax.Array, y: jax.Array, **famo_kwargs: Any
) -> tuple[Callable, Any]:
    num_tasks = y.shape[1]
    weighting = famo_jax.famo(num_tasks, **famo_kwargs)

    def step(carry, x, y):
        params, opt_state, state, prev_losses = carry

        def objective(p):
            losses = task_losses(p, x, y)
            return weighting.weigh(losses, state), losses

        grads, losses = jax.grad(objective, has_aux=True)(params)
        params, opt_state = _apply(params, opt_state, grads)
        # No extra forward pass: the losses of this step against the previous one's.
        state = weighting.update(prev_losses, losses, state)
        return params, opt_state, state, losses

    # The first step has no previous losses: starting them at NaN makes FAMO skip
    # that update (its documented rule for non-finite losses), with no branch in
    # the step. (A lax.cond on the step index costs far more than the update on
    # the CPU backend.) A previous forward pass at the same parameters would not
    # do: its losses differ from the step's by rounding, and Adam turns such a
    # ~1e-8 change of the log losses into a full-size logits step.
    no_losses = jnp.full((num_tasks,), jnp.nan, y.dtype)
    return step, (params, MODEL_OPTIMIZER.init(params), weighting.init(), no_losses)


def make_famo_same_batch(
    params: dict, x: jax.Array, y: jax.Array, **famo_kwargs: Any
) -> tuple[Callable, Any]:
    num_tasks = y.shape[1]
    weighting = famo_jax.famo(num_tasks, **famo_kwargs)

    def step(carry, x, y):
        params, opt_state, state = carry

        def objective(p):
            losses = task_losses(p, x, y)
            return weighting.weigh(losses, state), losses

        grads, losses = jax.grad(objective, has_aux=True)(params)
        params, opt_state = _apply(params, opt_state, grads)
        # The authors' update: the same batch's losses after the step.
        state = weighting.update(losses, task_losses(params, x, y), state)
        return params, opt_state, state

    return step, (params, MODEL_OPTIMIZER.init(params), weighting.init())


def trunk_task_gradients(params: dict, x: jax.Array, y: jax.Array) -> tuple[dict, jax.Array]:
    """Per-task gradients of the trunk (leading task axis) and the features.

    ``famo_jax.task_gradients`` (``jax.jacrev``) runs the forward pass once and
    vmaps the backward pass over the k unit cotangents of the loss vector.
    """

    def losses_and_features(trunk):
        feats = features(trunk, x)
        return head_losses(params["heads"], feats, y), feats

    (_, feats), task_grads = famo_jax.task_gradients(losses_and_features, has_aux=True)(
        params["trunk"]
    )
    return task_grads, feats


def floor_aggregator() -> optax.GradientTransformation:
    """The work every Gram-based aggregator does, with a closed-form solver.

    Combines the task gradients with weights ``w_i ~ 1 / ||g_i||`` (normalised
    to sum to one) read off their ``k x k`` Gram matrix. With the per-task
    gradients in front of it, it is the floor of the O(k) methods: the k
    backward passes, the stacked gradients and the Gram matrix, without a
    simplex solver.
    """

    def init(params):
        del params
        return optax.EmptyState()

    def update(task_grads, state, params=None):
        del params
        gram = aggregation.gram_matrix(task_grads)
        inverse_norms = jax.lax.rsqrt(jnp.diag(gram) + 1e-12)
        weights = inverse_norms / jnp.sum(inverse_norms)
        return aggregation.combine(task_grads, weights), state

    return optax.GradientTransformation(init, update)


def make_aggregator(name: str) -> Callable:
    factory = AGGREGATORS[name]

    def make(params: dict, x: jax.Array, y: jax.Array) -> tuple[Callable, Any]:
        num_tasks = y.shape[1]
        built = factory(num_tasks) if getattr(factory, "takes_num_tasks", False) else factory()
        # Every aggregator gets the step's losses (MoCo, DB-MTL and GradNorm read them).
        aggregator = optax.with_extra_args_support(built)

        def step(carry, x, y):
            params, opt_state, agg_state = carry
            task_grads, feats = trunk_task_gradients(params, x, y)
            losses = head_losses(params["heads"], feats, y)
            # Each head only affects its own task: its gradient is that of the mean loss.
            head_grads = jax.grad(lambda h: jnp.mean(head_losses(h, feats, y)))(params["heads"])
            trunk_grads, agg_state = aggregator.update(
                task_grads, agg_state, params["trunk"], losses=losses
            )
            grads = {"trunk": trunk_grads, "heads": head_grads}
            params, opt_state = _apply(params, opt_state, grads)
            return params, opt_state, agg_state

        carry = (params, MODEL_OPTIMIZER.init(params), aggregator.init(params["trunk"]))
        return step, carry

    return make


def step_factories() -> dict[str, Callable]:
    """Method name -> ``(params, x, y) -> (step, carry)``."""
    methods: dict[str, Callable] = {
        "LS": make_ls,
        "FAMO lagged": make_famo_lagged,
        "FAMO same-batch": make_famo_same_batch,
    }
    for name in AGGREGATORS:
        methods[name] = make_aggregator(name)
    return methods


# --- Measurement ---------------------------------------------------------------------


@dataclass
class Result:
    method: str
    num_tasks: int
    seconds: float | None = None  # median step time
    times: list[float] = field(default_factory=list)
    memory: dict | None = None  # MemoryStats fields, bytes
    memory_total: int | None = None
    compile_seconds: float | None = None
    flops: float | None = None  # XLA's cost-analysis estimate for one step
    skipped: str | None = None  # why the method was not measured at this k


@dataclass
class Settings:
    model: ModelConfig
    ks: tuple[int, ...]
    methods: tuple[str, ...]
    warmup: int
    rounds: int  # interleaved rounds of LS and FAMO
    repeats: int  # timed calls of each aggregator (at most)
    max_seconds: float  # stop timing an aggregator after this many timed seconds
    time_budget_s: float
    memory_budget_bytes: float


def _predict_seconds(history: list[tuple[int, float]], num_tasks: int) -> float | None:
    """Linear extrapolation in k of the step time from the last measured k.

    The O(k) methods' cost is dominated by the k backward passes up to the k
    this benchmark reaches; a fit of the growth between two noisy points would
    skip methods that would have fitted the budget.
    """
    if not history:
        return None
    last_k, last_seconds = history[-1]
    return last_seconds * num_tasks / last_k


def _skip_reason(
    method: str, num_tasks: int, settings: Settings, history: list[tuple[int, float]]
) -> str | None:
    """Why an aggregator is not measured at this k (predicted over a budget), or None."""
    if method not in AGGREGATORS:
        return None
    if num_tasks < MIN_TASKS.get(method, 1):
        return f"needs k >= {MIN_TASKS[method]}"
    grads_bytes = 4 * num_tasks * settings.model.trunk_params
    if grads_bytes > settings.memory_budget_bytes:
        return f"per-task gradients {_timing.format_bytes(grads_bytes)} > memory budget"
    predicted = _predict_seconds(history, num_tasks)
    if predicted is not None and predicted > settings.time_budget_s:
        return f"predicted step {predicted:.1f} s > time budget"
    return None


def _compile(result: Result, factory: Callable, params, x, y, settings: Settings):
    """Compiles a method's step, recording its cost; ``(fn, carry)`` or None if over budget."""
    step, carry = factory(params, x, y)
    compiled = _timing.compile_step(step, carry, x, y)
    result.compile_seconds, result.flops = compiled.seconds, compiled.flops
    if compiled.memory is not None:
        result.memory, result.memory_total = asdict(compiled.memory), compiled.memory.total
        if result.method in AGGREGATORS and compiled.memory.total > settings.memory_budget_bytes:
            total = _timing.format_bytes(compiled.memory.total)
            result.skipped = f"compiled memory {total} > memory budget"
            return None
    return compiled.fn, carry


def _time_row(compiled: dict[str, tuple[Callable, Any]], x, y, settings: Settings, num_tasks):
    """Method -> step times: the loss weightings interleaved, each aggregator on its own."""
    times: dict[str, list[float]] = {}
    weightings = {m: compiled[m] for m in LOSS_WEIGHTINGS if m in compiled}
    if weightings:
        times |= _timing.time_interleaved(
            {m: (fn, carry, (x, y)) for m, (fn, carry) in weightings.items()},
            warmup=settings.warmup,
            rounds=settings.rounds,
            label=f"loss weightings at k={num_tasks}",
        )
    for method in AGGREGATORS:
        if method in compiled:
            fn, carry = compiled[method]
            times[method] = _timing.time_steps(
                fn,
                carry,
                (x, y),
                warmup=settings.warmup,
                repeats=settings.repeats,
                max_seconds=settings.max_seconds,
                label=f"{method} at k={num_tasks}",
            )
    return times


def _status(result: Result) -> str:
    if result.skipped:
        return f"skipped ({result.skipped})"
    return (
        f"{_timing.format_seconds(result.seconds)} median of {len(result.times)}, "
        f"memory {_timing.format_bytes(result.memory_total or 0)}, "
        f"compiled in {result.compile_seconds:.1f} s"
    )


def run(settings: Settings, log: Callable[[str], None] = print) -> list[Result]:
    """Every method at every k; an aggregator skipped at one k is skipped at all larger k."""
    factories = step_factories()
    results: list[Result] = []
    skip_from: dict[str, str] = {}
    history: dict[str, list[tuple[int, float]]] = {m: [] for m in settings.methods}
    key = jax.random.key(0)
    for num_tasks in settings.ks:
        k_params, k_batch = jax.random.split(jax.random.fold_in(key, num_tasks))
        params = init_params(k_params, settings.model, num_tasks)
        x, y = make_batch(k_batch, settings.model, num_tasks)
        row = {method: Result(method, num_tasks) for method in settings.methods}
        compiled: dict[str, tuple[Callable, Any]] = {}
        for method, result in row.items():
            result.skipped = skip_from.get(method) or _skip_reason(
                method, num_tasks, settings, history[method]
            )
            if result.skipped is None:
                entry = _compile(result, factories[method], params, x, y, settings)
                if entry is not None:
                    compiled[method] = entry
            too_few_tasks = num_tasks < MIN_TASKS.get(method, 1)
            if result.skipped is not None and method in AGGREGATORS and not too_few_tasks:
                skip_from[method] = result.skipped
        for method, values in _time_row(compiled, x, y, settings, num_tasks).items():
            row[method].times = values
        for method, result in row.items():
            if result.times:
                result.seconds = _timing.median(result.times)
                history[method].append((num_tasks, result.seconds))
            results.append(result)
            log(f"  k={num_tasks:<5} {method:<16} {_status(result)}")
        del compiled, params, x, y
    return results


# --- Reporting -----------------------------------------------------------------------


def _by_key(results: list[Result]) -> dict[tuple[str, int], Result]:
    return {(r.method, r.num_tasks): r for r in results}


def _value(result: Result, what: str) -> float | None:
    return {"time": result.seconds, "memory": result.memory_total, "flops": result.flops}[what]


def ratio(results: list[Result], method: str, num_tasks: int, what: str) -> float | None:
    """``what`` ("time", "memory" or "flops") of a method over that of LS at the same k."""
    table = _by_key(results)
    r, base = table.get((method, num_tasks)), table.get(("LS", num_tasks))
    if r is None or base is None:
        return None
    a, b = _value(r, what), _value(base, what)
    if a is None or not b:
        return None
    return a / b


def _format(value: float, what: str) -> str:
    if what == "time":
        return _timing.format_seconds(value)
    if what == "memory":
        return _timing.format_bytes(value)
    return f"{value / 1e9:.3g} GFLOP"


TABLE_TITLES = {
    "time": "Median step time (ratio to LS at the same k)",
    "memory": "Memory: argument + output + temp - alias bytes of the compiled step (ratio to LS)",
    "flops": "XLA's estimate of the floating-point operations of one step (ratio to LS; "
    "a while loop's body is counted once, so iterative solvers are undercounted)",
}


def tables(results: list[Result], settings: Settings) -> str:
    table = _by_key(results)
    methods = list(settings.methods)
    headers = ["k", *methods]
    out = []
    for what, title in TABLE_TITLES.items():
        rows = []
        for k in settings.ks:
            row = [str(k)]
            for m in methods:
                r = table[(m, k)]
                value = _value(r, what)
                if r.skipped:
                    row.append("skipped" if value is None else f"{_format(value, what)} (skipped)")
                elif value is None:
                    row.append("n/a")
                else:
                    row.append(f"{_format(value, what)} ({ratio(results, m, k, what):.2f}x)")
            rows.append(row)
        out.append(f"{title}:\n")
        out.append(_timing.markdown_table(headers, rows))
        out.append("")
    first_skip: dict[str, tuple[int, str]] = {}
    for r in results:
        if r.skipped and r.method not in first_skip:
            first_skip[r.method] = (r.num_tasks, r.skipped)
    if first_skip:
        out.append("Skipped:")
        for m, (k, why) in first_skip.items():
            out.append(f"- {m} from k={k}: {why}")
    return "\n".join(out)


def targets(results: list[Result], settings: Settings) -> str:
    lines = ["Targets (ratio to LS at every k):"]
    checks = [
        ("FAMO lagged", "time", 1.05),
        ("FAMO lagged", "memory", 1.05),
        ("FAMO same-batch", "time", 1.4),
    ]
    for method, what, limit in checks:
        values = [
            (k, ratio(results, method, k, what))
            for k in settings.ks
            if ratio(results, method, k, what) is not None
        ]
        if not values:
            continue
        worst_k, worst = max(values, key=lambda kv: kv[1])
        verdict = "met" if worst <= limit else "MISSED"
        lines.append(
            f"- {method} {what}: worst {worst:.3f}x at k={worst_k} (target <= {limit}x): {verdict}"
        )
    return "\n".join(lines)


def plot(results: list[Result], settings: Settings, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.8))
    # Cycled: more methods than markers or colours repeat them in other pairs.
    markers = dict(zip(METHODS, itertools.cycle("os^hDvP*Xd<>p")))
    palette = ["tab:blue", "tab:orange", "tab:green", "gray", "tab:red", "tab:purple"]
    palette += ["tab:brown", "tab:pink", "tab:olive", "tab:cyan", "black"]
    # Then the light halves of tab20, so that the first 19 methods differ in colour.
    palette += list(plt.get_cmap("tab20").colors[1::2])
    colors = dict(zip(METHODS, itertools.cycle(palette)))
    for method in settings.methods:
        points = [
            (r.num_tasks, ratio(results, method, r.num_tasks, "time"), r.memory_total)
            for r in results
            if r.method == method and r.seconds is not None
        ]
        if not points:
            continue
        ks, ratios, mems = zip(*points, strict=True)
        style = dict(marker=markers.get(method, "o"), label=method, color=colors[method])
        if method.startswith("FAMO") or method == "LS":
            style["linewidth"] = 2.5
        elif method == "O(k) floor":
            style["linestyle"] = "--"
        ax_time.plot(ks, ratios, **style)
        if all(m is not None for m in mems):
            ax_mem.plot(ks, np.asarray(mems) / 2**20, **style)
    ax_time.axhline(1.0, color="gray", linewidth=0.8)
    for ax in (ax_time, ax_mem):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("number of tasks k")
        ax.grid(True, which="both", alpha=0.3)
    ax_time.set_ylabel("step time / LS step time")
    ax_mem.set_ylabel("compiled step memory (MiB)")
    ax_time.set_title("Training-step time relative to LS")
    ax_mem.set_title("Memory (XLA: argument + output + temp - alias)")
    ax_time.legend(fontsize=8)
    info = _timing.machine_info()
    fig.suptitle(
        f"Shared trunk of {settings.model.trunk_params:,} parameters, batch "
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
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds")
    parser.add_argument("--ks", type=int, nargs="+", help="numbers of tasks to measure")
    parser.add_argument("--methods", nargs="+", choices=METHODS, help="methods to measure")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--rounds", type=int, help="interleaved rounds of LS and FAMO")
    parser.add_argument("--repeats", type=int, help="max timed calls of each aggregator")
    parser.add_argument("--time-budget-s", type=float, default=3.0)
    parser.add_argument("--memory-budget-gib", type=float, default=3.0)
    parser.add_argument(
        "--out",
        type=Path,
        help="directory for scaling.png, scaling.md and scaling.json (default: write nothing; "
        "docs/ holds the committed ones)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[Result]:
    args = parse_args(argv)
    model = QUICK_MODEL if args.quick else ModelConfig()
    if args.batch_size:
        model = ModelConfig(**{**asdict(model), "batch_size": args.batch_size})
    settings = Settings(
        model=model,
        ks=tuple(args.ks or (QUICK_KS if args.quick else FULL_KS)),
        methods=tuple(args.methods or METHODS),
        warmup=1 if args.quick else 2,
        rounds=args.rounds or (3 if args.quick else 50),
        repeats=args.repeats or (3 if args.quick else 10),
        max_seconds=1.0 if args.quick else 8.0,
        time_budget_s=args.time_budget_s,
        memory_budget_bytes=args.memory_budget_gib * 2**30,
    )
    print("# famo_jax scaling benchmark\n")
    _timing.print_machine_info()
    print(f"Model: {model.describe()}.")
    print("FAMO: famo_jax.famo(k) defaults (logits lr 0.025, gamma 0.001).")
    print(
        f"Timing: median wall time per step; LS and FAMO in {settings.rounds} interleaved "
        f"rounds after {settings.warmup} warm-up calls each; aggregators up to "
        f"{settings.repeats} calls (or {settings.max_seconds:.0f} s) after {settings.warmup} "
        "warm-up calls."
    )
    print(
        f"Budgets for the aggregators: step time <= {settings.time_budget_s} s (predicted), "
        f"memory <= {args.memory_budget_gib} GiB.\n"
    )
    if args.quick:
        print("(--quick: a smoke test on a tiny model; the figures mean nothing.)\n")
    start = time.perf_counter()
    traces_before, compiles_before = _timing.total_compile_events()
    results = run(settings)
    traces, compiles = (
        a - b
        for a, b in zip(
            _timing.total_compile_events(), (traces_before, compiles_before), strict=True
        )
    )
    elapsed = time.perf_counter() - start
    measured = sum(1 for r in results if r.seconds is not None)
    report = tables(results, settings) + "\n\n" + targets(results, settings)
    print()
    print(report)
    if args.quick:
        print(
            "(--quick: tiny model, so fixed per-call costs dominate the times; the targets "
            "are about the full-size run.)"
        )
    print(
        f"\nRecompilation check: {traces} traces and {compiles} XLA compilations in total, all "
        f"before the timed loops ({measured} steps compiled ahead of time); 0 inside them."
    )
    print(f"Total benchmark time: {elapsed:.0f} s.")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        # The measurements first: a failing plot must not lose them.
        (args.out / "scaling.md").write_text(report + "\n")
        payload = {
            "machine": _timing.machine_info(),
            "model": asdict(model),
            "results": [asdict(r) for r in results],
        }
        (args.out / "scaling.json").write_text(json.dumps(payload, indent=1))
        plot(results, settings, args.out / "scaling.png")
        print(f"Wrote scaling.png, scaling.md and scaling.json to {args.out}.")
    return results


if __name__ == "__main__":
    main()
