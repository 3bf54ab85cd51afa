"""Long-run stability: one million FAMO updates on random loss sequences, inside ``lax.scan``.

FAMO's state is a logit vector moved by an Adam step per update. This script
drives it with random ``(prev_losses, curr_losses)`` pairs for a million updates
and checks, as it goes, that nothing degenerates:

- the logits stay finite and within the bounds derived below;
- the task weights ``softmax(logits)`` and the loss weights (the gradient of
  ``weigh``) stay on the simplex: non-negative, summing to one within a few
  float32 ulps;
- float32 accumulation does not drift: the same sequence is replayed with
  float64 logits and the two runs are compared at every step;
- invalid losses (NaN, inf, at or below ``min_losses``) only skip updates.

Bounds. With the default optimizer (PyTorch's ``Adam(lr, weight_decay=gamma)``:
coupled decay, betas (0.9, 0.999)), the step of one logit is ``lr * mhat /
(sqrt(vhat) + 1e-8)``. By Cauchy-Schwarz over Adam's two moving averages,
``|m_t| / sqrt(v_t) <= (1 - b1) / sqrt(1 - b2) / sqrt(1 - b1**2 / b2) = 7.27``
and the bias corrections ``sqrt(1 - b2**t) / (1 - b1**t)`` are at most 1, so
every step moves a logit by at most ``C lr`` with ``C = 7.27`` (``lr`` in steady
state, when the gradient's sign does not persist, is the usual size).

FAMO's logits gradient is ``g_i = z_i (delta_i - <z, delta>)`` with ``delta`` the
decrease of the log losses, so ``|g_i| <= z_i (1 - z_i) (max delta - min delta)
<= G := (max delta - min delta) / 4``. With ``gamma > 0`` the optimizer sees
``g + gamma * xi``: whenever ``|xi_i| > G / gamma`` that input has the sign of
``xi_i`` at every step, so the first moment can only shrink towards the right
sign; the extra distance travelled meanwhile is at most ``C0 lr rho / (1 - rho)``
with ``rho = b1 / sqrt(b2)`` (``|m| / sqrt(v)`` shrinks by ``rho`` per step) and
``C0 = 7.27``, i.e. ``65.8 lr``, after the crossing step of at most ``C lr``. Hence

    |xi_i| <= G / gamma + 73 lr        (gamma > 0; G the largest G seen so far)
    |xi_i| <= C lr t                   (gamma = 0, after t updates)

With ``gamma = 0`` nothing pulls the logits back: when one task's loss falls
systematically faster than the others', its logit keeps falling at about ``lr``
per step until its weight underflows (then its gradient is exactly zero and
the Adam step dies out geometrically), so no bound independent of ``t`` holds.

Loss sequences (``num_tasks`` tasks, one sequence per regime):

- ``noise``: log losses uniform in [-7, 7]; each update changes them by an
  independent uniform amount in [-0.1, 0.1];
- ``imbalanced``: task ``i``'s log loss falls by ``0.02 i / (k - 1)`` per update
  plus uniform noise in [-0.01, 0.01] (task 0 is stuck, the last one falls
  fastest): FAMO's logits are pushed in a constant direction;
- ``wild``: both losses independent, log-uniform in [1e-6, 1e6], and 1% of the
  entries replaced by NaN, inf or a negative value (these updates must be
  skipped).

Run: ``python -m benchmarks.long_run`` (one million updates, every regime for
gamma in {0, 0.001, 0.01}, in float32 and float64; about a minute on a laptop
CPU). ``--updates`` and ``--chunk`` change the length and how often it reports.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import famo_jax

REGIMES = ("noise", "imbalanced", "wild")
GAMMAS = (0.0, 0.001, 0.01)
LEARNING_RATE = 0.025
# sup over t of Adam's |mhat| / sqrt(vhat) for betas (0.9, 0.999), and the bound
# on the distance a logit can overshoot |xi| = G / gamma (see the module docstring).
B1, B2 = 0.9, 0.999
ADAM_STEP_BOUND = (1 - B1) / np.sqrt(1 - B2) / np.sqrt(1 - B1**2 / B2)
RHO = B1 / np.sqrt(B2)
OVERSHOOT_BOUND = ADAM_STEP_BOUND * (1 + RHO / (1 - RHO))


class Stats(NamedTuple):
    """Running extremes of one run (float64 scalars unless said otherwise)."""

    max_abs_logit: jax.Array  # max over steps and tasks of |xi| (float32 run)
    max_step: jax.Array  # max over steps and tasks of |xi_t - xi_{t-1}|
    max_gradient_bound: jax.Array  # max over valid steps of G = (max delta - min delta) / 4
    max_task_weight_sum_error: jax.Array  # max |sum(softmax(xi)) - 1|
    max_loss_weight_sum_error: jax.Array  # max |sum(d weigh / d losses) - 1| (valid losses)
    min_task_weight: jax.Array  # min over steps and tasks of softmax(xi)
    max_float64_deviation: jax.Array  # max |xi_float32 - xi_float64| (whole trajectories)
    max_local_error: jax.Array  # max |float32 update - float64 update| from the same state
    max_excess_over_bound: jax.Array  # max of |xi| - bound (<= 0 when the bound holds)
    all_finite: jax.Array  # bool: logits and optimizer state always finite
    num_invalid: jax.Array  # int: updates whose losses were invalid (must all be skipped)


class Carry(NamedTuple):
    state32: famo_jax.FAMOState
    state64: famo_jax.FAMOState
    stats: Stats


def loss_pair(key: jax.Array, step: jax.Array, regime: jax.Array, num_tasks: int):
    """The ``(prev_losses, curr_losses)`` of update ``step`` of a regime, in float32."""
    key = jax.random.fold_in(key, step)
    k_level, k_change, k_mask, k_kind = jax.random.split(key, 4)
    level = jax.random.uniform(k_level, (num_tasks,), jnp.float32, -7.0, 7.0)
    u = jax.random.uniform(k_change, (num_tasks,), jnp.float32, -1.0, 1.0)

    def noise():
        return jnp.exp(level), jnp.exp(level - 0.1 * u)

    def imbalanced():
        rates = jnp.linspace(0.0, 0.02, num_tasks, dtype=jnp.float32)
        return jnp.exp(level), jnp.exp(level - rates - 0.01 * u)

    def wild():
        prev = jnp.exp(level * np.float32(np.log(1e6) / 7.0))
        curr = jnp.exp(u * np.float32(np.log(1e6)))
        bad = jax.random.uniform(k_mask, (2, num_tasks)) < 0.01
        kind = jax.random.randint(k_kind, (2, num_tasks), 0, 3)
        bad_value = jnp.array([jnp.nan, jnp.inf, -1.0], jnp.float32)[kind]
        pair = jnp.where(bad, bad_value, jnp.stack([prev, curr]))
        return pair[0], pair[1]

    return jax.lax.switch(regime, (noise, imbalanced, wild))


def initial_carry(num_tasks: int) -> Carry:
    weighting32 = famo_jax.famo(num_tasks)
    weighting64 = famo_jax.famo(num_tasks, logits_dtype=jnp.float64)
    zero, inf = jnp.zeros((), jnp.float64), jnp.full((), jnp.inf, jnp.float64)
    stats = Stats(
        max_abs_logit=zero,
        max_step=zero,
        max_gradient_bound=zero,
        max_task_weight_sum_error=zero,
        max_loss_weight_sum_error=zero,
        min_task_weight=inf,
        max_float64_deviation=zero,
        max_local_error=zero,
        max_excess_over_bound=-inf,
        all_finite=jnp.array(True),
        num_invalid=jnp.zeros((), jnp.int32),
    )
    return Carry(weighting32.init(), weighting64.init(), stats)


def _to_float32(leaf):
    return leaf.astype(jnp.float32) if leaf.dtype == jnp.float64 else leaf


def make_run_chunk(num_tasks: int, chunk: int, learning_rate: float = LEARNING_RATE):
    """Returns ``run_chunk(carry, start, key, regime, gamma) -> carry`` for one configuration.

    ``gamma`` may be traced: famo()'s default optimizer keeps it in the state
    (``opt_state.hyperparams``), where it is set, so that one compiled program
    covers every gamma under ``jax.vmap``.
    """
    weighting32 = famo_jax.famo(num_tasks, learning_rate=learning_rate)
    weighting64 = famo_jax.famo(num_tasks, learning_rate=learning_rate, logits_dtype=jnp.float64)

    def run_chunk(carry: Carry, start, key, regime, gamma) -> Carry:
        def with_gamma(state):
            return optax.tree_utils.tree_set(state, gamma=jnp.asarray(gamma, state.logits.dtype))

        carry = carry._replace(state32=with_gamma(carry.state32), state64=with_gamma(carry.state64))

        def step(carry: Carry, t):
            state32, state64, stats = carry
            prev, curr = loss_pair(key, start + t, regime, num_tasks)
            new32 = weighting32.update(prev, curr, state32)
            new64 = weighting64.update(prev.astype(jnp.float64), curr.astype(jnp.float64), state64)
            delta = jnp.log(prev.astype(jnp.float64) + 1e-8) - jnp.log(
                curr.astype(jnp.float64) + 1e-8
            )
            valid = jnp.all(jnp.isfinite(delta))
            gradient_bound = jnp.where(valid, (jnp.max(delta) - jnp.min(delta)) / 4, 0.0)
            max_gradient_bound = jnp.maximum(stats.max_gradient_bound, gradient_bound)
            logits = new32.logits.astype(jnp.float64)
            # One float32 update from the float64 state: the rounding error of a single update.
            local32 = weighting32.update(prev, curr, jax.tree.map(_to_float32, state64))
            local_error = jnp.max(jnp.abs(local32.logits.astype(jnp.float64) - new64.logits))
            weights = new32.task_weights
            loss_weights = famo_jax.loss_weights(weighting32, jnp.where(valid, curr, 1.0), new32)
            bound = jnp.where(
                gamma > 0,
                max_gradient_bound / jnp.where(gamma > 0, gamma, 1.0)
                + OVERSHOOT_BOUND * learning_rate,
                ADAM_STEP_BOUND * learning_rate * new32.num_updates,
            )
            finite = jnp.all(
                jnp.array([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(new32)])
            )
            stats = Stats(
                max_abs_logit=jnp.maximum(stats.max_abs_logit, jnp.max(jnp.abs(logits))),
                max_step=jnp.maximum(
                    stats.max_step, jnp.max(jnp.abs(logits - state32.logits.astype(jnp.float64)))
                ),
                max_gradient_bound=max_gradient_bound,
                max_task_weight_sum_error=jnp.maximum(
                    stats.max_task_weight_sum_error,
                    jnp.abs(jnp.sum(weights).astype(jnp.float64) - 1.0),
                ),
                max_loss_weight_sum_error=jnp.maximum(
                    stats.max_loss_weight_sum_error,
                    jnp.abs(jnp.sum(loss_weights).astype(jnp.float64) - 1.0),
                ),
                min_task_weight=jnp.minimum(
                    stats.min_task_weight, jnp.min(weights).astype(jnp.float64)
                ),
                max_float64_deviation=jnp.maximum(
                    stats.max_float64_deviation, jnp.max(jnp.abs(logits - new64.logits))
                ),
                max_local_error=jnp.maximum(stats.max_local_error, local_error),
                max_excess_over_bound=jnp.maximum(
                    stats.max_excess_over_bound, jnp.max(jnp.abs(logits)) - bound
                ),
                all_finite=stats.all_finite & finite,
                num_invalid=stats.num_invalid + (~valid).astype(jnp.int32),
            )
            return Carry(new32, new64, stats), None

        carry, _ = jax.lax.scan(step, carry, jnp.arange(chunk))
        return carry

    return run_chunk


def run(
    num_updates: int,
    chunk: int,
    num_tasks: int = 4,
    seed: int = 0,
    gammas=GAMMAS,
    regimes=REGIMES,
    report=print,
):
    """Runs every (gamma, regime) pair for ``num_updates`` updates; returns their final carries.

    All pairs advance together: one compiled chunk of ``chunk`` updates, vmapped
    over the pairs, called ``num_updates // chunk`` times. float64 is enabled for
    this call only (the reference run uses float64 logits).
    """
    with jax.enable_x64(True):
        return _run(num_updates, chunk, num_tasks, seed, gammas, regimes, report)


def _run(num_updates, chunk, num_tasks, seed, gammas, regimes, report):
    if num_updates % chunk:
        raise ValueError(f"num_updates ({num_updates}) must be a multiple of chunk ({chunk}).")
    pairs = [(g, r) for g in gammas for r in regimes]
    gamma = jnp.array([g for g, _ in pairs], jnp.float32)
    regime = jnp.array([REGIMES.index(r) for _, r in pairs])
    keys = jax.random.split(jax.random.key(seed), len(regimes))
    key = jnp.stack([keys[regimes.index(r)] for _, r in pairs])  # same sequence for each gamma
    carry = jax.vmap(lambda _: initial_carry(num_tasks))(jnp.arange(len(pairs)))
    run_chunk = jax.jit(jax.vmap(make_run_chunk(num_tasks, chunk), in_axes=(0, None, 0, 0, 0)))
    begin = time.perf_counter()
    for start in range(0, num_updates, chunk):
        carry = run_chunk(carry, start, key, regime, gamma)
        stats = jax.device_get(carry.stats)
        report(
            f"{start + chunk:>9d} updates  {time.perf_counter() - begin:7.1f}s  "
            f"max|xi| {np.max(stats.max_abs_logit):8.3f}  "
            f"max step {np.max(stats.max_step):.4f}  "
            f"max|sum z - 1| {np.max(stats.max_task_weight_sum_error):.1e}  "
            f"max|xi32 - xi64| {np.max(stats.max_float64_deviation):.1e}  "
            f"max local error {np.max(stats.max_local_error):.1e}  "
            f"all finite {bool(np.all(stats.all_finite))}"
        )
    return pairs, carry


def summarize(pairs, carry, num_tasks: int) -> list[dict]:
    """One row per (gamma, regime): the measured extremes and the bounds they are held to."""
    rows = []
    stats = jax.device_get(carry.stats)
    for i, (gamma, regime) in enumerate(pairs):
        row = {"gamma": gamma, "regime": regime}
        row.update({name: np.asarray(value[i]).item() for name, value in stats._asdict().items()})
        row["num_updates"] = int(carry.state32.num_updates[i])
        row["num_skipped"] = int(carry.state32.num_skipped[i])
        row["step_bound"] = ADAM_STEP_BOUND * LEARNING_RATE
        row["final_bound"] = (
            row["max_gradient_bound"] / gamma + OVERSHOOT_BOUND * LEARNING_RATE
            if gamma > 0
            else ADAM_STEP_BOUND * LEARNING_RATE * row["num_updates"]
        )
        rows.append(row)
    return rows


def violations(rows: list[dict]) -> list[dict]:
    """The rows in which a bound does not hold (empty when everything is as claimed)."""
    return [
        row
        for row in rows
        if not row["all_finite"]
        or row["max_excess_over_bound"] > 0
        or row["max_step"] > row["step_bound"]
        or row["num_skipped"] != row["num_invalid"]
    ]


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=1_000_000)
    parser.add_argument("--chunk", type=int, default=100_000)
    parser.add_argument("--num-tasks", type=int, default=4)
    parser.add_argument("--json", help="also write the summary rows to this file")
    args = parser.parse_args(argv)
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}; {args.updates} updates per run,"
        f" {args.num_tasks} tasks, logits lr {LEARNING_RATE}"
    )
    print(
        f"step bound C lr = {ADAM_STEP_BOUND:.3f} x {LEARNING_RATE} = "
        f"{ADAM_STEP_BOUND * LEARNING_RATE:.4f}; overshoot bound {OVERSHOOT_BOUND:.1f} lr"
    )
    pairs, carry = run(args.updates, args.chunk, args.num_tasks)
    rows = summarize(pairs, carry, args.num_tasks)
    header = (
        f"{'gamma':>6} {'regime':>10} {'max|xi|':>9} {'bound':>9} {'min slack':>9} "
        f"{'max step':>9} {'min z':>9} {'|sum z-1|':>9} {'|sum w-1|':>9} {'|xi32-xi64|':>11} "
        f"{'local err':>9} "
        f"{'skipped':>8} {'invalid':>8} finite"
    )
    print(header)
    for row in rows:
        print(
            f"{row['gamma']:>6} {row['regime']:>10} {row['max_abs_logit']:9.3f} "
            f"{row['final_bound']:9.1f} {-row['max_excess_over_bound']:9.3f} "
            f"{row['max_step']:9.4f} {row['min_task_weight']:9.1e} "
            f"{row['max_task_weight_sum_error']:9.1e} {row['max_loss_weight_sum_error']:9.1e} "
            f"{row['max_float64_deviation']:11.1e} {row['max_local_error']:9.1e} "
            f"{row['num_skipped']:>8d} "
            f"{row['num_invalid']:>8d} {row['all_finite']}"
        )
    print(
        "bound: the bound on |xi| at the end (G / gamma + 73 lr, or C lr t for gamma = 0); "
        "min slack: min over updates of (bound - max|xi|) at that update; |xi32-xi64|: "
        "max distance between the float32 and float64 runs; local err: max error of one "
        "float32 update started from the float64 state."
    )
    failed = violations(rows)
    print("bounds hold in every run" if not failed else f"VIOLATIONS: {failed}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
