"""Figure 1 of the FAMO paper: six multitask optimizers on the two-task toy problem.

The toy problem (:mod:`famo_jax.problems`, paper Appendix D) has two losses on
``theta in R^2`` whose scales differ by ten. From the five starting points of
the authors' script, this example runs

* LS: Adam on the sum of the two losses,
* MGDA, PCGrad, CAGrad (c = 0.4) and Nash-MTL: famo_jax's gradient aggregators
  in front of Adam, with the conventions of the authors' toy script (see
  :func:`make_method`),
* FAMO: Adam on FAMO's weighted loss, ``min_losses = (-2.1, -21)``, gamma 0,
  logits learning rate 0.025, logits updated with the losses before and after
  each step (in the authors' loop these are the same-batch losses: the problem
  is deterministic),

all with Adam at learning rate 1e-3 for 50,000 steps. Each method is one
``jax.lax.scan`` over the steps, ``jax.vmap``-ed over the five starts, jitted
once. It prints, per method and start, the final losses, the Pareto-stationarity
residual (norm of the min-norm convex combination of the two task gradients)
and whether the run reached the Pareto front (residual below ``--threshold``),
plus the wall time of each method (compilation timed separately), and saves

* with ``--out DIR``, ``DIR/toy_pareto.png`` (the committed figure is
  ``docs/toy_pareto.png``; nothing is written without ``--out``): per method, the trajectories in
  parameter space over the contours of the average loss with the Pareto set,
  and in loss space with the Pareto front (the paper's Figure 1);
* the same name with ``_curves`` appended: the two task losses against steps.

Result (the README table): LS reaches the front from 4 of the 5 starts (from
(9, 9) it stalls in the upper valley), every other method from all 5, as in
the paper. FAMO needs the authors' gamma = 0 here: with the library default
``--famo-gamma 0.001`` the decay keeps its logits near zero (the per-step
changes of the log losses are tiny on this smooth problem) and it stalls from
2 of the 5 starts, like LS.

Run: ``python examples/toy_pareto.py`` (full settings; a few seconds for LS,
PCGrad and FAMO, most of the time goes to the iterative solvers of MGDA,
CAGrad and Nash-MTL) or ``python examples/toy_pareto.py --quick`` (seconds).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import famo_jax
from famo_jax import problems

METHODS = ("LS", "MGDA", "PCGrad", "CAGrad", "Nash-MTL", "FAMO")
NUM_TASKS = 2


class ToyMethod(NamedTuple):
    """One optimizer on the toy: ``init(theta) -> carry``, ``step(carry) -> carry``.

    The carry's first entry is ``theta``; the rest is the method's state.
    """

    init: Callable[[jax.Array], Any]
    step: Callable[[Any], Any]


class RunResult(NamedTuple):
    """Everything one method's run over the starts produced (NumPy arrays)."""

    method: str
    starts: np.ndarray  # (num_starts, 2)
    thetas: np.ndarray  # (num_starts, num_steps + 1, 2): start, then after each step
    losses: np.ndarray  # (num_starts, num_steps + 1, 2): task losses at thetas
    residual: np.ndarray  # (num_starts,): Pareto-stationarity residual at the end
    front_distance: np.ndarray  # (num_starts,): distance of the end point to the Pareto set
    run_seconds: float  # wall time of the compiled run, all starts together
    compile_seconds: float  # tracing + XLA compilation time


def _aggregator_method(aggregator: optax.GradientTransformation, learning_rate: float):
    """A gradient aggregator in front of Adam: input the per-task gradients."""
    tx = optax.chain(aggregator, optax.adam(learning_rate))

    def init(theta):
        return theta, tx.init(theta)

    def step(carry):
        theta, opt_state = carry
        task_grads = jax.jacrev(problems.toy_losses)(theta)  # (num_tasks, 2)
        updates, opt_state = tx.update(task_grads, opt_state, theta)
        return optax.apply_updates(theta, updates), opt_state

    return ToyMethod(init, step)


