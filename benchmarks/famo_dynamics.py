"""Why FAMO stalls or spikes out of the box: its per-step dynamics, and what fixes them.

Three problems, each run for several initialisations vmapped in one jitted
``lax.scan`` per method:

- ``full``: a shared tanh MLP (16 -> 128 -> 128, ``--hidden``) with 11 linear regression heads;
  target ``i`` is ``s_i * sin(x . a_i + phi_i)`` plus 1% noise with scales
  ``s_i = 10**linspace(-2, 2, 11)`` (mean squared errors from about 1e-4 to
  1e4), 512 examples, full batch, Adam 1e-3, 3,000 steps, 5 initialisations;
- ``minibatch``: the same with 2,048 examples, batches of 128 and scales
  ``10**linspace(-3, 3, 11)`` (losses from about 1e-6 to 1e6); the losses are
  evaluated on the whole training set every ``eval_every`` steps;
- ``toy``: the two-task toy of the FAMO paper (Appendix D), Adam 1e-3,
  50,000 steps from the authors' five starts, ``min_losses = (-2.1, -21)``.

Every method trains the model on ``weighting.weigh(losses, state)`` and, for
FAMO-like methods, advances the logits with the authors' same-batch update
(``update(l_t, l_t after the step on the same batch)``) or the lagged one
(``update(l_{t-1}, l_t)``, no extra forward pass, the first step skipped through
NaN previous losses). Per step the script records the task losses, FAMO's
logits and renormaliser ``c_t = 1 / sum_i(z_i / (l_i - m_i + eps))``, the factor
``sum_i w_i (l_i - m_i)`` that multiplies the convex combination of log-loss
gradients the model follows (``c_t`` for FAMO, 1 for the log objective), the
norms of the model's gradient and of its Adam update, and the norm of the
logits gradient ``z * (delta - <z, delta>)``.

Rows: LS, SI, reference FAMO at gamma in {0, 1e-3, 1e-2}, the robust FAMO
candidate (``benchmarks.robust_famo``),
and ablations that switch off one mechanism at a time: the logits frozen at
zero (FAMO's direction is then SI's, times ``c_t``), decoupled instead of coupled
decay, ``c_t`` frozen at its initial value, no ``c_t`` at all (the model follows
``sum_i z_i grad log(l_i - m_i)``), and the model's Adam beta2 (0.9, 0.99
instead of 0.999).

Run::

    python -m benchmarks.famo_dynamics --out docs/famo_dynamics   # figures + tables
    python -m benchmarks.famo_dynamics --quick                     # seconds (smoke test)

Without ``--out`` nothing is written; with it, ``DIR/famo_dynamics.md`` (the
tables) and one PNG per problem.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import famo_jax
from benchmarks.robust_famo import robust_famo
from famo_jax import problems

EPS = 1e-8

# ----------------------------------------------------------------------------
# Problems.


class Problem(NamedTuple):
    """A multitask problem: its losses, data, initialisation and training length.

    Attributes:
      name: ``"full"``, ``"minibatch"`` or ``"toy"``.
      num_tasks: ``k``.
      init_params: ``seed_input -> params`` (a PRNG key, or a toy start).
      task_losses: ``(params, batch_indices) -> (k,)`` losses on a batch
        (``batch_indices`` is None for full-batch problems).
      eval_losses: ``params -> (k,)`` losses on the whole training set.
      num_train: training examples (0 for the toy).
      batch_size: examples per step (None: full batch).
      steps: model steps.
      eval_every: steps between evaluations of ``eval_losses``.
      min_losses: ``(k,)`` lower bounds of the losses (FAMO's ``m``).
      seed_inputs: ``(num_seeds, ...)``: one entry per initialisation.
      description: one sentence.
    """

    name: str
    num_tasks: int
    init_params: Callable[[Any], Any]
    task_losses: Callable[[Any, Any], jax.Array]
    eval_losses: Callable[[Any], jax.Array]
    num_train: int
    batch_size: int | None
    steps: int
    eval_every: int
    min_losses: np.ndarray
    seed_inputs: Any
    description: str


def _mlp_init(key, input_dim: int, hidden: Sequence[int], num_tasks: int) -> dict:
    keys = jax.random.split(key, len(hidden) + 1)
    glorot = jax.nn.initializers.glorot_normal()
    widths = [input_dim, *hidden]
    trunk = [
        {"w": glorot(k, (a, b)), "b": jnp.zeros(b)}
        for k, a, b in zip(keys[:-1], widths[:-1], widths[1:], strict=True)
    ]
    heads = {"w": glorot(keys[-1], (widths[-1], num_tasks)), "b": jnp.zeros(num_tasks)}
    return {"trunk": trunk, "heads": heads}


def _mlp_apply(params: dict, x: jax.Array) -> jax.Array:
    h = x
    for layer in params["trunk"]:
        h = jnp.tanh(h @ layer["w"] + layer["b"])
    return h @ params["heads"]["w"] + params["heads"]["b"]


def make_regression(
    name: str,
    num_train: int,
    scales: np.ndarray,
    batch_size: int | None,
    steps: int = 3000,
    num_seeds: int = 5,
    eval_every: int = 1,
    input_dim: int = 16,
    hidden: Sequence[int] = (128, 128),
    noise: float = 0.01,
    data_seed: int = 0,
) -> Problem:
    """The multi-scale regression: ``y_i = s_i (sin(x . a_i + phi_i) + noise)``.

    The data are fixed by ``data_seed``; the seeds differ in the model's
    initialisation and (for mini-batches) in the batch order.
    """
    scales = np.asarray(scales, np.float64)
    k = len(scales)
    rng = np.random.default_rng(data_seed)
    x = rng.standard_normal((num_train, input_dim))
    directions = rng.standard_normal((input_dim, k)) / np.sqrt(input_dim)
    phases = rng.uniform(0.0, 2.0 * np.pi, k)
    clean = np.sin(x @ directions + phases)
    y = scales * (clean + noise * rng.standard_normal((num_train, k)))
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)

    def losses_on(params, xs, ys):
        return jnp.mean((_mlp_apply(params, xs) - ys) ** 2, axis=0)

    def task_losses(params, batch):
        if batch is None:
            return losses_on(params, x, y)
        return losses_on(params, x[batch], y[batch])

    batch_text = "full batch" if batch_size is None else f"batches of {batch_size}"
    description = (
        f"{k} regression heads on a shared tanh MLP {list(hidden)}, target scales "
        f"{scales[0]:.0e}..{scales[-1]:.0e} (losses ~{0.5 * scales[0] ** 2:.0e}.."
        f"{0.5 * scales[-1] ** 2:.0e}), {num_train} examples, {batch_text}, Adam 1e-3, "
        f"{steps} steps, {num_seeds} initialisations"
    )
    return Problem(
        name=name,
        num_tasks=k,
        init_params=lambda key: _mlp_init(key, input_dim, hidden, k),
        task_losses=task_losses,
        eval_losses=lambda params: losses_on(params, x, y),
        num_train=num_train,
        batch_size=batch_size,
        steps=steps,
        eval_every=eval_every,
        min_losses=np.zeros(k),
        seed_inputs=jax.random.split(jax.random.key(1), num_seeds),
        description=description,
    )


def make_toy(steps: int = 50_000) -> Problem:
    """The FAMO paper's toy (Appendix D) from the authors' five starts."""
    return Problem(
        name="toy",
        num_tasks=2,
        init_params=lambda start: start,
        task_losses=lambda theta, batch: problems.toy_losses(theta),
        eval_losses=problems.toy_losses,
        num_train=0,
        batch_size=None,
        steps=steps,
        eval_every=1,
        min_losses=np.asarray(problems.TOY_MIN_LOSSES),
        seed_inputs=jnp.asarray(problems.TOY_STARTS, jnp.float32),
        description=(
            f"the FAMO paper's two-task toy (Appendix D), Adam 1e-3, {steps} steps from "
            "the authors' 5 starts, min_losses (-2.1, -21)"
        ),
    )


def make_problems(
    quick: bool = False, hidden: Sequence[int] = (128, 128), num_seeds: int = 5
) -> dict[str, Problem]:
    """The three problems at full settings, or tiny ones for ``--quick``."""
    if quick:
        return {
            "full": make_regression(
                "full",
                64,
                10.0 ** np.linspace(-2, 2, 5),
                None,
                steps=60,
                num_seeds=2,
                hidden=(16,),
            ),
            "minibatch": make_regression(
                "minibatch",
                128,
                10.0 ** np.linspace(-3, 3, 5),
                16,
                steps=60,
                num_seeds=2,
                eval_every=10,
                hidden=(16,),
            ),
            "toy": make_toy(steps=200),
        }
    return {
        "full": make_regression(
            "full", 512, 10.0 ** np.linspace(-2, 2, 11), None, hidden=hidden, num_seeds=num_seeds
        ),
        "minibatch": make_regression(
            "minibatch",
            2048,
            10.0 ** np.linspace(-3, 3, 11),
            128,
            eval_every=10,
            hidden=hidden,
            num_seeds=num_seeds,
        ),
        "toy": make_toy(),
    }


# ----------------------------------------------------------------------------
# Methods.


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row: a loss weighting, how its update is called, and the model optimizer.

    Attributes:
      name: row label.
      kind: ``"ls"``, ``"si"`` (mean log of ``l - m``), ``"famo"`` (the
        reference ``famo_jax.famo``), ``"robust"`` (the robust FAMO
        candidate, ``benchmarks.robust_famo``)
        or ``"ablation"`` (FAMO with one mechanism changed, see below).
      update: ``"same_batch"`` or ``"lagged"``.
      gamma: FAMO's decay (``famo`` and ``ablation``).
      logits_lr: FAMO's logits learning rate (``famo`` and ``ablation``).
      decay: ``"coupled"`` (PyTorch ``Adam(weight_decay=gamma)``, the reference)
        or ``"decoupled"`` (AdamW: ``xi <- xi - lr (adam(g) + gamma xi)``).
      scale: what multiplies the convex combination ``sum_i z_i grad log(l_i - m_i)``
        the model follows: ``"c"`` (the reference's ``c_t``), ``"c0"`` (``c``
        frozen at its value at initialisation), ``"one"`` (no renormaliser).
      model_b2: beta2 of the model's Adam.
      model_eps: eps of the model's Adam.
      robust_kwargs: keyword arguments of the robust FAMO candidate (``benchmarks.robust_famo``).
    """

    name: str
    kind: str
    update: str = "same_batch"
    gamma: float = 1e-3
    logits_lr: float = 0.025
    decay: str = "coupled"
    scale: str = "c"
    model_b2: float = 0.999
    robust_kwargs: tuple = ()
    model_eps: float = 1e-8


def _ablation_weighting(
    k: int, variant: Variant, min_losses: np.ndarray, initial_losses: jax.Array
) -> famo_jax.LossWeighting:
    """FAMO with the decay and the renormaliser of ``variant`` (diagnosis only)."""
    if variant.decay == "coupled":
        optimizer = None
    elif variant.decay == "decoupled":
        optimizer = optax.adamw(variant.logits_lr, weight_decay=variant.gamma)
    else:
        raise ValueError(f"decay must be 'coupled' or 'decoupled', got {variant.decay!r}.")
    if optimizer is None:
        reference = famo_jax.famo(
            k, learning_rate=variant.logits_lr, gamma=variant.gamma, min_losses=min_losses
        )
    else:
        reference = famo_jax.famo(k, min_losses=min_losses, optimizer=optimizer)
    m = jnp.asarray(min_losses, jnp.float32)
    # c at initialisation (equal weights), for scale="c0".
    c0 = 1.0 / jnp.sum((1.0 / k) / (initial_losses - m + EPS))

    def weigh(losses, state):
        z = jax.nn.softmax(state.logits)
        gap = losses - m + EPS
        if variant.scale == "c":
            scale = 1.0 / jnp.sum(z / gap)
        elif variant.scale == "c0":
            scale = c0
        elif variant.scale == "one":
            scale = 1.0
        else:
            raise ValueError(f"scale must be 'c', 'c0' or 'one', got {variant.scale!r}.")
        return jax.lax.stop_gradient(scale) * jnp.sum(z * jnp.log(gap))

    return famo_jax.LossWeighting(init=reference.init, weigh=weigh, update=reference.update)


def build_weighting(
    variant: Variant, k: int, min_losses: np.ndarray, initial_losses: jax.Array
) -> famo_jax.LossWeighting:
    """The loss weighting of a row."""
    if variant.kind == "ls":
        return famo_jax.linear_scalarization(k)
    if variant.kind == "si":
        # Mean log of l - m (on the toy the losses are negative; elsewhere m = 0
        # and this is famo_jax.scale_invariant with eps = 1e-8).
        m = jnp.asarray(min_losses, jnp.float32)
        si = famo_jax.linear_scalarization(k)
        return si._replace(weigh=lambda losses, state: jnp.mean(jnp.log(losses - m + EPS)))
    if variant.kind == "famo":
        return famo_jax.famo(
            k, learning_rate=variant.logits_lr, gamma=variant.gamma, min_losses=min_losses
        )
    if variant.kind == "robust":
        return robust_famo(k, min_losses=min_losses, **dict(variant.robust_kwargs))
    if variant.kind == "ablation":
        return _ablation_weighting(k, variant, min_losses, initial_losses)
    raise ValueError(f"unknown kind {variant.kind!r}.")


def reference_variants() -> list[Variant]:
    """LS, SI, reference FAMO at each gamma (same-batch and lagged), robust FAMO."""
    rows = [Variant("LS", "ls"), Variant("SI", "si")]
    for gamma in (0.0, 1e-3, 1e-2):
        rows.append(Variant(f"FAMO γ={gamma:g}", "famo", gamma=gamma))
        rows.append(Variant(f"FAMO-lagged γ={gamma:g}", "famo", "lagged", gamma=gamma))
    rows.append(Variant("robust FAMO", "robust"))
    rows.append(Variant("robust FAMO-lagged", "robust", "lagged"))
    return rows


def ablation_variants() -> list[Variant]:
    """FAMO with one mechanism switched off at a time (same-batch update).

    Mechanism 2 (the renormaliser ``c_t`` against the model's Adam): ``c_t``
    frozen at its initial value or removed, the logits frozen (FAMO is then SI
    times ``c_t``), the model's Adam with a shorter second-moment memory or a
    negligible eps. Mechanism 1 (the coupled decay): decoupled decay. And
    robust FAMO without the smoothing of the log losses, or with a decay.
    """
    rows = [Variant("FAMO, logits frozen (lr 0)", "famo", logits_lr=0.0)]
    for gamma in (1e-3, 0.0):
        g = f"γ={gamma:g}"
        rows += [
            Variant(f"FAMO {g}, c frozen at c_0", "ablation", gamma=gamma, scale="c0"),
            Variant(f"FAMO {g}, no c", "ablation", gamma=gamma, scale="one"),
            Variant(f"FAMO {g}, model β2=0.99", "famo", gamma=gamma, model_b2=0.99),
            Variant(f"FAMO {g}, model β2=0.9", "famo", gamma=gamma, model_b2=0.9),
        ]
    rows += [
        Variant("FAMO γ=1e-3, model eps=1e-16", "famo", gamma=1e-3, model_eps=1e-16),
        Variant("FAMO γ=1e-3, model β2=0.9, eps=1e-16", "famo", model_b2=0.9, model_eps=1e-16),
        Variant("FAMO γ=1e-3 decoupled", "ablation", gamma=1e-3, decay="decoupled"),
        Variant("FAMO γ=1e-2 decoupled", "ablation", gamma=1e-2, decay="decoupled"),
        Variant(
            "FAMO γ=1e-3 decoupled, no c", "ablation", gamma=1e-3, decay="decoupled", scale="one"
        ),
        Variant("robust FAMO, ρ=0", "robust", robust_kwargs=(("smoothing", 0.0),)),
        Variant("robust FAMO-lagged, ρ=0", "robust", "lagged", robust_kwargs=(("smoothing", 0.0),)),
        Variant("robust FAMO, decay 0.1", "robust", robust_kwargs=(("decay", 0.1),)),
    ]
    return rows


# ----------------------------------------------------------------------------
# Training and recording.


class Trace(NamedTuple):
    """Per-step records of one row over all seeds (NumPy, seeds first).

    Attributes:
      losses: ``(S, E + 1, k)`` whole-training-set losses at initialisation and
        every ``eval_every`` steps.
      logits: ``(S, T, k)`` FAMO's logits after each step (zeros for LS/SI).
      c: ``(S, T)`` FAMO's renormaliser ``1 / sum(z / (l - m + eps))`` at the
        step's batch losses, with the step's ``z`` (NaN without logits).
      scale: ``(S, T)`` ``sum_i w_i (l_i - m_i + eps)``: the factor on the convex
        combination of log-loss gradients that the model follows.
      grad_norm: ``(S, T)`` global norm of the model's gradient.
      update_norm: ``(S, T)`` global norm of the model's (Adam) update.
      logits_grad_norm: ``(S, T)`` norm of ``z * (delta - <z, delta>)``.
      final_params: the parameters after the last step (a pytree, seeds first).
      seconds: wall time of the compiled run; compile_seconds: its compilation.
    """

    losses: np.ndarray
    logits: np.ndarray
    c: np.ndarray
    scale: np.ndarray
    grad_norm: np.ndarray
    update_norm: np.ndarray
    logits_grad_norm: np.ndarray
    final_params: Any
    seconds: float
    compile_seconds: float


def _make_run(problem: Problem, variant: Variant):
    k = problem.num_tasks
    m = jnp.asarray(problem.min_losses, jnp.float32)
    model_opt = optax.adam(1e-3, b2=variant.model_b2, eps=variant.model_eps)
    steps_per_eval = problem.eval_every
    num_evals = problem.steps // steps_per_eval

    def run(seed_input):
        params = problem.init_params(seed_input)
        initial = problem.eval_losses(params)
        weighting = build_weighting(variant, k, problem.min_losses, initial)
        data_key = jax.random.fold_in(seed_input, 7) if problem.batch_size is not None else None

        def step(carry, t):
            params, opt_state, state, prev_losses = carry
            batch = None
            if problem.batch_size is not None:
                batch = jax.random.choice(
                    jax.random.fold_in(data_key, t),
                    problem.num_train,
                    (problem.batch_size,),
                    replace=False,
                )

            def objective(p):
                losses = problem.task_losses(p, batch)
                return weighting.weigh(losses, state), losses

            (_, losses), grads = jax.value_and_grad(objective, has_aux=True)(params)
            weights = jax.grad(weighting.weigh)(losses, state)
            updates, opt_state = model_opt.update(grads, opt_state, params)
            new_params = optax.apply_updates(params, updates)
            logits = getattr(state, "logits", None)
            if logits is None:
                c = jnp.nan
                new_state, logits_grad_norm = state, jnp.nan
                logits_out = jnp.zeros(k)
            else:
                z = jax.nn.softmax(logits)
                c = 1.0 / jnp.sum(z / (losses - m + EPS))
                if variant.update == "same_batch":
                    prev, curr = losses, problem.task_losses(new_params, batch)
                else:
                    prev, curr = prev_losses, losses
                delta = jnp.log(prev - m + EPS) - jnp.log(curr - m + EPS)
                logits_grad_norm = jnp.linalg.norm(z * (delta - jnp.dot(z, delta)))
                new_state = weighting.update(prev, curr, state)
                logits_out = new_state.logits
            record = (
                logits_out,
                c,
                jnp.sum(weights * (losses - m + EPS)),
                optax.global_norm(grads),
                optax.global_norm(updates),
                logits_grad_norm,
            )
            return (new_params, opt_state, new_state, losses), record

        def chunk(carry, ts):
            carry, records = jax.lax.scan(step, carry, ts)
            return carry, (problem.eval_losses(carry[0]), records)

        carry = (
            params,
            model_opt.init(params),
            weighting.init(),
            jnp.full((k,), jnp.nan, jnp.float32),
        )
        ts = jnp.arange(num_evals * steps_per_eval).reshape(num_evals, steps_per_eval)
        carry, (eval_losses, records) = jax.lax.scan(chunk, carry, ts)
        records = jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), records)
        return jnp.concatenate([initial[None], eval_losses]), records, carry[0]

    return run


