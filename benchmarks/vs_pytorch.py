"""famo_jax against a PyTorch FAMO written from the paper's Algorithm 2, on CPU.

Optional: runs only when ``torch`` is installed (it is never a famo_jax
dependency); without it the script prints a message and exits cleanly.

Two comparisons, each with the same computation on both sides and a check that
the results agree (printed, not asserted):

(a) **The toy problem** of the paper (Appendix D): two tasks on
    ``theta in R^2``, Adam lr 1e-3 for 50,000 steps from ``(-8.5, 7.5)``, FAMO
    with ``min_losses = (-2.1, -21)``, gamma 0, logits lr 0.025. The loop is the
    authors' toy script's: at step ``t > 0`` FAMO is updated with the previous
    and the current losses before they are weighted. On this deterministic
    full-batch problem that is exactly the same-batch update (the losses
    re-computed after step ``t - 1`` are the losses of step ``t``), with no
    extra forward pass. PyTorch runs the Python loop; JAX runs the whole
    50,000 steps as one jitted ``lax.scan`` (compile time reported separately).
    Also shown: JAX on the five starting points of the authors' script at once
    (``vmap`` inside the same scan).

(b) **One training step** of the shared-trunk MLP of ``benchmarks/scaling.py``
    (input 512 -> 1024 -> 512, ReLU, 1,050,112 trunk parameters, one linear head
    per task) with k = 40 tasks, batch 128, Adam lr 1e-3: FAMO same-batch (the
    authors' mode), FAMO lagged and LS, median over repeats. Both start from the
    same weights; after a few steps on the same batches the parameters, FAMO
    logits and losses are compared.

Both sides run on the CPU in float32 with all the process's cores
(``torch.set_num_threads``; XLA uses every core by default).

Run from the repository root: ``python -m benchmarks.vs_pytorch`` (a few
minutes; the PyTorch toy loop dominates) or ``python -m benchmarks.vs_pytorch
--quick`` (seconds, a smoke test). The PyTorch side is the repository's
reference: ``tests/reference/famo_torch.py`` (the paper's Algorithm 2, which
also made the parity fixtures) and ``tests/reference/toy_torch.py``.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import famo_jax
from benchmarks import _timing, scaling
from famo_jax import problems

TOY_START = (-8.5, 7.5)
TOY_STARTS = ((-8.5, 7.5), (0.0, 0.0), (9.0, 9.0), (-7.5, -0.5), (9.0, -1.0))
TOY_MIN_LOSSES = (-2.1, -21.0)
TOY_MODEL_LR = 1e-3
TOY_LOGITS_LR = 0.025
TOY_GAMMA = 0.0
# Agreement tolerances. The toy runs are compared in float64: in float32 both
# reach the Pareto front, but where along it is decided by rounding (near the
# front the per-step change of the log losses is at float32 resolution and Adam
# normalises it into full-size logits steps), so float32 end points differ by
# ~1e-2 between any two implementations, or two compilations of one.
TOY_ATOL = 1e-5  # max |JAX - PyTorch| of theta, losses, logits, float64 runs
PARETO_THRESHOLD = 1e-4  # Pareto-stationarity residual on the front (as toy_pareto.py)
MLP_ATOL = 1e-6  # max |JAX - PyTorch| of parameters and logits, float64 runs
MLP_BLOCK_STEPS = 15  # timed MLP steps per block (blocks of JAX and PyTorch alternate)
MLP_BLOCK_WARMUP = 12  # untimed steps at the start of each block (see bench_mlp)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# --- PyTorch side ----------------------------------------------------------------------


class TorchSide(NamedTuple):
    """torch and the repository's PyTorch references (tests/reference/), imported lazily."""

    torch: Any
    famo: Any  # FamoReference: the paper's Algorithm 2
    toy_losses: Callable[[Any], Any]  # the authors' toy problem


def import_torch_side() -> TorchSide | None:
    """The PyTorch side, or None when torch is not installed."""
    try:
        import torch
    except ImportError:
        return None
    from tests.reference.famo_torch import FamoReference
    from tests.reference.toy_torch import toy_losses

    return TorchSide(torch, FamoReference, toy_losses)


