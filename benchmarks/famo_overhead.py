"""FAMO's own cost: one ``weigh`` (with its gradient) plus one ``update``, against k.

FAMO's functions only ever see the ``(k,)`` vector of task losses: the model's
forward and backward passes are those of linear scalarization (one backward
pass of a scalar loss), whatever the model. What FAMO adds to a training step
is therefore this script's number, which depends on k alone, not on the model
size. For each k up to 100,000 it measures the jitted work a training step does
for FAMO:

- ``weigh``: the weighted loss and its gradient w.r.t. the losses (the task
  weights that the model's backward pass multiplies in), and
- ``update(prev_losses, curr_losses, state)``: the logits step.

Two figures per k, both medians over repeats after warm-up:

- *in a scan*: ``S`` steps of weigh + update inside one jitted ``lax.scan``
  (as in a scanned training loop), minus the same scan without FAMO (it only
  produces the next step's losses), divided by ``S``: FAMO's marginal cost per
  step with no dispatch overhead;
- *per call*: one jitted call of weigh + update, ``block_until_ready``
  included: what a Python training loop would pay if FAMO ran as its own jitted
  function (it is normally fused into the jitted training step instead).

A least-squares line ``time = a + b * k`` over the in-scan figures gives the
constant ``b`` per task. No trace or compilation happens in the timed loops
(checked with ``jax.monitoring`` event counters, see ``_timing.CompileCounter``).

Run: ``python benchmarks/famo_overhead.py`` (under a minute) or with ``--quick``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _timing  # noqa: E402

import famo_jax  # noqa: E402

FULL_KS = (2, 10, 100, 1_000, 10_000, 100_000)
QUICK_KS = (2, 100, 10_000)


def scan_lengths(num_tasks: int, quick: bool) -> int:
    """Steps per timed scan: enough to dwarf the dispatch, about 1e8 / k element ops."""
    steps = int(np.clip(2e7 / num_tasks, 200, 5_000))
    return max(20, steps // 10) if quick else steps


def make_functions(num_tasks: int, steps: int):
    """The jitted per-call function and the two scans (with and without FAMO)."""
    weighting = famo_jax.famo(num_tasks)  # lr 0.025, gamma 1e-3 (defaults)

    def weigh_and_update(state, prev_losses, curr_losses):
        # What a training step needs from FAMO: the weighted loss, its gradient
        # w.r.t. the losses (the weights), and the logits update.
        loss, weights = jax.value_and_grad(weighting.weigh)(curr_losses, state)
        state = weighting.update(prev_losses, curr_losses, state)
        return state, loss, weights

    def next_losses(losses, t):
        # Stand-in for the model: losses that keep decreasing at task-dependent rates.
        rates = 1e-3 * (1.0 + jnp.arange(num_tasks, dtype=losses.dtype) / num_tasks)
        return losses * (1.0 - rates * jnp.cos(t.astype(losses.dtype)) ** 2)

    def scan_with_famo(state, losses):
        def body(carry, t):
            state, prev, acc = carry
            curr = next_losses(prev, t)
            state, loss, weights = weigh_and_update(state, prev, curr)
            # Consume the outputs so that nothing is dead code.
            return (state, curr, acc + loss + weights[0]), None

        carry = (state, losses, jnp.zeros((), losses.dtype))
        (state, losses, acc), _ = jax.lax.scan(body, carry, jnp.arange(steps))
        return state, losses, acc

    def scan_without_famo(state, losses):
        def body(carry, t):
            prev, acc = carry
            curr = next_losses(prev, t)
            return (curr, acc + curr[0]), None

        (losses, acc), _ = jax.lax.scan(
            body, (losses, jnp.zeros((), losses.dtype)), jnp.arange(steps)
        )
        return state, losses, acc

    return weighting, weigh_and_update, scan_with_famo, scan_without_famo


def _time_call(fn, args, warmup: int, repeats: int, label: str) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    with _timing.CompileCounter(label):
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times.append(time.perf_counter() - start)
    return _timing.median(times)


def measure(num_tasks: int, quick: bool) -> dict:
    steps = scan_lengths(num_tasks, quick)
    weighting, per_call, with_famo, without_famo = make_functions(num_tasks, steps)
    state = weighting.init()
    key = jax.random.key(num_tasks)
    prev = jax.random.uniform(key, (num_tasks,), minval=0.5, maxval=2.0)
    curr = prev * 0.99
    per_call = jax.jit(per_call)
    with_famo = jax.jit(with_famo)
    without_famo = jax.jit(without_famo)
    for fn, args in ((per_call, (state, prev, curr)), (with_famo, (state, prev))):
        fn.lower(*args).compile()
    without_famo.lower(state, prev).compile()
    warmup, repeats = (1, 3) if quick else (2, 7)
    call_repeats = 50 if quick else 300
    # Interleave the two scans so that both see the same machine load.
    scan_famo, scan_base = [], []
    for _ in range(repeats):
        scan_famo.append(_time_call(with_famo, (state, prev), warmup, 1, f"scan k={num_tasks}"))
        scan_base.append(_time_call(without_famo, (state, prev), warmup, 1, f"base k={num_tasks}"))
    famo_seconds = _timing.median(scan_famo)
    base_seconds = _timing.median(scan_base)
    call_seconds = _time_call(
        per_call, (state, prev, curr), warmup, call_repeats, f"call k={num_tasks}"
    )
    return {
        "num_tasks": num_tasks,
        "scan_steps": steps,
        "in_scan_us": max(famo_seconds - base_seconds, 0.0) / steps * 1e6,
        "scan_total_us": famo_seconds / steps * 1e6,
        "per_call_us": call_seconds * 1e6,
    }


def fit_line(ks: np.ndarray, us: np.ndarray) -> tuple[float, float]:
    """Least-squares ``us = a + b * k``; returns (a in us, b in ns per task)."""
    design = np.stack([np.ones_like(ks), ks], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, us, rcond=None)
    return float(a), float(b) * 1e3


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer k and repeats, seconds")
    parser.add_argument("--ks", type=int, nargs="+", help="numbers of tasks to measure")
    args = parser.parse_args(argv)
    ks = tuple(args.ks or (QUICK_KS if args.quick else FULL_KS))

    print("# FAMO weigh + update cost against the number of tasks\n")
    _timing.print_machine_info()
    print(
        "famo_jax.famo(k) defaults (logits lr 0.025, gamma 0.001); float32 losses. "
        "weigh = value and gradient w.r.t. the losses; update = one logits step.\n"
    )
    start = time.perf_counter()
    rows = []
    for k in ks:
        row = measure(k, args.quick)
        rows.append(row)
        print(
            f"  k={k:<7} in scan {row['in_scan_us']:9.2f} us/step, per call "
            f"{row['per_call_us']:9.1f} us"
        )
    a, b = fit_line(
        np.array([r["num_tasks"] for r in rows], float), np.array([r["in_scan_us"] for r in rows])
    )
    print()
    headers = [
        "k",
        "in a scan: us / step",
        "ns / task",
        "per jitted call: us (dispatch incl.)",
        "scan steps",
    ]
    table_rows = [
        [
            f"{r['num_tasks']:,}",
            f"{r['in_scan_us']:.2f}",
            f"{r['in_scan_us'] * 1e3 / r['num_tasks']:.2f}",
            f"{r['per_call_us']:.1f}",
            str(r["scan_steps"]),
        ]
        for r in rows
    ]
    print(_timing.markdown_table(headers, table_rows))
    print(
        f"\nLeast-squares fit over the in-scan figures: {a:.2f} us + {b:.3f} ns x k "
        f"(so {a + b * 1e-3 * 100_000:.0f} us at k = 100,000). The model never enters: "
        "weigh and update take only the (k,) loss vector."
    )
    print(f"Total benchmark time: {time.perf_counter() - start:.0f} s.")
    return rows


if __name__ == "__main__":
    main()