def run_variant(problem: Problem, variant: Variant) -> Trace:
    """Trains one row on every seed of ``problem`` (one compiled, vmapped program)."""
    program = jax.jit(jax.vmap(_make_run(problem, variant)))
    start = time.perf_counter()
    compiled = program.lower(problem.seed_inputs).compile()
    compile_seconds = time.perf_counter() - start
    start = time.perf_counter()
    losses, records, final_params = jax.block_until_ready(compiled(problem.seed_inputs))
    seconds = time.perf_counter() - start
    logits, c, scale, grad_norm, update_norm, logits_grad_norm = (np.asarray(r) for r in records)
    return Trace(
        losses=np.asarray(losses),
        logits=logits,
        c=c,
        scale=scale,
        grad_norm=grad_norm,
        update_norm=update_norm,
        logits_grad_norm=logits_grad_norm,
        final_params=jax.tree.map(np.asarray, final_params),
        seconds=seconds,
        compile_seconds=compile_seconds,
    )


# ----------------------------------------------------------------------------
# Summaries.


def relative_losses(trace: Trace) -> np.ndarray:
    """``(S, E + 1, k)``: each task's loss gap ``l - m`` over its initial value.

    For the regressions ``m = 0`` and this is the loss ratio of the issue.
    """
    return trace.losses / trace.losses[:, :1]