def torch_toy_run(pt: TorchSide, start, steps: int, dtype=None):
    """The authors' toy loop with FAMO; returns (theta, losses, logits) as numpy."""
    torch = pt.torch
    dtype = dtype or torch.float32
    theta = torch.tensor(start, dtype=dtype, requires_grad=True)
    optimizer = torch.optim.Adam([theta], lr=TOY_MODEL_LR)
    famo = pt.famo(2, TOY_MIN_LOSSES, lr=TOY_LOGITS_LR, gamma=TOY_GAMMA, dtype=dtype)
    prev = None
    for _ in range(steps):
        losses = pt.toy_losses(theta)
        if prev is not None:
            with torch.no_grad():
                famo.update(prev, losses.detach())
        loss = famo.get_weighted_loss(losses)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        prev = losses.detach()
    with torch.no_grad():
        final = pt.toy_losses(theta)
    return theta.detach().numpy(), final.numpy(), famo.logits.numpy().copy()


class TorchMLP:
    """The MLP of benchmarks/scaling.py in PyTorch, initialised from JAX parameters."""

    def __init__(self, torch, params: dict, dtype=None):
        nn = torch.nn
        trunk, heads = params["trunk"], params["heads"]
        in_dim, hidden = trunk["w1"].shape
        feat = trunk["w2"].shape[1]
        num_tasks = heads["w"].shape[0]
        self.torch = torch
        self.model = nn.Sequential(
            nn.Linear(in_dim, hidden),
            nn.ReLU(),
            nn.Linear(hidden, feat),
            nn.ReLU(),
            nn.Linear(feat, num_tasks),  # the k linear heads, stacked
        ).to(dtype or torch.float32)
        with torch.no_grad():
            layers = [self.model[0], self.model[2], self.model[4]]
            weights = [np.array(trunk["w1"]).T, np.array(trunk["w2"]).T, np.array(heads["w"])]
            biases = [np.array(trunk["b1"]), np.array(trunk["b2"]), np.array(heads["b"])]
            for layer, w, b in zip(layers, weights, biases, strict=True):
                layer.weight.copy_(torch.from_numpy(np.ascontiguousarray(w)))
                layer.bias.copy_(torch.from_numpy(b))  # copy_ converts the dtype

    def losses(self, x, y):
        return ((self.model(x) - y) ** 2).mean(0)

    def params_numpy(self) -> dict:
        m = self.model
        t = lambda p: p.detach().numpy()
        return {
            "trunk": {
                "w1": t(m[0].weight).T,
                "b1": t(m[0].bias),
                "w2": t(m[2].weight).T,
                "b2": t(m[2].bias),
            },
            "heads": {"w": t(m[4].weight), "b": t(m[4].bias)},
        }


def torch_mlp_steps(pt: TorchSide, params: dict, num_tasks: int, dtype=None):
    """Steps of LS, FAMO same-batch and FAMO lagged for the PyTorch MLP.

    Returns name -> (make_state, step) with ``step(state, x, y)`` training in place.
    """
    torch = pt.torch

    def make_ls():
        net = TorchMLP(torch, params, dtype)
        return net, torch.optim.Adam(net.model.parameters(), lr=1e-3), None, None

    def make_famo():
        net, opt, _, _ = make_ls()
        famo = pt.famo(num_tasks, [0.0] * num_tasks, lr=0.025, gamma=0.001, dtype=dtype)
        return net, opt, famo, None

    def ls_step(state, x, y):
        net, opt, _, _ = state
        loss = net.losses(x, y).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return state

    def famo_same_batch_step(state, x, y):
        net, opt, famo, _ = state
        losses = net.losses(x, y)
        loss = famo.get_weighted_loss(losses)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():  # the authors' update: same batch, after the step
            famo.update(losses.detach(), net.losses(x, y))
        return state

    def famo_lagged_step(state, x, y):
        net, opt, famo, prev = state
        losses = net.losses(x, y)
        loss = famo.get_weighted_loss(losses)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses = losses.detach()
        if prev is not None:
            with torch.no_grad():
                famo.update(prev, losses)
        return net, opt, famo, losses

    return {
        "LS": (make_ls, ls_step),
        "FAMO same-batch": (make_famo, famo_same_batch_step),
        "FAMO lagged": (make_famo, famo_lagged_step),
    }


