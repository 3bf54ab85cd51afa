"""Parity fixtures for STCH, GLS, IMTL-L (and IMTL), PBI and GO4Align, from the peers' code.

Runs the peers' own implementations, imported from the checkouts given on the
command line (none of their code is copied here), along loss sequences with
their state carried from step to step, and writes one ``.npz`` per method under
``tests/reference/fixtures/breadth_c/``. The tests in ``tests/weighting/``
replay them without torch.

Peers:

- ``--libmtl``: a checkout of https://github.com/median-research-group/LibMTL
  (its current sources; the PyPI ``libmtl`` is from 2021). Only
  ``LibMTL/weighting/{abstract_weighting,GLS,STCH,IMTL}.py`` are imported: the
  ``LibMTL`` and ``LibMTL.weighting`` packages are stubbed so that their
  ``__init__`` (the trainer, architectures, every other method) is not run.
- ``--go4align``: a checkout of https://github.com/autumn9999/GO4Align. Only
  ``methods/cluster_methods.py`` is imported (the ``methods`` package is
  stubbed; ``cvxpy``, used only by the SDP clustering variants, is stubbed when
  missing). Its ``kmeans`` is ``kmeans_pytorch.kmeans`` (the file's import of
  it is commented out): ``pip install --no-deps kmeans-pytorch==0.3``.
- ``--libmoon``: a checkout of https://github.com/xzhang2523/libmoon; only
  ``libmoon/util/scalarization.py`` (its ``pbi``) is loaded, by file path.

Protocol for the stateful methods, as the peers' trainers run them: at step t
the method is given the losses l_t (a leaf tensor requiring grad), its loss is
backpropagated, and its state is whatever the peer keeps; the value, the
gradient w.r.t. the losses (the effective weights) and the state after the step
are recorded. famo_jax replays this as ``weigh(l_t, state)`` then
``update(l_t, l_{t+1}, state)``.

Each file holds a JSON index ``cases`` (name -> hyperparameters) and, per case
``<name>``, arrays ``<name>/losses`` (float32 inputs, shared by both
precisions) and ``<name>/<output>_<dtype>`` for dtype in ``f32``/``f64``
(torch's default dtype during the run). Outputs:

- ``gls.npz``: ``value``, ``grad`` (per step).
- ``stch.npz``: ``value``, ``grad``, ``nadir`` (the reference's running
  ``average_loss / average_loss_count``, zeros before averaging; its
  ``nadir_vector`` once set). Epochs of ``iters_per_epoch`` steps.
- ``imtl.npz``: ``loss_scale`` (after each step's Adam step), ``task_grad``
  (the gradient w.r.t. the raw losses, i.e. ``exp(loss_scale)`` before the
  step), ``alpha`` (IMTL-G's weights, returned by LibMTL's ``backward``),
  ``shared_grad`` (the shared parameters' gradient) and the fixed task
  Jacobian ``<name>/jacobian`` (k, m) with which the losses depend on the
  shared parameters.
- ``pbi.npz``: stateless: ``<name>/losses`` and ``<name>/preference`` (n, k),
  ``value`` and ``grad`` (n, k).
- ``go4align.npz``: float32 only (``kmeans_pytorch`` computes in float32):
  ``value``, ``grad``, ``weights`` (the ``weights`` the method returns),
  ``adv_probs`` (after the step), ``indicators`` (the values given to k-means)
  and ``initial_centers`` (its starting point; both NaN with one group, which
  takes the mean without k-means). ``init = "spread"`` cases start k-means
  from famo_jax's deterministic centres (the sorted indicators at evenly
  spaced ranks; the only change made to the peer's run), ``init = "random"``
  from ``kmeans_pytorch``'s own random draw (NumPy seeded), recorded. A run in
  which the peer's k-means would leave a group empty is left out (and listed
  when the script runs): ``kmeans_pytorch`` 0.3 then loops forever (see
  ``empties_a_group``), so the authors' method hangs there.

Usage (torch is needed only here)::

    pip install torch==2.13.0 && pip install --no-deps kmeans-pytorch==0.3
    python tests/reference/make_breadth_c_fixtures.py \\
        --libmtl PATH/LibMTL --go4align PATH/GO4Align --libmoon PATH/libmoon
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import json
import pathlib
import sys
import types

import numpy as np
import torch

HERE = pathlib.Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "fixtures" / "breadth_c"
TASK_COUNTS = (2, 3, 5, 10, 40)
STEPS = 40
DTYPES = {"f32": torch.float32, "f64": torch.float64}


# ---------------------------------------------------------------------------
# Inputs.


def loss_sequences(rng: np.random.Generator, k: int, steps: int, *, ties: bool = True):
    """``{kind: (steps + 1, k) float32}``: random, badly scaled, trending and degenerate losses."""
    t = np.arange(steps + 1)[:, None]
    scales = 10.0 ** rng.uniform(-3, 3, k)
    rates = rng.uniform(0.0, 0.08, k)
    noise = np.exp(0.2 * rng.standard_normal((steps + 1, k)))
    spikes = np.where(rng.random((steps + 1, k)) < 0.05, rng.uniform(2, 20, (steps + 1, k)), 1.0)
    sequences = {
        "random": np.exp(rng.standard_normal((steps + 1, k))),
        "scaled": scales * np.exp(-rates * t) * noise,
        "spikes": scales * np.exp(-rates * t) * noise * spikes,
        # One task far larger than the others, and one that barely moves.
        "dominant": np.concatenate([1e4 * noise[:, :1], np.exp(-0.05 * t) * noise[:, 1:]], axis=1),
    }
    if ties:  # equal losses (GO4Align's peer k-means cannot take tied indicators)
        sequences["equal"] = np.repeat(np.exp(-0.03 * t) * noise[:, :1], k, axis=1)
    return {kind: value.astype(np.float32) for kind, value in sequences.items()}


# ---------------------------------------------------------------------------
# Importing the peers.


def stub_package(name: str, path: pathlib.Path) -> None:
    """A package whose ``__init__`` is not run: its submodules import from ``path``."""
    module = types.ModuleType(name)
    module.__path__ = [str(path)]
    sys.modules[name] = module


def import_libmtl(root: pathlib.Path):
    root = root.resolve()
    stub_package("LibMTL", root / "LibMTL")
    stub_package("LibMTL.weighting", root / "LibMTL" / "weighting")
    return {
        name: getattr(importlib.import_module(f"LibMTL.weighting.{name}"), name)
        for name in ("GLS", "STCH", "IMTL")
    }


def import_go4align(root: pathlib.Path):
    import kmeans_pytorch

    root = root.resolve()
    stub_package("methods", root / "methods")
    try:
        import cvxpy  # noqa: F401
    except ImportError:  # used only by the SDP variants, never run here
        sys.modules["cvxpy"] = types.ModuleType("cvxpy")
    cluster_methods = importlib.import_module("methods.cluster_methods")
    # The authors' file has `# from kmeans_pytorch import kmeans`: restore it.
    cluster_methods.kmeans = kmeans_pytorch.kmeans
    return cluster_methods, kmeans_pytorch


def import_libmoon(root: pathlib.Path):
    path = root.resolve() / "libmoon" / "util" / "scalarization.py"
    spec = importlib.util.spec_from_file_location("libmoon_scalarization", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def recorded_backward():
    """Records the tensor of every ``.backward()`` call (the peer's loss value)."""
    values = []
    original = torch.Tensor.backward

    def backward(self, *args, **kwargs):
        values.append(self.detach().clone())
        return original(self, *args, **kwargs)

    torch.Tensor.backward = backward
    try:
        yield values
    finally:
        torch.Tensor.backward = original


@contextlib.contextmanager
def quiet():
    """The peers print (STCH's nadir, kmeans_pytorch's progress bar)."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


@contextlib.contextmanager
def default_dtype(dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def leaf(values: np.ndarray, dtype) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, requires_grad=True)


# ---------------------------------------------------------------------------
# The methods.


def run_gls(GLS, losses: np.ndarray, dtype):
    method = GLS()
    method.task_num, method.device = losses.shape[1], torch.device("cpu")
    values, grads = [], []
    for step in losses[:-1]:
        inputs = leaf(step, dtype)
        with recorded_backward() as recorded:
            method.backward(inputs)
        values.append(recorded[-1].item())
        grads.append(inputs.grad.numpy().copy())
    return {"value": np.array(values), "grad": np.array(grads)}


def run_stch(STCH, losses: np.ndarray, dtype, *, mu, warmup_epoch, iters_per_epoch):
    method = STCH()
    method.task_num, method.device = losses.shape[1], torch.device("cpu")
    method.init_param()
    values, grads, nadirs = [], [], []
    for t, step in enumerate(losses[:-1]):
        method.epoch = t // iters_per_epoch
        inputs = leaf(step, dtype)
        with recorded_backward() as recorded, quiet():
            method.backward(inputs, STCH_mu=mu, STCH_warmup_epoch=warmup_epoch)
        values.append(recorded[-1].item())
        grads.append(inputs.grad.numpy().copy())
        if method.nadir_vector is not None:
            nadirs.append(method.nadir_vector.numpy().copy())
        elif method.average_loss_count:
            nadirs.append((method.average_loss / method.average_loss_count).numpy().copy())
        else:
            nadirs.append(np.zeros(losses.shape[1]))
    return {"value": np.array(values), "grad": np.array(grads), "nadir": np.array(nadirs)}


def run_imtl(IMTL, losses: np.ndarray, jacobian: np.ndarray, dtype, *, lr, weight_decay):
    """LibMTL's IMTL with shared parameters ``theta`` on which loss i has gradient
    ``losses[t, i] * jacobian[i]`` (the loss values are the given sequence)."""
    k, m = jacobian.shape
    theta = torch.nn.Parameter(torch.zeros(m, dtype=dtype))
    directions = torch.tensor(jacobian, dtype=dtype)

    class Model(IMTL):
        def get_share_params(self):
            return [theta]

        def zero_grad_share_params(self):
            theta.grad = None if theta.grad is None else theta.grad.zero_()

    method = Model()
    method.task_num, method.device, method.rep_grad = k, torch.device("cpu"), False
    method.init_param()
    optimizer = torch.optim.Adam([method.loss_scale], lr=lr, weight_decay=weight_decay)
    out = {"loss_scale": [], "task_grad": [], "alpha": [], "shared_grad": []}
    for step in losses[:-1]:
        optimizer.zero_grad(set_to_none=False)
        theta.grad = None
        inputs = leaf(step, dtype)
        moved = inputs * (1.0 + directions @ (theta - theta.detach()))
        alpha = method.backward(moved)
        out["alpha"].append(np.asarray(alpha, np.float64))
        out["task_grad"].append(inputs.grad.numpy().copy())
        out["shared_grad"].append(theta.grad.detach().numpy().copy())
        optimizer.step()
        out["loss_scale"].append(method.loss_scale.detach().numpy().copy())
    return {name: np.array(value) for name, value in out.items()}


def run_pbi(scalarization, losses: np.ndarray, preference: np.ndarray, dtype, *, coeff):
    values, grads = [], []
    for f, w in zip(losses, preference, strict=True):
        inputs = leaf(f[None], dtype)
        value = scalarization.pbi(inputs, torch.tensor(w[None], dtype=dtype), coeff=coeff)
        value.sum().backward()
        values.append(value.item())
        grads.append(inputs.grad.numpy()[0].copy())
    return {"value": np.array(values), "grad": np.array(grads)}


def spread_initialize(X, num_clusters):
    """famo_jax's deterministic start: the sorted values at evenly spaced ranks."""
    k = len(X)
    if num_clusters == 1:
        ranks = np.zeros(1, np.int64)
    else:
        ranks = np.round(np.arange(num_clusters) * (k - 1) / (num_clusters - 1)).astype(np.int64)
    order = torch.argsort(X[:, 0], stable=True)
    return X[order[torch.from_numpy(ranks)]].clone()


class EmptyGroup(RuntimeError):
    """The peer's k-means would leave a group empty, and then loop forever."""


def empties_a_group(values: np.ndarray, centers: np.ndarray, max_iterations: int = 1000) -> bool:
    """Whether Lloyd's iteration as ``kmeans_pytorch`` 0.3 runs it empties a group.

    kmeans_pytorch 0.3 (PyPI's latest) gives an empty group the mean of no
    points, NaN; its stopping test ``center_shift ** 2 < tol`` is then never
    true and ``kmeans`` never returns. This happens on the real line too (a
    centre's points can all move to its neighbours), and with tied indicators
    drawn as two initial centres. The iteration is mirrored in float32 with
    the same tie-breaking (the first nearest centre) and stopping rule.
    """
    values = values.astype(np.float32)
    centers = centers.astype(np.float32).copy()
    for _ in range(max_iterations):
        groups = np.argmin((values[:, None] - centers[None, :]) ** 2, axis=1)
        previous = centers.copy()
        for j in range(len(centers)):
            members = values[groups == j]
            if members.size == 0:
                return True
            centers[j] = members.mean(dtype=np.float32)
        if np.sum(np.abs(centers - previous)) ** 2 < 1e-4:
            return False
    raise RuntimeError("the mirrored k-means did not stop")


def run_go4align(cluster_methods, kmeans_pytorch, losses, *, num_groups, step_size, init, seed):
    k = losses.shape[1]
    method = cluster_methods.GO4ALIGN(
        n_tasks=k, device=torch.device("cpu"), num_groups=num_groups, robust_step_size=step_size
    )
    starts, indicators = [], []
    original_initialize, original_kmeans = kmeans_pytorch.initialize, cluster_methods.kmeans

    def checked_kmeans(X, num_clusters, **kwargs):
        # The start is drawn here (famo_jax's, or kmeans_pytorch's own random
        # one), checked for an empty group, and handed to the peer's kmeans.
        values = X[:, 0].detach().numpy().copy()
        if init == "spread":
            start = spread_initialize(X.float(), num_clusters)
        else:
            start = original_initialize(X.float(), num_clusters)
        if empties_a_group(values, start[:, 0].numpy()):
            raise EmptyGroup(values)
        starts.append(start[:, 0].numpy().copy())
        indicators.append(values)
        kmeans_pytorch.initialize = lambda X, num_clusters: start.clone()
        try:
            return original_kmeans(X=X, num_clusters=num_clusters, **kwargs)
        finally:
            kmeans_pytorch.initialize = original_initialize

    np.random.seed(seed)
    out = {name: [] for name in ("value", "grad", "weights", "adv_probs", "indicators")}
    out["initial_centers"] = []
    cluster_methods.kmeans = checked_kmeans
    try:
        for step in losses[:-1]:
            inputs = leaf(step, torch.float32)
            with quiet():
                loss, extra = method.get_weighted_loss(inputs)
            loss.backward()
            weights = extra["weights"].detach().numpy()
            if not np.all(np.isfinite(weights)):
                raise RuntimeError("the peer's k-means left a group empty (NaN centre)")
            out["value"].append(loss.item())
            out["grad"].append(inputs.grad.numpy().copy())
            out["weights"].append(weights.copy())
            out["adv_probs"].append(method.adv_probs.numpy().copy())
            clustered = num_groups >= 2  # one group is the mean, without k-means
            out["initial_centers"].append(starts[-1] if clustered else np.full(1, np.nan))
            out["indicators"].append(indicators[-1] if clustered else np.full(k, np.nan))
    finally:
        cluster_methods.kmeans = original_kmeans
    return {name: np.array(value) for name, value in out.items()}


# ---------------------------------------------------------------------------
# Writing.


class Fixture:
    def __init__(self):
        self.cases, self.arrays = {}, {}

    def add(self, name, params, inputs, outputs_by_dtype):
        assert name not in self.cases, name
        self.cases[name] = params
        for key, value in inputs.items():
            self.arrays[f"{name}/{key}"] = value
        for dtype, outputs in outputs_by_dtype.items():
            for key, value in outputs.items():
                self.arrays[f"{name}/{key}_{dtype}"] = value

    def save(self, path: pathlib.Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, cases=np.array(json.dumps(self.cases)), **self.arrays)
        print(f"{path}: {len(self.cases)} cases, {path.stat().st_size / 1024:.0f} KiB")


def both_dtypes(run):
    out = {}
    for name, dtype in DTYPES.items():
        with default_dtype(dtype):
            out[name] = run(dtype)
    return out


def make_gls(GLS, rng):
    fixture = Fixture()
    for k in TASK_COUNTS:
        for kind, losses in loss_sequences(rng, k, STEPS).items():
            fixture.add(
                f"k{k:03d}_{kind}",
                {"k": k},
                {"losses": losses},
                both_dtypes(lambda dtype, losses=losses: run_gls(GLS, losses, dtype)),
            )
    return fixture


def make_stch(STCH, rng):
    fixture = Fixture()
    settings = [  # (mu, warmup_epoch, iters_per_epoch)
        (1.0, 2, 4),  # LibMTL's default mu
        (0.1, 0, 3),
        (5.0, 1, 5),
    ]
    for k in TASK_COUNTS:
        for kind, losses in loss_sequences(rng, k, STEPS).items():
            for mu, warmup_epoch, iters in settings:
                params = {"k": k, "mu": mu, "warmup_epoch": warmup_epoch, "iters_per_epoch": iters}
                fixture.add(
                    f"k{k:03d}_{kind}_mu{mu}_w{warmup_epoch}_i{iters}",
                    params,
                    {"losses": losses},
                    both_dtypes(
                        lambda dtype, losses=losses, p=params: run_stch(
                            STCH,
                            losses,
                            dtype,
                            mu=p["mu"],
                            warmup_epoch=p["warmup_epoch"],
                            iters_per_epoch=p["iters_per_epoch"],
                        )
                    ),
                )
    return fixture


def make_imtl(IMTL, rng):
    fixture = Fixture()
    settings = [(1e-4, 1e-5), (1e-2, 0.0), (0.1, 1e-3)]  # (lr, weight_decay): LibMTL's first
    for k in TASK_COUNTS[:-1] + (12,):  # IMTL-G inverts a (k-1) x (k-1) matrix
        jacobian = rng.standard_normal((k, k + 3)) * 10.0 ** rng.uniform(-1, 1, (k, 1))
        for kind, losses in loss_sequences(rng, k, STEPS).items():
            for lr, weight_decay in settings:
                params = {"k": k, "lr": lr, "weight_decay": weight_decay}
                fixture.add(
                    f"k{k:03d}_{kind}_lr{lr}_wd{weight_decay}",
                    params,
                    {"losses": losses, "jacobian": jacobian},
                    both_dtypes(
                        lambda dtype, losses=losses, jacobian=jacobian, p=params: run_imtl(
                            IMTL,
                            losses,
                            jacobian,
                            dtype,
                            lr=p["lr"],
                            weight_decay=p["weight_decay"],
                        )
                    ),
                )
    return fixture


def make_pbi(scalarization, rng):
    fixture = Fixture()
    n = 60
    for k in TASK_COUNTS:
        uniform = np.ones((n, k))
        dirichlet = rng.dirichlet(np.ones(k), n)
        base = np.exp(rng.standard_normal((n, k)))
        inputs = {
            "random": base,
            "scaled": base * 10.0 ** rng.uniform(-3, 3, (n, k)),
            "signed": rng.standard_normal((n, k)) * 3.0,  # negative losses (log-likelihoods)
            # Near the uniform ray (1e-3 relative): the penalty's gradient turns fast.
            "near_ray": np.exp(rng.standard_normal((n, 1)))
            * (1 + 1e-3 * rng.standard_normal((n, k))),
        }
        for kind, losses in inputs.items():
            for pref_name, preference in (("uniform", uniform), ("dirichlet", dirichlet)):
                for coeff in (1.0, 5.0):
                    losses32 = losses.astype(np.float32)
                    pref32 = preference.astype(np.float32)
                    fixture.add(
                        f"k{k:03d}_{kind}_{pref_name}_theta{coeff}",
                        {"k": k, "theta": coeff},
                        {"losses": losses32, "preference": pref32},
                        both_dtypes(
                            lambda dtype, f=losses32, w=pref32, c=coeff: run_pbi(
                                scalarization, f, w, dtype, coeff=c
                            )
                        ),
                    )
    return fixture


def make_go4align(cluster_methods, kmeans_pytorch, rng):
    fixture, hung = Fixture(), []
    for k in TASK_COUNTS:
        # One group (the mean, no k-means) at small k; 2, 3 and k groups everywhere.
        # Each (k, groups, step) is one compiled replay in the tests: the larger
        # step only at k = 3 and 10.
        groups = sorted({min(2, k), min(3, k), k} | ({1} if k <= 3 else set()))
        for kind, losses in loss_sequences(rng, k, STEPS, ties=False).items():
            # The authors' step, and a larger one where the probabilities stay well
            # above zero (zero probabilities tie the indicators, which the peer's
            # k-means cannot take): exp(-step * cumulative loss gap) > exp(-80).
            gaps = np.ptp(losses[:-1].astype(np.float64).cumsum(axis=0), axis=1).max()
            larger = k in (3, 10) and 1e-2 * gaps < 80
            step_sizes = [1e-4] + ([1e-2] if larger else [])
            for num_groups in groups:
                for step_size in step_sizes:
                    for init in ("spread", "random") if num_groups >= 2 else ("spread",):
                        seed = int(rng.integers(2**31))
                        params = {
                            "k": k,
                            "num_groups": num_groups,
                            "robust_step_size": step_size,
                            "init": init,
                            "seed": seed,
                        }
                        try:
                            outputs = run_go4align(
                                cluster_methods,
                                kmeans_pytorch,
                                losses,
                                num_groups=num_groups,
                                step_size=step_size,
                                init=init,
                                seed=seed,
                            )
                        except EmptyGroup:
                            hung.append(f"k{k:03d}_{kind}_g{num_groups}_eta{step_size}_{init}")
                            continue
                        fixture.add(
                            f"k{k:03d}_{kind}_g{num_groups}_eta{step_size}_{init}",
                            params,
                            {"losses": losses},
                            {"f32": outputs},
                        )
    print(f"go4align: {len(hung)} runs left out, where the peer's k-means would hang: {hung}")
    return fixture


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--libmtl", type=pathlib.Path, required=True)
    parser.add_argument("--go4align", type=pathlib.Path, required=True)
    parser.add_argument("--libmoon", type=pathlib.Path, required=True)
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    libmtl = import_libmtl(args.libmtl)
    cluster_methods, kmeans_pytorch = import_go4align(args.go4align)
    scalarization = import_libmoon(args.libmoon)
    # One stream per method, so that changing one method's inputs leaves the others'.
    makers = {
        "gls": lambda rng: make_gls(libmtl["GLS"], rng),
        "stch": lambda rng: make_stch(libmtl["STCH"], rng),
        "imtl": lambda rng: make_imtl(libmtl["IMTL"], rng),
        "pbi": lambda rng: make_pbi(scalarization, rng),
        "go4align": lambda rng: make_go4align(cluster_methods, kmeans_pytorch, rng),
    }
    for index, (name, make) in enumerate(makers.items()):
        make(np.random.default_rng(1400 + index)).save(args.out / f"{name}.npz")
    print(f"torch {torch.__version__}, numpy {np.__version__}")


if __name__ == "__main__":
    main()
