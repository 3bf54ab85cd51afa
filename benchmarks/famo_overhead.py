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

Figures per k (medians after warm-up):

- *weigh + update*: a jitted call of weigh + update minus a jitted call with
  the same inputs and outputs that does no work, the two calls alternating over
  many rounds: FAMO's cost inside a jitted training step, without the dispatch
  of a separate call;
- *in a lax.scan body*: ``S`` steps of weigh + update inside one jitted
  ``lax.scan`` minus the same scan without FAMO (it only produces the next
  step's losses), divided by ``S``: the same work in a scanned training loop
  (XLA's CPU backend runs loop bodies with less parallelism, so large k costs
  more there);
- *jitted call incl. dispatch*: what a Python loop pays when FAMO runs as its
  own jitted function (it is normally fused into the training step instead).

No trace or compilation happens in the timed loops (checked with
``jax.monitoring`` event counters, see ``_timing.CompileCounter``).

Run: ``python -m benchmarks.famo_overhead`` (under a minute) or with ``--quick``.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import famo_jax
from benchmarks import _timing

FULL_KS = (2, 10, 100, 1_000, 10_000, 100_000)
QUICK_KS = (2, 100, 10_000)
CALL_ROUNDS = 200


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


def _no_famo(state, prev_losses, curr_losses):
    # Same inputs and outputs as weigh_and_update, no work: the dispatch baseline.
    del prev_losses
    return state, curr_losses[0], curr_losses


def measure(num_tasks: int, quick: bool) -> dict:
    steps = scan_lengths(num_tasks, quick)
    weighting, weigh_and_update, with_famo, without_famo = make_functions(num_tasks, steps)
    state = weighting.init()
    key = jax.random.key(num_tasks)
    prev = jax.random.uniform(key, (num_tasks,), minval=0.5, maxval=2.0)
    curr = prev * 0.99
    per_call, no_famo = jax.jit(weigh_and_update), jax.jit(_no_famo)
    with_famo, without_famo = jax.jit(with_famo), jax.jit(without_famo)
    for fn, args in (
        (per_call, (state, prev, curr)),
        (no_famo, (state, prev, curr)),
        (with_famo, (state, prev)),
        (without_famo, (state, prev)),
    ):
        fn.lower(*args).compile()
    warmup = 1 if quick else 2
    scan_repeats, call_rounds = (3, 30) if quick else (7, CALL_ROUNDS)
    # The two calls alternate, as do the two scans, so that both members of a
    # pair see the same machine load. The state is not carried over (each call
    # starts from the same state), so every call does the same work.
    calls = _timing.time_interleaved(
        {
            "famo": (lambda _, *args: per_call(*args), None, (state, prev, curr)),
            "none": (lambda _, *args: no_famo(*args), None, (state, prev, curr)),
        },
        warmup=warmup,
        rounds=call_rounds,
        label=f"calls k={num_tasks}",
    )
    scan_famo, scan_base = [], []
    for _ in range(scan_repeats):
        scan_famo.append(_time_call(with_famo, (state, prev), warmup, 1, f"scan k={num_tasks}"))
        scan_base.append(_time_call(without_famo, (state, prev), warmup, 1, f"base k={num_tasks}"))
    call_famo, call_none = _timing.median(calls["famo"]), _timing.median(calls["none"])
    scan_extra = _timing.median(scan_famo) - _timing.median(scan_base)
    return {
        "num_tasks": num_tasks,
        "scan_steps": steps,
        "step_us": max(call_famo - call_none, 0.0) * 1e6,
        "per_call_us": call_famo * 1e6,
        "dispatch_us": call_none * 1e6,
        "in_scan_us": max(scan_extra, 0.0) / steps * 1e6,
    }


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
            f"  k={k:<7} in a jitted call {row['step_us']:9.2f} us (+ {row['dispatch_us']:.1f} "
            f"us dispatch), in a scan body {row['in_scan_us']:9.2f} us"
        )
    print()
    headers = [
        "k",
        "weigh + update: us",
        "ns / task",
        "same, in a lax.scan body: us",
        "jitted call incl. dispatch: us",
    ]
    table_rows = [
        [
            f"{r['num_tasks']:,}",
            f"{r['step_us']:.2f}",
            f"{r['step_us'] * 1e3 / r['num_tasks']:.2f}",
            f"{r['in_scan_us']:.2f}",
            f"{r['per_call_us']:.1f}",
        ]
        for r in rows
    ]
    print(_timing.markdown_table(headers, table_rows))
    large = [r for r in rows if r["num_tasks"] >= 10_000]
    if large:
        per_task = [r["step_us"] * 1e3 / r["num_tasks"] for r in large]
        print(
            f"\nPer task at k >= 10,000: {min(per_task):.1f} to {max(per_task):.1f} ns "
            "(linear in k with this constant; below ~1,000 tasks the fixed cost of a few "
            "small kernels dominates)."
        )
    rounds = 30 if args.quick else CALL_ROUNDS
    print(
        "\n'weigh + update' is the median time of a jitted call of weigh (value and "
        "gradient) plus update, minus that of a jitted call with the same inputs and "
        f"outputs that does nothing ({rounds} interleaved rounds): the cost FAMO adds "
        "inside a jitted training step. The scan column is the same work in the body of "
        "a lax.scan, per step (minus a scan without FAMO). The model never enters: weigh "
        "and update see only the (k,) loss vector."
    )
    print(f"Total benchmark time: {time.perf_counter() - start:.0f} s.")
    return rows


if __name__ == "__main__":
    main()