# --- JAX side ------------------------------------------------------------------------


def make_jax_toy_run(steps: int, dtype=jnp.float32):
    """A function of the start (shape (2,), or (n, 2) for n runs at once) running the toy.

    ``dtype`` is that of the FAMO logits (the start's dtype sets the model's);
    float64 needs ``jax.enable_x64``.
    """
    toy_losses = problems.toy_losses
    weighting = famo_jax.famo(
        2,
        learning_rate=TOY_LOGITS_LR,
        gamma=TOY_GAMMA,
        min_losses=TOY_MIN_LOSSES,
        logits_dtype=dtype,
    )
    model_opt = optax.adam(TOY_MODEL_LR)

    def one_run(theta):
        def step(carry, _):
            theta, opt_state, state, prev = carry
            losses, pullback = jax.vjp(toy_losses, theta)
            # As the authors' toy loop: update with (previous, current) losses from
            # the second step on, then weigh the current losses. The previous losses
            # start at NaN, so FAMO skips the first update by its documented rule
            # for non-finite losses; no branch on the step index is needed (a
            # lax.cond, or a jnp.where over the state, makes this step several
            # times slower on the CPU backend).
            state = weighting.update(prev, losses, state)
            (grads,) = pullback(famo_jax.loss_weights(weighting, losses, state))
            updates, opt_state = model_opt.update(grads, opt_state, theta)
            return (optax.apply_updates(theta, updates), opt_state, state, losses), None

        no_losses = jnp.full((2,), jnp.nan, theta.dtype)
        carry = (theta, model_opt.init(theta), weighting.init(), no_losses)
        (theta, _, state, _), _ = jax.lax.scan(step, carry, None, length=steps)
        return theta, toy_losses(theta), state.logits

    def run(starts):
        return one_run(starts) if starts.ndim == 1 else jax.vmap(one_run)(starts)

    return jax.jit(run)


# --- Benchmarks ----------------------------------------------------------------------