def make_method(
    name: str,
    learning_rate: float = 1e-3,
    famo_learning_rate: float = 0.025,
    famo_gamma: float = 0.0,
    famo_min_losses: Sequence[float] = problems.TOY_MIN_LOSSES,
) -> ToyMethod:
    """Builds one of :data:`METHODS` with the settings of the authors' toy script.

    The conventions follow the authors' ``experiments/toy/trainer.py`` (FAMO
    repository), which runs every method through their ``WeightMethods``:
    CAGrad's update is multiplied by the number of tasks (their sum convention)
    and then clipped to norm 1, PCGrad sums the projected gradients and clips to
    norm 1, MGDA's min-norm weights are multiplied by the number of tasks; LS,
    MGDA, Nash-MTL and FAMO are not clipped (their clip runs before the backward
    pass, on zero gradients). Adam hardly cares about a constant factor, but a
    clip changes the relative size of the steps, so both are reproduced.

    Args:
      name: one of :data:`METHODS`.
      learning_rate: Adam's learning rate on ``theta``.
      famo_learning_rate: FAMO's logits learning rate.
      famo_gamma: FAMO's logits decay.
      famo_min_losses: FAMO's loss lower bounds.

    Returns:
      A :class:`ToyMethod`.
    """
    if name == "LS":
        adam = optax.adam(learning_rate)

        def init(theta):
            return theta, adam.init(theta)

        def step(carry):
            theta, opt_state = carry
            grads = jax.grad(lambda t: jnp.sum(problems.toy_losses(t)))(theta)
            updates, opt_state = adam.update(grads, opt_state, theta)
            return optax.apply_updates(theta, updates), opt_state

        return ToyMethod(init, step)

    if name == "FAMO":
        weighting = famo_jax.famo(
            NUM_TASKS,
            learning_rate=famo_learning_rate,
            gamma=famo_gamma,
            min_losses=famo_min_losses,
        )
        adam = optax.adam(learning_rate)

        def init(theta):
            return theta, adam.init(theta), weighting.init()

        def step(carry):
            theta, opt_state, famo_state = carry

            def objective(t):
                losses = problems.toy_losses(t)
                return weighting.weigh(losses, famo_state), losses

            grads, losses = jax.grad(objective, has_aux=True)(theta)
            updates, opt_state = adam.update(grads, opt_state, theta)
            new_theta = optax.apply_updates(theta, updates)
            # The authors' loop updates the logits with the losses before and
            # after the step (no minibatches here, so this is the same-batch rule).
            famo_state = weighting.update(losses, problems.toy_losses(new_theta), famo_state)
            return new_theta, opt_state, famo_state

        return ToyMethod(init, step)

    if name not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {name!r}.")
    return _aggregator_method(authors_aggregator(name), learning_rate)


def authors_aggregator(name: str) -> optax.GradientTransformation:
    """The gradient aggregator ``name`` with the conventions of the authors' toy script.

    famo_jax's aggregators output the *mean* scale; the authors' ``WeightMethods``
    use the sum (``optax.scale(2)``), and clip the result to norm 1 for PCGrad
    and CAGrad only. Nash-MTL keeps its weights between steps (warm starts).

    Args:
      name: ``"MGDA"``, ``"PCGrad"``, ``"CAGrad"`` or ``"Nash-MTL"``.

    Returns:
      An optax transformation from the ``(2, 2)`` per-task gradients to the
      update direction that Adam receives.
    """
    if name == "MGDA":
        return optax.chain(famo_jax.mgda(), optax.scale(NUM_TASKS))
    if name == "PCGrad":
        return optax.chain(
            famo_jax.pcgrad(seed=0), optax.scale(NUM_TASKS), optax.clip_by_global_norm(1.0)
        )
    if name == "CAGrad":
        return optax.chain(
            famo_jax.cagrad(c=0.4, rescale=1),
            optax.scale(NUM_TASKS),
            optax.clip_by_global_norm(1.0),
        )
    if name == "Nash-MTL":
        return optax.chain(famo_jax.nash_mtl(num_tasks=NUM_TASKS), optax.scale(NUM_TASKS))
    raise ValueError(f"name must be a gradient aggregator of {METHODS}, got {name!r}.")


def run_method(
    name: str, starts: np.ndarray = problems.TOY_STARTS, num_steps: int = 50_000, **kwargs
) -> RunResult:
    """Runs one method from every start: one ``lax.scan``, ``vmap``-ed over starts.

    Args:
      name: one of :data:`METHODS`.
      starts: shape ``(num_starts, 2)`` starting points.
      num_steps: optimizer steps per start.
      **kwargs: passed to :func:`make_method`.

    Returns:
      A :class:`RunResult`.
    """
    method = make_method(name, **kwargs)

    def one_start(theta0):
        def body(carry, _):
            carry = method.step(carry)
            return carry, carry[0]

        _, thetas = jax.lax.scan(body, method.init(theta0), None, length=num_steps)
        thetas = jnp.concatenate([theta0[None], thetas])
        return thetas, problems.toy_losses(thetas), problems.toy_pareto_residual(thetas[-1])

    starts_array = jnp.asarray(starts, jnp.float32)
    t0 = time.perf_counter()
    compiled = jax.jit(jax.vmap(one_start)).lower(starts_array).compile()
    compile_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    outputs = jax.block_until_ready(compiled(starts_array))
    run_seconds = time.perf_counter() - t0
    thetas, losses, residual = (np.asarray(x) for x in outputs)
    return RunResult(
        method=name,
        starts=np.asarray(starts),
        thetas=thetas,
        losses=losses,
        residual=residual,
        front_distance=distance_to_pareto_set(thetas[:, -1]),
        run_seconds=run_seconds,
        compile_seconds=compile_seconds,
    )