@dataclasses.dataclass
class RegressionSummary:
    """Per-seed acceptance numbers of one row on a regression problem."""

    late_worst: np.ndarray  # (S,) max over tasks of the geo. mean ratio, last 10% of steps
    late_geo: np.ndarray  # (S,) geometric mean over tasks of the same
    max_after_warmup: np.ndarray  # (S,) max over tasks and evaluations after 10% of the steps
    c_drop: np.ndarray  # (S,) c at the last step / c at the first (NaN without logits)
    logits_grad_late: np.ndarray  # (S,) mean |z (delta - <z, delta>)| over the last 10%
    logits_norm_late: np.ndarray  # (S,) mean |xi| over the last 10%
    step_drop: np.ndarray  # (S,) mean |update| over the last 10% / over steps 10..110
    finite: np.ndarray  # (S,) every recorded loss finite


def summarize_regression(trace: Trace) -> RegressionSummary:
    ratios = relative_losses(trace)
    num = ratios.shape[1]
    late = ratios[:, -max(1, num // 10) :]
    with np.errstate(all="ignore"):
        late_task = np.exp(np.mean(np.log(late), axis=1))  # (S, k)
        after = ratios[:, max(1, num // 10) :]
        steps = trace.update_norm.shape[1]
        late_step = trace.update_norm[:, -max(1, steps // 10) :].mean(axis=1)
        early_step = trace.update_norm[:, 10 : 10 + max(1, steps // 30)].mean(axis=1)
        return RegressionSummary(
            late_worst=np.max(late_task, axis=1),
            late_geo=np.exp(np.mean(np.log(late_task), axis=1)),
            max_after_warmup=np.max(after, axis=(1, 2)),
            c_drop=trace.c[:, -1] / trace.c[:, 0],
            logits_grad_late=trace.logits_grad_norm[:, -max(1, steps // 10) :].mean(axis=1),
            logits_norm_late=np.linalg.norm(trace.logits[:, -max(1, steps // 10) :], axis=-1).mean(
                axis=1
            ),
            step_drop=late_step / early_step,
            finite=np.all(np.isfinite(trace.losses), axis=(1, 2)),
        )


def toy_outcome(trace: Trace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per start: Pareto-stationarity residual, final theta_1, final losses."""
    thetas = trace.final_params
    residual = np.asarray(problems.toy_pareto_residual(jnp.asarray(thetas)))
    return residual, np.asarray(thetas)[:, 0], trace.losses[:, -1]


def _fmt_seeds(values: np.ndarray, fmt: str = "{:.2f}") -> str:
    return " ".join(fmt.format(v) for v in values)


def _nan_blank(values: np.ndarray, fmt: str) -> str:
    values = np.asarray(values, np.float64)
    return "" if np.all(np.isnan(values)) else fmt.format(float(np.nanmedian(values)))


def regression_table(traces: dict[str, Trace]) -> str:
    """Markdown: per row the per-seed worst late ratio, spikes, c and step collapse."""
    ls = summarize_regression(traces["LS"]).late_worst if "LS" in traces else None
    lines = [
        "| row | worst task, late loss ratio (per seed) | ≤ ½ LS on every seed | "
        "max ratio after 10% (per seed) | ≤ 3 | geo. mean late ratio | c_T / c_0 (median) "
        "| late / early \\|update\\| (median) | late \\|g_ξ\\| | late \\|ξ\\| |",
        "|---|---|:---:|---|:---:|---:|---:|---:|---:|---:|",
    ]
    for name, trace in traces.items():
        s = summarize_regression(trace)
        half = "" if ls is None else ("yes" if np.all(s.late_worst <= 0.5 * ls) else "no")
        bounded = "yes" if np.all(s.max_after_warmup <= 3.0) and np.all(s.finite) else "no"
        c_cell = _nan_blank(s.c_drop, "{:.1e}")
        lines.append(
            f"| {name} | {_fmt_seeds(s.late_worst)} | {half} | "
            f"{_fmt_seeds(s.max_after_warmup, '{:.3g}')} | {bounded} | "
            f"{np.median(s.late_geo):.3f} | {c_cell} | {np.median(s.step_drop):.2e} | "
            f"{_nan_blank(s.logits_grad_late, '{:.1e}')} | "
            f"{_nan_blank(s.logits_norm_late, '{:.2f}')} |"
        )
    return "\n".join(lines)


TOY_MIDDLE = 3.5  # |theta_1| <= 3.5: the middle half of the front (theta_1 in [-7, 7])
FRONT_THRESHOLD = 1e-4


def toy_table(traces: dict[str, Trace]) -> str:
    lines = [
        "| row | residual per start | reached front (< 1e-4) | final θ1 per start | "
        "in the middle half (\\|θ1\\| ≤ 3.5) |",
        "|---|---|:---:|---|:---:|",
    ]
    for name, trace in traces.items():
        residual, theta1, _ = toy_outcome(trace)
        reached = residual < FRONT_THRESHOLD
        middle = reached & (np.abs(theta1) <= TOY_MIDDLE)
        lines.append(
            f"| {name} | {_fmt_seeds(residual, '{:.0e}')} | {int(reached.sum())}/{len(reached)} "
            f"| {_fmt_seeds(theta1, '{:.2f}')} | {int(middle.sum())}/{len(middle)} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# Figures.


def plot_problem(problem: Problem, traces: dict[str, Trace], path: Path, seed: int = 0) -> Path:
    """Rows: methods; columns: task losses, logits, c_t, |update| (log scales)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(traces)
    fig, axes = plt.subplots(
        len(names), 4, figsize=(17, 2.3 * len(names)), squeeze=False, layout="constrained"
    )
    colors = plt.get_cmap("viridis")(np.linspace(0, 1, problem.num_tasks))
    for row, name in enumerate(names):
        trace = traces[name]
        ratios = relative_losses(trace)
        eval_steps = np.arange(ratios.shape[1]) * problem.eval_every
        steps = np.arange(1, trace.c.shape[1] + 1)
        stride = max(1, len(steps) // 3000)
        ax = axes[row]
        for i in range(problem.num_tasks):
            ax[0].plot(eval_steps, ratios[seed, :, i], color=colors[i], lw=0.8)
            ax[1].plot(steps[::stride], trace.logits[seed, ::stride, i], color=colors[i], lw=0.8)
        ax[0].set_yscale("log")
        ax[0].axhline(1.0, color="k", lw=0.5, ls=":")
        ax[0].axhline(3.0, color="r", lw=0.5, ls=":")
        ax[0].set_ylabel(name, fontsize=9)
        for s in range(trace.c.shape[0]):
            if np.any(np.isfinite(trace.c[s])):
                ax[2].plot(steps[::stride], trace.scale[s, ::stride], lw=0.8)
            ax[3].plot(steps[::stride], trace.update_norm[s, ::stride], lw=0.6)
        for a in (ax[2], ax[3]):
            a.set_yscale("log")
        if problem.name == "toy":
            for a in ax:
                a.set_xscale("log")
    titles = [
        f"(l_i - m_i) / initial, seed {seed} (colour: task, small→large scale)",
        f"logits ξ, seed {seed}",
        "model-gradient factor Σ w_i(l_i - m_i) (= c_t for FAMO), all seeds",
        "|model update| (Adam), all seeds",
    ]
    for a, title in zip(axes[0], titles, strict=True):
        a.set_title(title, fontsize=9)
    for a in axes[-1]:
        a.set_xlabel("step")
    fig.suptitle(f"{problem.name}: {problem.description}", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------
# Main.


# The rows of each figure (file name suffix -> row names).
FIGURES = {
    "": (
        "LS",
        "SI",
        "FAMO γ=0",
        "FAMO γ=0.001",
        "FAMO γ=0.01",
        "robust FAMO",
        "robust FAMO-lagged",
    ),
    "_mechanisms": (
        "FAMO γ=0.001",
        "FAMO, logits frozen (lr 0)",
        "FAMO γ=0.001, c frozen at c_0",
        "FAMO γ=0.001, model β2=0.9",
        "FAMO γ=1e-3 decoupled",
        "FAMO γ=0, model β2=0.99",
        "FAMO γ=1e-3 decoupled, no c",
        "robust FAMO-lagged, ρ=0",
    ),
}


def run_rows(problem: Problem, variants: Sequence[Variant], log=print) -> dict[str, Trace]:
    traces = {}
    for variant in variants:
        trace = run_variant(problem, variant)
        traces[variant.name] = trace
        log(
            f"  {problem.name:<9} {variant.name:<34} {trace.seconds:6.1f} s "
            f"(compile {trace.compile_seconds:4.1f} s)"
        )
    return traces


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Trace]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny problems (a smoke test)")
    parser.add_argument("--out", type=Path, default=None, help="directory for figures + tables")
    parser.add_argument(
        "--problems",
        nargs="+",
        choices=("full", "minibatch", "toy"),
        default=["full", "minibatch", "toy"],
    )
    parser.add_argument("--no-ablations", action="store_true")
    parser.add_argument("--hidden", type=int, nargs="+", default=[128, 128])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--rows", nargs="+", default=None, help="only rows containing these")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    load = os.getloadavg()[0]
    all_problems = make_problems(args.quick, tuple(args.hidden), args.seeds)
    ablations = not (args.no_ablations or args.quick)
    variants = reference_variants() + (ablation_variants() if ablations else [])
    if args.rows:
        variants = [v for v in variants if v.name == "LS" or any(r in v.name for r in args.rows)]
    command = " ".join(["python -m benchmarks.famo_dynamics", *argv])
    sections = [
        "# FAMO dynamics"
        + (" (QUICK SMOKE TEST: tiny settings, not results)" if args.quick else ""),
        "",
        f"Command: `{command}`; load average {load:.1f} at the start; jax {jax.__version__}.",
    ]
    results = {}
    for name in args.problems:
        problem = all_problems[name]
        rows = [v for v in variants if name != "toy" or v.model_b2 == 0.999]
        traces = run_rows(problem, rows)
        results[name] = traces
        table = toy_table(traces) if name == "toy" else regression_table(traces)
        sections += ["", f"## {name}: {problem.description}", "", table]
        if args.out is not None:
            for suffix, names in FIGURES.items():
                chosen = {n: traces[n] for n in names if n in traces}
                if args.rows:
                    chosen = traces
                if len(chosen) > 1:
                    path = args.out / f"{name}{suffix}.png"
                    plot_problem(problem, chosen, path)
                    sections.append(f"\n![{name}{suffix}]({path.name})")
                if args.rows:
                    break
    text = "\n".join(sections) + "\n"
    print("\n" + text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "famo_dynamics.md").write_text(text)
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
