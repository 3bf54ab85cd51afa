"""Generates the Nash-MTL parity fixtures by running the authors' ``NashMTL`` itself.

The authors' code is not part of this repository. Fetch the FAMO authors'
repository (``Cranial-XIX/FAMO``, whose ``methods/weight_methods.py`` holds the
``NashMTL`` class the FAMO paper ran) and, optionally, Navon et al.'s own
``AvivNavon/nash-mtl``, then run from this repository's root, with torch, cvxpy
and ECOS installed (none of them is a test dependency)::

    pip install torch==2.13.0 cvxpy ecos
    python tests/reference/make_nash_mtl_fixtures.py PATH/TO/FAMO [--nash-mtl-repo PATH/TO/nash-mtl]

It writes ``tests/reference/fixtures/nash_mtl.npz``. For every trajectory
``{case}`` in :data:`CASES` (k = 2..20 tasks, a few steps each, one ``NashMTL``
instance carrying its state from step to step), the file holds

* ``{case}_grads``: ``(T, k, m)`` float32, the task gradients of every step
  (the authors' class receives the losses ``l_i = <g_i, theta>`` of a shared
  parameter ``theta``, so ``torch.autograd`` gives it exactly these ``g_i``);
* ``{case}_every``: ``()`` int, the class's ``update_weights_every``;

and, for ``{solver}`` = ``ecos`` (the authors' solver) and ``clarabel`` (the
same code with cvxpy's CLARABEL in place of ECOS, to tell which outputs depend
on the conic solver):

* ``{case}_{solver}_alpha``: ``(T, k)`` float64, the weights the class returns
  (its ``extra_outputs["weights"]``), in the authors' raw units;
* ``{case}_{solver}_direction``: ``(T, m)`` float32, the gradient w.r.t.
  ``theta`` of the authors' weighted loss ``sum_i alpha_i l_i`` (their sum
  convention, before their trainer's clipping);
* ``{case}_{solver}_solves``: ``(T,)`` int, conic solves in that step (0 when the
  weights were reused, at most ``optim_niter = 20``);
* ``{case}_{solver}_status``: ``(T,)`` int, the last solve's outcome, an index
  into :data:`STATUSES` (``-1`` when the weights were reused);
* ``{case}_{solver}_label``: ``(T,)`` int, an index into :data:`LABELS`, from the
  returned weights alone: ``solved`` when they satisfy the bargaining equation
  in raw units, ``max_i |alpha_i (G G^T alpha)_i - 1| <= 1e-5`` (float64 Gram
  of the stored gradients); ``kept`` when they are exactly the previous
  weights although the class tried to solve (an infeasible or unbounded
  subproblem, a solver error); ``stalled`` when they are new but do not
  satisfy the equation (the authors' sequence of convex problems stopped
  elsewhere); ``reused`` between weight updates (``update_weights_every > 1``).

``update_weights_every > 1``: the FAMO repository's class raises
``UnboundLocalError`` at every step that reuses the weights (it reads its
``GTG`` local, set only in the branch that solves, after its ``prvs_alpha``
was already chosen and its step counter advanced). Navon et al.'s own class
has no such line and returns ``prvs_alpha``. This script therefore catches
that error and records ``prvs_alpha`` (the class's state after the failed call
is the same as after a successful one); with ``--nash-mtl-repo`` it also runs
Navon et al.'s class on every trajectory and checks that its weights are
identical at every step.

Why two solvers: the authors' ``NashMTL`` approximates the bargaining solution
with up to 20 linearised convex problems. Where those converge (98 of the 180
steps), ECOS and CLARABEL agree to 4e-7 and the weights solve the bargaining
equation. Where they stall (47 steps, among them every step whose task gradient
norms spread over a decade or more) the returned weights differ between the two
solvers by 2e-5 to 1e19 relative (median 2.6): they are an artefact of the
approximation, not a function of the gradients. The committed file records
both, so the parity test can say which steps are well defined.

The inputs are stored rather than regenerated at test time (NumPy does not
promise stable random streams across versions).
"""