def distance_to_pareto_set(thetas: np.ndarray) -> np.ndarray:
    """Euclidean distance from each point (shape ``(..., 2)``) to the Pareto set."""
    front, _ = problems.toy_pareto_front(1401)  # a polyline, theta_1 spacing 0.01
    start, segment = front[:-1], np.diff(front, axis=0)
    points = np.asarray(thetas, np.float64)[..., None, :]
    # Projection onto each segment, clipped to the segment.
    t = np.clip(np.sum((points - start) * segment, -1) / np.sum(segment**2, -1), 0.0, 1.0)
    gaps = points - (start + t[..., None] * segment)
    return np.sqrt(np.min(np.sum(gaps**2, axis=-1), axis=-1))


def format_table(results: Sequence[RunResult], threshold: float) -> str:
    """The per-method, per-start table and the per-method timing summary (Markdown)."""
    lines = [
        "| method | start | final L1 | final L2 | residual | distance to Pareto set "
        "| reached front |",
        "|---|---|---:|---:|---:|---:|:---:|",
    ]
    for result in results:
        for start, losses, residual, distance in zip(
            result.starts,
            result.losses[:, -1],
            result.residual,
            result.front_distance,
            strict=True,
        ):
            lines.append(
                f"| {result.method} | ({start[0]:g}, {start[1]:g}) | {losses[0]:.4f} | "
                f"{losses[1]:.4f} | {residual:.1e} | {distance:.3f} | "
                f"{'yes' if residual < threshold else 'no'} |"
            )
    num_steps = results[0].thetas.shape[1] - 1 if results else 0
    lines += [
        "",
        f"| method | reached front | run time, {len(results[0].starts) if results else 0} "
        f"starts x {num_steps} steps (s) | compile time (s) |",
        "|---|:---:|---:|---:|",
    ]
    for result in results:
        reached = int(np.sum(result.residual < threshold))
        lines.append(
            f"| {result.method} | {reached}/{len(result.residual)} | "
            f"{result.run_seconds:.2f} | {result.compile_seconds:.2f} |"
        )
    return "\n".join(lines)