def bench_toy(pt: TorchSide, steps: int, jax_repeats: int) -> dict:
    torch = pt.torch
    start = jnp.asarray(TOY_START, jnp.float32)
    run = make_jax_toy_run(steps)
    t0 = time.perf_counter()
    run.lower(start).compile()
    compile_seconds = time.perf_counter() - t0
    jax_times = []
    with _timing.CompileCounter("toy run"):
        for _ in range(jax_repeats):
            t0 = time.perf_counter()
            jax_result = jax.block_until_ready(run(start))
            jax_times.append(time.perf_counter() - t0)
    jax_seconds = _timing.median(jax_times)

    starts = jnp.asarray(TOY_STARTS, jnp.float32)
    t0 = time.perf_counter()
    run.lower(starts).compile()
    compile_five = time.perf_counter() - t0
    five_times = []
    with _timing.CompileCounter("toy run, five starts"):
        for _ in range(jax_repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(run(starts))
            five_times.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    torch_result = torch_toy_run(pt, TOY_START, steps)
    torch_seconds = time.perf_counter() - t0

    # The same runs in float64 on both sides (untimed): see TOY_ATOL.
    with jax.enable_x64(True):
        run64 = make_jax_toy_run(steps, jnp.float64)
        jax_result64 = jax.block_until_ready(run64(jnp.asarray(TOY_START, jnp.float64)))
        jax_result64 = [np.asarray(a) for a in jax_result64]
    torch_result64 = torch_toy_run(pt, TOY_START, steps, torch.float64)

    names = ("theta", "losses", "logits")

    def max_diffs(a, b):
        return {
            n: float(np.max(np.abs(np.asarray(x) - y))) for n, x, y in zip(names, a, b, strict=True)
        }

    return {
        "steps": steps,
        "torch_seconds": torch_seconds,
        "jax_seconds": jax_seconds,
        "jax_compile_seconds": compile_seconds,
        "jax_five_seconds": _timing.median(five_times),
        "jax_five_compile_seconds": compile_five,
        "jax": [np.asarray(a) for a in jax_result],
        "torch": list(torch_result),
        "diffs": max_diffs(jax_result, torch_result),
        "jax64": jax_result64,
        "torch64": list(torch_result64),
        "diffs64": max_diffs(jax_result64, torch_result64),
    }


JAX_MLP_STEPS = {
    "LS": scaling.make_ls,
    "FAMO same-batch": scaling.make_famo_same_batch,
    "FAMO lagged": scaling.make_famo_lagged,
}


def _mlp_agreement(pt, params, batches, name, check_steps, jax_step, jax_carry, dtype):
    torch = pt.torch
    """Runs the JAX and PyTorch steps on the same batches; max differences after."""
    to_torch = lambda a: torch.from_numpy(np.array(a))
    make_state, torch_step = torch_mlp_steps(pt, params, batches[0][1].shape[1], dtype)[name]
    state = make_state()
    for bx, by in batches[:check_steps]:
        jax_carry = jax_step(jax_carry, bx, by)
        state = torch_step(state, to_torch(bx), to_torch(by))
    jax_params, jax_logits = jax_carry[0], jax_carry[2].logits
    param_diff = max(
        float(np.max(np.abs(np.asarray(a) - b)))
        for a, b in zip(
            jax.tree.leaves(jax_params), jax.tree.leaves(state[0].params_numpy()), strict=True
        )
    )
    x, y = batches[0]
    with torch.no_grad():
        torch_losses = state[0].losses(to_torch(x), to_torch(y)).numpy()
    jax_losses = np.asarray(jax.jit(scaling.task_losses)(jax_params, x, y))
    return {
        "params": param_diff,
        "logits": float(np.max(np.abs(np.asarray(jax_logits) - state[2].logits.numpy()))),
        "losses_rel": float(np.max(np.abs(jax_losses - torch_losses) / np.abs(torch_losses))),
    }


def bench_mlp(
    pt: TorchSide, cfg: scaling.ModelConfig, num_tasks: int, repeats: int, check_steps: int
) -> dict:
    torch = pt.torch
    key = jax.random.key(0)
    k_params, k_batch = jax.random.split(key)
    params = scaling.init_params(k_params, cfg, num_tasks)
    batches = [
        scaling.make_batch(k, cfg, num_tasks)
        for k in jax.random.split(k_batch, max(check_steps, 1))
    ]
    x, y = batches[0]
    x_t, y_t = torch.from_numpy(np.array(x)), torch.from_numpy(np.array(y))
    torch_steps = torch_mlp_steps(pt, params, num_tasks)
    rows, agreement = {}, {}
    for name, maker in JAX_MLP_STEPS.items():
        step, carry = maker(params, x, y)
        compiled = _timing.compile_step(step, carry, x, y)
        make_state, torch_step = torch_steps[name]
        jax_carry, state = _timing.fresh_copy(carry), make_state()
        for _ in range(3):
            jax_carry = jax.block_until_ready(compiled.fn(jax_carry, x, y))
            state = torch_step(state, x_t, y_t)
        # Blocks of steps of each framework alternate (and which one goes first
        # alternates), so both see the same machine load. Each block starts with
        # untimed steps: right after the other framework ran, a step is slower
        # (its worker threads were spinning or asleep, its parameters and Adam
        # moments out of cache). XLA:CPU took about 8 steps to reach its steady
        # time, PyTorch 1 or 2; a training loop runs at the steady time, and
        # alternating single steps made JAX's median up to 1.7x slower.
        times = {"jax": [], "torch": []}
        num_blocks = max(2, -(-repeats // MLP_BLOCK_STEPS))
        with _timing.CompileCounter(f"JAX {name}"):
            for block in range(num_blocks):
                order = ("jax", "torch") if block % 2 == 0 else ("torch", "jax")
                for framework in order:
                    for index in range(MLP_BLOCK_WARMUP + MLP_BLOCK_STEPS):
                        t0 = time.perf_counter()
                        if framework == "jax":
                            jax_carry = jax.block_until_ready(compiled.fn(jax_carry, x, y))
                        else:
                            state = torch_step(state, x_t, y_t)
                        if index >= MLP_BLOCK_WARMUP:
                            times[framework].append(time.perf_counter() - t0)
        rows[name] = {
            "jax_seconds": _timing.median(times["jax"]),
            "torch_seconds": _timing.median(times["torch"]),
        }
        if name == "LS":
            continue
        # Agreement in float32 (the executable just timed, on a fresh copy of the
        # carry) and in float64 (new programs, x64 enabled, float64 FAMO logits).
        agreement[(name, "float32")] = _mlp_agreement(
            pt, params, batches, name, check_steps, compiled.fn,
            _timing.fresh_copy(carry), torch.float32,
        )  # fmt: skip
        with jax.enable_x64(True):
            to64 = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)
            params64, batches64 = to64(params), [to64(b) for b in batches]
            step64, carry64 = maker(params64, *batches64[0], logits_dtype=jnp.float64)
            agreement[(name, "float64")] = _mlp_agreement(
                pt, params, batches64, name, check_steps, jax.jit(step64), carry64,
                torch.float64,
            )  # fmt: skip
    return {"rows": rows, "agreement": agreement}


def print_toy_report(toy: dict) -> None:
    steps = toy["steps"]
    speedup = toy["torch_seconds"] / toy["jax_seconds"]
    seconds = lambda total: [_timing.format_seconds(total), _timing.format_seconds(total / steps)]
    print(
        _timing.markdown_table(
            ["implementation", "whole run", "per step", "speed-up"],
            [
                ["PyTorch loop", *seconds(toy["torch_seconds"]), "1x"],
                ["JAX, one jitted lax.scan", *seconds(toy["jax_seconds"]), f"{speedup:.0f}x"],
                [
                    "JAX, 5 starts vmapped in one scan",
                    *seconds(toy["jax_five_seconds"]),
                    f"{5 * toy['torch_seconds'] / toy['jax_five_seconds']:.0f}x vs 5 PyTorch runs",
                ],
            ],
        )
    )
    print(
        f"\nJAX compile time (not in the run times): {toy['jax_compile_seconds']:.2f} s "
        f"(five starts: {toy['jax_five_compile_seconds']:.2f} s). Target: >= 100x: "
        f"{'met' if speedup >= 100 else 'MISSED'} ({speedup:.0f}x)."
    )
    fmt = lambda a: np.array2string(np.asarray(a), precision=5, separator=", ")
    for index, name in enumerate(("theta", "losses", "logits")):
        print(f"Final {name}: JAX {fmt(toy['jax'][index])}, PyTorch {fmt(toy['torch'][index])}")
    print(
        "Max |JAX - PyTorch| (float32): "
        + ", ".join(f"{n} {d:.2e}" for n, d in toy["diffs"].items())
        + "."
    )
    residuals = [
        float(problems.toy_pareto_residual(jnp.asarray(theta, jnp.float32)))
        for theta in (toy["jax"][0], toy["torch"][0])
    ]
    on_front = all(r < PARETO_THRESHOLD for r in residuals)
    print(
        f"Pareto-stationarity residual at the end (float32): JAX {residuals[0]:.1e}, "
        f"PyTorch {residuals[1]:.1e}; both on the front (< {PARETO_THRESHOLD:g}): "
        f"{'yes' if on_front else 'no'}."
    )
    worst64 = max(toy["diffs64"].values())
    print(
        "Same runs in float64, max |JAX - PyTorch|: "
        + ", ".join(f"{n} {d:.2e}" for n, d in toy["diffs64"].items())
        + f"; within {TOY_ATOL:g}: {'yes' if worst64 <= TOY_ATOL else 'NO'}."
    )
    print(
        "(Equal results are judged on the float64 runs: in float32, where along the front "
        "a run ends is decided by rounding, see TOY_ATOL in this script.)\n"
    )


def print_mlp_report(mlp: dict, repeats: int, check_steps: int) -> None:
    rows = [
        [
            name,
            _timing.format_seconds(r["torch_seconds"]),
            _timing.format_seconds(r["jax_seconds"]),
            f"{r['torch_seconds'] / r['jax_seconds']:.2f}x",
        ]
        for name, r in mlp["rows"].items()
    ]
    print(
        _timing.markdown_table(
            ["method", "PyTorch step (median)", "JAX jitted step (median)", "speed-up"], rows
        )
    )
    same_batch = mlp["rows"]["FAMO same-batch"]
    main_speedup = same_batch["torch_seconds"] / same_batch["jax_seconds"]
    print(
        f"\nMedian of {max(2, -(-repeats // MLP_BLOCK_STEPS)) * MLP_BLOCK_STEPS} steps per "
        f"framework, in alternating blocks of {MLP_BLOCK_WARMUP} untimed and {MLP_BLOCK_STEPS} "
        "timed steps. Target (FAMO same-batch, the authors' mode): >= 2x: "
        f"{'met' if main_speedup >= 2 else 'MISSED'} ({main_speedup:.2f}x)."
    )
    print(f"\nAgreement after {check_steps} steps from the same weights on the same batches:\n")
    agreement_rows = []
    for (name, precision), a in mlp["agreement"].items():
        ok = a["params"] <= MLP_ATOL and a["logits"] <= MLP_ATOL
        verdict = ("yes" if ok else "NO") if precision == "float64" else "(info)"
        agreement_rows.append(
            [name, precision, f"{a['params']:.1e}", f"{a['logits']:.1e}",
             f"{a['losses_rel']:.1e}", verdict]
        )  # fmt: skip
    header = ["method", "precision", "max |params diff|", "max |logits diff|"]
    header += ["max rel. loss diff", f"within {MLP_ATOL:g}"]
    print(_timing.markdown_table(header, agreement_rows))
    print(
        "\n(Judged in float64: in float32, Adam turns rounding-level differences of "
        "near-zero gradients into differences of up to the learning rate per step.)"
    )


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings, seconds")
    parser.add_argument("--toy-steps", type=int, help="steps of the toy run (default 50,000)")
    parser.add_argument("--num-tasks", type=int, default=40, help="tasks of the MLP step")
    parser.add_argument("--repeats", type=int, help="timed MLP steps (default 30)")
    args = parser.parse_args(argv)

    print("# famo_jax versus PyTorch (FAMO of the paper's Algorithm 2), CPU\n")
    if args.quick:
        print("(--quick: a smoke test on tiny settings; the figures mean nothing.)\n")
    pt = import_torch_side()
    if pt is None:
        print("PyTorch is not installed: skipping this benchmark (pip install torch to run it).")
        return None
    pt.torch.set_num_threads(usable_cores())
    _timing.print_machine_info(
        {"torch": f"{pt.torch.__version__} ({pt.torch.get_num_threads()} threads)"}
    )

    toy_steps = args.toy_steps or (500 if args.quick else 50_000)
    cfg = scaling.QUICK_MODEL if args.quick else scaling.ModelConfig()
    num_tasks = 4 if args.quick and args.num_tasks == 40 else args.num_tasks
    repeats = args.repeats or (5 if args.quick else 30)
    check_steps = 3 if args.quick else 10

    print(
        f"## (a) Toy problem: {toy_steps:,} steps from {TOY_START}, Adam lr {TOY_MODEL_LR}, "
        f"FAMO min_losses {TOY_MIN_LOSSES}, gamma {TOY_GAMMA}, logits lr {TOY_LOGITS_LR}\n"
        "JAX losses: famo_jax.problems.toy_losses; PyTorch: tests/reference/toy_torch.py.\n"
    )
    toy = bench_toy(pt, toy_steps, jax_repeats=3 if args.quick else 5)
    print_toy_report(toy)

    print(
        f"## (b) One training step: {cfg.describe()}; k = {num_tasks} tasks; FAMO "
        "defaults (lr 0.025, gamma 0.001)\n"
    )
    mlp = bench_mlp(pt, cfg, num_tasks, repeats, check_steps=check_steps)
    print_mlp_report(mlp, repeats, check_steps)
    return {"toy": toy, "mlp": mlp}


if __name__ == "__main__":
    main()