from __future__ import annotations

import argparse
import importlib
import pathlib
import sys
import warnings

import cvxpy as cp
import numpy as np
import torch

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
SEED = 20260118
NUM_STEPS = 6
STATUSES = ("optimal", "optimal_inaccurate", "infeasible", "unbounded", "error", "other")
LABELS = ("solved", "kept", "stalled", "reused")
SOLVED_RESIDUAL = 1e-5
SOLVERS = {"ecos": cp.ECOS, "clarabel": cp.CLARABEL}


# ---------------------------------------------------------------------------
# Inputs.


def _drift(rng, first, num_steps, noise=0.3):
    """``num_steps`` gradient matrices: a random walk from ``first``, row scales kept."""
    scales = np.linalg.norm(first, axis=1, keepdims=True)
    out = [first]
    for _ in range(num_steps - 1):
        step = rng.standard_normal(first.shape) * scales / np.sqrt(first.shape[1])
        out.append(out[-1] + noise * step)
    return np.stack(out)


def _common_direction(rng, k, m, common, spread=1.0):
    """Gradients ``common * e_0 + n_i`` with ``n_i`` orthogonal to ``e_0``.

    Every gradient has the component ``common`` along ``e_0``, so some direction
    improves every task (the bargaining solution exists), while the large
    random ``n_i`` make many pairs conflict (negative inner products).
    """
    grads = spread * rng.standard_normal((k, m)) / np.sqrt(m)
    grads[:, 0] = common
    return grads


def random_case(rng, k, m):
    return _drift(rng, rng.standard_normal((k, m)), NUM_STEPS)


def conflicting_case(rng, k, m):
    steps = [_common_direction(rng, k, m, 0.15)]
    for _ in range(NUM_STEPS - 1):
        nxt = steps[-1] + 0.2 * _common_direction(rng, k, m, 0.0)
        steps.append(nxt)
    return np.stack(steps)


def scaled_case(rng, k, m, decades):
    scales = 10.0 ** rng.permutation(np.linspace(-decades, decades, k))
    return _drift(rng, rng.standard_normal((k, m)) * scales[:, None], NUM_STEPS)


def magnitude_case(rng, k, m, exponents):
    """The same drifting gradients multiplied by ``10 ** exponents[t]`` at step t."""
    base = _drift(rng, _common_direction(rng, k, m, 0.5), len(exponents), noise=0.1)
    return base * (10.0 ** np.asarray(exponents, float))[:, None, None]


def degenerate_cases(rng):
    cases = {}
    # Rank 3 with k = 6 > m = 3: every gradient in the half-space x_0 > 0.
    grads = rng.standard_normal((NUM_STEPS, 6, 3))
    grads[..., 0] = np.abs(grads[..., 0]) + 0.5
    cases["rank3_k6"] = grads
    # Two tasks with identical gradients.
    grads = _drift(rng, _common_direction(rng, 4, 7, 0.4), NUM_STEPS)
    grads[:, 1] = grads[:, 0]
    cases["duplicate_k4"] = grads
    # All gradients equal (alpha_i = 1 / (sqrt(k) |g|)).
    grads = np.repeat(_drift(rng, rng.standard_normal((1, 5)), NUM_STEPS), 5, axis=1)
    cases["all_equal_k5"] = grads
    # A zero task gradient at step 2, exactly opposite gradients at step 4: no
    # direction improves every task, so there is no solution at those steps.
    grads = _drift(rng, _common_direction(rng, 3, 6, 0.5), NUM_STEPS, noise=0.1)
    grads[2, 1] = 0.0
    grads[4, 2] = -grads[4, 0]
    cases["no_solution_k3"] = grads
    grads = _drift(rng, _common_direction(rng, 2, 4, 0.5), NUM_STEPS, noise=0.1)
    grads[3, 1] = -grads[3, 0]
    cases["opposite_k2"] = grads
    # A nearly-zero task gradient (1e-6 of the others).
    grads = _drift(rng, _common_direction(rng, 4, 6, 0.5), NUM_STEPS, noise=0.1)
    grads[:, 3] *= 1e-6
    cases["near_zero_k4"] = grads
    return cases