def plot(
    results: Sequence[RunResult],
    out: Path,
    threshold: float = 1e-4,
    grid_size: int = 200,
) -> tuple[Path, Path]:
    """Saves the trajectory figure to ``out`` and the loss curves next to it.

    Args:
      results: one :class:`RunResult` per method.
      out: path of the trajectory figure; the curves go to ``<stem>_curves<suffix>``.
      threshold: residual below which a run counts as having reached the front.
      grid_size: resolution of the loss-landscape contours.

    Returns:
      The two paths written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    front_thetas, front_losses = problems.toy_pareto_front(200)
    axis = np.linspace(-10.0, 10.0, grid_size)
    grid = np.stack(np.meshgrid(axis, axis), axis=-1)
    average = np.asarray(jnp.mean(problems.toy_losses(jnp.asarray(grid, jnp.float32)), -1))
    colors = plt.get_cmap("tab10")(np.arange(len(problems.TOY_STARTS)))

    def subsample(array):
        # At most ~2000 points per trajectory, always keeping the last one.
        stride = max(1, array.shape[0] // 2000)
        return np.concatenate([array[::stride], array[-1:]])

    num_methods = len(results)
    fig, axes = plt.subplots(
        2, num_methods, figsize=(3.6 * num_methods, 7.4), squeeze=False, layout="constrained"
    )
    for column, result in enumerate(results):
        top, bottom = axes[0, column], axes[1, column]
        top.contourf(axis, axis, average, levels=30, cmap="Greys", alpha=0.55)
        top.contour(axis, axis, average, levels=15, colors="grey", linewidths=0.4)
        top.plot(*front_thetas.T, color="#72727A", linewidth=4)
        bottom.plot(*front_losses.T, color="#72727A", linewidth=5)
        for index, color in enumerate(colors[: len(result.starts)]):
            reached = result.residual[index] < threshold
            marker = "*" if reached else "X"
            path, loss_path = subsample(result.thetas[index]), subsample(result.losses[index])
            top.plot(*path.T, color=color, linewidth=1.6)
            top.scatter(*path[0], color="k", s=25, zorder=5)
            top.scatter(*path[-1], color=color, marker=marker, s=110, edgecolor="k", zorder=6)
            bottom.plot(*loss_path.T, color=color, linewidth=1.6)
            bottom.scatter(*loss_path[0], color="k", s=25, zorder=5)
            bottom.scatter(
                *loss_path[-1], color=color, marker=marker, s=110, edgecolor="k", zorder=6
            )
        reached = int(np.sum(result.residual < threshold))
        top.set_title(f"{result.method}: {reached}/{len(result.residual)} reach the front")
        top.set(xlim=(-10, 10), ylim=(-10, 10), xlabel=r"$\theta_1$", aspect="equal")
        bottom.set(xlabel=r"$L_1$ (scaled 0.1)")
        if column == 0:
            top.set_ylabel(r"$\theta_2$")
            bottom.set_ylabel(r"$L_2$")
    handles = [
        matplotlib.lines.Line2D([], [], color=color, linewidth=2, label=f"start ({x:g}, {y:g})")
        for color, (x, y) in zip(colors, results[0].starts, strict=False)
    ]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=10)
    fig.suptitle(
        "Toy problem of the FAMO paper (Fig. 1), Adam lr 1e-3. Top: trajectories in "
        "parameter space over the average loss, grey: the Pareto set.\nBottom: in loss "
        "space, grey: the Pareto front. Black dots: starts; stars: reached the front "
        f"(residual < {threshold:g}); X: stalled.",
        fontsize=11,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)

    curves_path = out.with_name(f"{out.stem}_curves{out.suffix}")
    fig, axes = plt.subplots(
        2,
        num_methods,
        figsize=(3.6 * num_methods, 6),
        squeeze=False,
        layout="constrained",
        sharey="row",
    )
    for column, result in enumerate(results):
        steps = np.arange(result.losses.shape[1])
        for row in range(2):
            ax = axes[row, column]
            for index, color in enumerate(colors[: len(result.starts)]):
                start = result.starts[index]
                ax.plot(
                    subsample(steps) + 1,
                    subsample(result.losses[index, :, row]),
                    color=color,
                    label=f"start ({start[0]:g}, {start[1]:g})",
                )
            ax.axhline(front_losses[:, row].min(), color="#72727A", linestyle="--", linewidth=1)
            ax.set_xscale("log")
            ax.set_xlabel("step + 1")
            if column == 0:
                ax.set_ylabel(["$L_1$ (scaled 0.1)", "$L_2$"][row])
            if row == 0:
                ax.set_title(result.method)
    axes[0, 0].legend(fontsize=7, loc="lower left")
    fig.suptitle("Task losses against steps (dashed: the smallest loss on the Pareto front)")
    fig.savefig(curves_path, dpi=110)
    plt.close(fig)
    return out, curves_path


FRONT_THRESHOLD = 1e-4


def main(argv: Sequence[str] | None = None) -> list[RunResult]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50_000, help="Adam steps per start")
    parser.add_argument("--quick", action="store_true", help="200 steps, coarse plots")
    parser.add_argument(
        "--out", type=Path, help="directory for the figures (default: none; docs/ has them)"
    )
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument(
        "--famo-gamma",
        type=float,
        default=0.0,
        help="FAMO's logits decay (the authors use 0 on the toy; the library default is 1e-3)",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=FRONT_THRESHOLD,
        help="Pareto-stationarity residual below which a run has reached the front",
    )
    args = parser.parse_args(argv)
    num_steps = 200 if args.quick else args.steps
    results = [
        run_method(name, problems.TOY_STARTS, num_steps, famo_gamma=args.famo_gamma)
        for name in args.methods
    ]
    print(
        f"Toy problem, {num_steps} Adam steps (lr 1e-3) from the authors' "
        f"{len(problems.TOY_STARTS)} starts; FAMO gamma {args.famo_gamma:g}; "
        f"reached front = residual < {args.threshold:g}\n"
    )
    if args.quick:
        print("(--quick: a smoke test of 200 steps, far from converged.)\n")
    print(format_table(results, args.threshold))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        paths = plot(
            results,
            args.out / "toy_pareto.png",
            args.threshold,
            grid_size=60 if args.quick else 300,
        )
        print("\nsaved", *paths)
    return results


if __name__ == "__main__":
    main()