def make_cases(rng) -> dict[str, tuple[np.ndarray, int]]:
    """``{case: (grads (T, k, m) float32, update_weights_every)}``."""
    cases = {}
    for k in (2, 3, 4, 6, 9, 13, 20):
        cases[f"random_k{k}"] = (random_case(rng, k, 2 * k + 3), 1)
    for k in (2, 4, 7, 12, 20):
        cases[f"conflicting_k{k}"] = (conflicting_case(rng, k, 2 * k + 5), 1)
    for k, decades in ((2, 2.0), (3, 1.0), (5, 2.0), (8, 3.0), (11, 1.5), (16, 3.0)):
        cases[f"scaled_k{k}_1e{decades:g}"] = (scaled_case(rng, k, 2 * k + 3, decades), 1)
    cases["magnitude_k3"] = (magnitude_case(rng, 3, 8, [0, -4, 4, -2, 2, 0]), 1)
    cases["tiny_k5"] = (magnitude_case(rng, 5, 9, [-5] * NUM_STEPS), 1)
    cases["huge_k5"] = (magnitude_case(rng, 5, 9, [5] * NUM_STEPS), 1)
    for name, grads in degenerate_cases(rng).items():
        cases[name] = (grads, 1)
    # Weights recomputed every 3 (or 2) steps and reused in between.
    cases["every3_k5"] = (_drift(rng, _common_direction(rng, 5, 9, 0.4), 8), 3)
    cases["every2_k3"] = (_drift(rng, _common_direction(rng, 3, 6, 0.4), 5), 2)
    cases["every3_scaled_k4"] = (scaled_case(rng, 4, 9, 1.0)[:5], 3)
    return {name: (grads.astype(np.float32), every) for name, (grads, every) in cases.items()}


# ---------------------------------------------------------------------------
# Running the authors' class.


def load_nash_mtl(repo: pathlib.Path):
    """The ``NashMTL`` class of the repository at ``repo`` (its ``methods`` package)."""
    if not (repo / "methods" / "weight_methods.py").is_file():
        raise SystemExit(f"{repo} has no methods/weight_methods.py")
    for name in [n for n in sys.modules if n == "methods" or n.startswith("methods.")]:
        del sys.modules[name]
    sys.path.insert(0, str(repo))
    try:
        return importlib.import_module("methods.weight_methods").NashMTL
    finally:
        sys.path.remove(str(repo))


class SolveRecorder:
    """Wraps ``cvxpy.Problem.solve`` to count solves, keep their status, and pick the solver.

    The authors call ``prob.solve(solver=cp.ECOS, warm_start=True, max_iters=100)``.
    For ``solver = "clarabel"`` that call is redirected to CLARABEL (without
    ECOS's ``max_iters``); nothing else in their code changes.
    """

    def __init__(self, solver: str):
        self.solver = solver
        self.statuses: list[int] = []

    def __enter__(self):
        self._original = cp.Problem.solve
        recorder = self

        def solve(problem, *args, **kwargs):
            if recorder.solver != "ecos":
                kwargs["solver"] = SOLVERS[recorder.solver]
                kwargs.pop("max_iters", None)
            try:
                result = recorder._original(problem, *args, **kwargs)
            except Exception:
                recorder.statuses.append(STATUSES.index("error"))
                raise
            status = problem.status
            recorder.statuses.append(
                STATUSES.index(status) if status in STATUSES else STATUSES.index("other")
            )
            return result

        cp.Problem.solve = solve
        return self

    def __exit__(self, *exc):
        cp.Problem.solve = self._original


def nash_residual(grads: np.ndarray, alpha: np.ndarray) -> float:
    gram = grads.astype(np.float64) @ grads.astype(np.float64).T
    return float(np.max(np.abs(alpha * (gram @ alpha) - 1.0)))


def run_authors(nash_mtl_class, grads: np.ndarray, every: int, solver: str):
    """Runs one ``NashMTL`` instance along ``grads`` and returns the per-step records."""
    num_steps, k, m = grads.shape
    method = nash_mtl_class(n_tasks=k, device=torch.device("cpu"), update_weights_every=every)
    theta = torch.zeros(m, requires_grad=True)
    records = {name: [] for name in ("alpha", "direction", "solves", "status", "label")}
    previous = np.ones(k)
    with SolveRecorder(solver) as recorder:
        for step in range(num_steps):
            losses = torch.from_numpy(grads[step]) @ theta
            solves_before = len(recorder.statuses)
            reuses = step % every != 0
            try:
                _, extra = method.get_weighted_loss(losses, shared_parameters=[theta])
                alpha = np.asarray(extra["weights"], np.float64)
            except UnboundLocalError:
                # FAMO repository's class at a step that reuses the weights (see
                # the module docstring): Navon et al.'s class returns prvs_alpha.
                if not reuses:
                    raise
                alpha = np.asarray(method.prvs_alpha, np.float64)
            weighted = sum(losses[i] * float(alpha[i]) for i in range(k))
            (direction,) = torch.autograd.grad(weighted, theta)
            solves = len(recorder.statuses) - solves_before
            assert (solves == 0) == reuses, (step, solves)
            if reuses:
                label = "reused"
            elif np.array_equal(alpha, previous):
                label = "kept"
            elif nash_residual(grads[step], alpha) <= SOLVED_RESIDUAL:
                label = "solved"
            else:
                label = "stalled"
            records["alpha"].append(alpha)
            records["direction"].append(direction.numpy().astype(np.float32))
            records["solves"].append(solves)
            records["status"].append(recorder.statuses[-1] if solves else -1)
            records["label"].append(LABELS.index(label))
            previous = alpha
    return {name: np.asarray(values) for name, values in records.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("famo_repo", type=pathlib.Path, help="the FAMO authors' repository")
    parser.add_argument(
        "--nash-mtl-repo",
        type=pathlib.Path,
        help="Navon et al.'s repository: check that its NashMTL gives the same weights",
    )
    parser.add_argument(
        "--out", type=pathlib.Path, default=FIXTURES / "nash_mtl.npz", help="output file"
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore", module="cvxpy")  # DPP and inaccuracy notices
    torch.use_deterministic_algorithms(True)
    famo_class = load_nash_mtl(args.famo_repo.resolve())
    navon_class = load_nash_mtl(args.nash_mtl_repo.resolve()) if args.nash_mtl_repo else None
    cases = make_cases(np.random.default_rng(SEED))
    arrays = {
        "cases": np.asarray(list(cases)),
        "statuses": np.asarray(STATUSES),
        "labels": np.asarray(LABELS),
        "solved_residual": np.asarray(SOLVED_RESIDUAL),
    }
    for name, (grads, every) in cases.items():
        arrays[f"{name}_grads"] = grads
        arrays[f"{name}_every"] = np.asarray(every)
        summary = []
        for solver in SOLVERS:
            records = run_authors(famo_class, grads, every, solver)
            for field, value in records.items():
                arrays[f"{name}_{solver}_{field}"] = value
            summary.append(f"{solver}: " + " ".join(LABELS[i][:2] for i in records["label"]))
        if navon_class is not None:
            navon = run_authors(navon_class, grads, every, "ecos")
            assert np.array_equal(navon["alpha"], arrays[f"{name}_ecos_alpha"]), name
            summary.append("nash-mtl's class: identical")
        print(f"{name:24s} " + " | ".join(summary), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    print(f"{args.out}: {args.out.stat().st_size / 1e3:.1f} kB")


if __name__ == "__main__":
    main()
