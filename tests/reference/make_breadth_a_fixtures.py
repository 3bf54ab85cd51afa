"""Parity fixtures of UPGrad, DualProj, Aligned-MTL, ConFIG, Krum, TrimmedMean, FairGrad, CR-MOGM.

Runs the peers' own implementations on stored task-gradient matrices and writes
``tests/reference/fixtures/breadth_a/<method>.npz``, which the tests in
``tests/aggregation/test_<method>.py`` replay without torch. Peers:

* TorchJD 0.18 (``pip install torch==2.13.0 torchjd==0.18.0 qpsolvers quadprog``,
  imported from the environment): every method;
* LibMTL's current sources (``--libmtl``, a checkout of
  github.com/median-research-group/LibMTL): ``UPGrad``, ``Aligned_MTL``,
  ``FairGrad`` (their ``backward`` with the task gradients injected);
* the authors' code: FairGrad (``--fairgrad``, github.com/OptMN-Lab/fairgrad,
  ``methods/weight_methods.py``), Aligned-MTL (``--aligned-mtl``,
  github.com/SamsungLabs/MTL, ``code/optim/aligned/solver.py``), ConFIG
  (``--con-fig``, github.com/tum-pbs/ConFIG, ``conflictfree``).

Usage, from the repository root::

    python tests/reference/make_breadth_a_fixtures.py --libmtl PATH --fairgrad PATH \\
        --aligned-mtl PATH --con-fig PATH

A peer whose path is not given is skipped (its arrays are then absent). The
peers' code is only imported from those paths, never copied. ``torch.symeig``
(removed from PyTorch 2, called by LibMTL's and the authors' Aligned-MTL) is
provided as ``torch.linalg.eigh`` during their calls; the ``cvxpy`` import at the
top of the authors' FairGrad module (used by other methods there) is stubbed.

Inputs (``CASES``): for k in (2, 3, 5, 10, 20) task-gradient matrices ``J`` of
shape ``(k, m)``: ``random`` (standard normal), ``conflict`` (a shared direction
with random signs plus noise), ``scaled`` (rows scaled by 10^U(-3, 3)),
``lowrank`` (m < k), and the degenerate ``zero`` (one zero row), ``parallel``
(row 2 = 3 row 0, or row 1 = 3 row 0 for k = 2) and ``opposite`` (row 1 =
-row 0 / 2). They are float32 values; each peer runs on them in float32
(torch's default) and in float64. For a case ``c`` and a configuration ``f``,
a file holds ``c/J``, and ``c/f/<peer>_<dtype>_out`` (the aggregated vector)
and ``c/f/<peer>_<dtype>_weights`` (the weights of the rows, where the peer
exposes them). CR-MOGM's file holds sequences ``s/J`` of shape ``(T, k, m)``
and the per-step outputs and smoothed weights.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import pathlib
import subprocess
import sys
import types

import numpy as np
import torch
import torchjd
from scipy.optimize import least_squares
from torchjd import aggregation as tja
from torchjd.linalg import QuadprogProjector

OUT = pathlib.Path(__file__).resolve().parent / "fixtures" / "breadth_a"
NUM_TASKS = (2, 3, 5, 10, 20)
SEED = 20260601
DTYPES = {"f32": torch.float32, "f64": torch.float64}


# ---------------------------------------------------------------------------
# Inputs.


def make_cases(rng: np.random.Generator) -> dict[str, np.ndarray]:
    cases = {}
    for k in NUM_TASKS:
        m = 2 * k + 5
        random = rng.standard_normal((k, m))
        direction = rng.standard_normal(m)
        direction /= np.linalg.norm(direction)
        signs = np.where(np.arange(k) % 2 == 0, 1.0, -0.6)
        conflict = 2.0 * signs[:, None] * direction[None, :] + rng.standard_normal((k, m))
        scaled = rng.standard_normal((k, m)) * 10.0 ** rng.uniform(-3, 3, (k, 1))
        lowrank = rng.standard_normal((k, max(1, k // 2)))
        zero = rng.standard_normal((k, m))
        zero[1] = 0.0
        parallel = rng.standard_normal((k, m))
        parallel[min(2, k - 1)] = 3.0 * parallel[0]
        opposite = rng.standard_normal((k, m))
        opposite[1] = -0.5 * opposite[0]
        for name, matrix in [
            ("random", random),
            ("conflict", conflict),
            ("scaled", scaled),
            ("lowrank", lowrank),
            ("zero", zero),
            ("parallel", parallel),
            ("opposite", opposite),
        ]:
            cases[f"k{k:02d}_{name}"] = np.asarray(matrix, np.float32)
    return cases


def tensor(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.as_tensor(np.asarray(array, np.float64)).to(dtype)


def numpy(t) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu()
        return t.numpy()
    return np.asarray(t)


# ---------------------------------------------------------------------------
# Peers other than TorchJD, imported from the paths given.


@contextlib.contextmanager
def symeig_as_eigh():
    """``torch.symeig`` (removed in PyTorch 2) as ``torch.linalg.eigh``, for old code."""

    def symeig(matrix, eigenvectors=False, upper=True):
        values, vectors = torch.linalg.eigh(matrix, UPLO="U" if upper else "L")
        return values, vectors

    had = hasattr(torch, "symeig")
    old = getattr(torch, "symeig", None)
    torch.symeig = symeig
    try:
        yield
    finally:
        if had:
            torch.symeig = old
        else:
            del torch.symeig


def load_file(name: str, path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def git_commit(path: pathlib.Path) -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(path), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown (not a git checkout)"


class LibMTL:
    """LibMTL's weightings with the task gradients injected into ``backward``."""

    def __init__(self, root: pathlib.Path):
        # Namespace packages: LibMTL/__init__.py imports the trainer and every
        # architecture (and their dependencies), which the weightings do not need.
        for name, sub in [("LibMTL", "LibMTL"), ("LibMTL.weighting", "LibMTL/weighting")]:
            package = types.ModuleType(name)
            package.__path__ = [str(root / sub)]
            sys.modules[name] = package
        self.modules = {
            name: importlib.import_module(f"LibMTL.weighting.{name}")
            for name in ("UPGrad", "Aligned_MTL", "FairGrad")
        }

    def _instance(self, name: str, grads: torch.Tensor):
        cls = getattr(self.modules[name], name)
        weighting = cls()
        weighting.rep_grad = False
        weighting.task_num = grads.shape[0]
        weighting.device = grads.device
        weighting._compute_grad_dim = lambda: None
        weighting._compute_grad = lambda losses, mode, rep_grad=False: grads.clone()
        weighting._get_grads = lambda losses, mode: grads.clone()
        weighting._backward_new_grads = lambda *args, **kwargs: None
        return weighting

    def weights(self, name: str, grads: torch.Tensor, **kwargs) -> np.ndarray:
        weighting = self._instance(name, grads)
        losses = torch.ones(grads.shape[0], dtype=grads.dtype, requires_grad=True)
        with symeig_as_eigh():
            return np.asarray(weighting.backward(losses, **kwargs), np.float64)


class AuthorsFairGrad:
    def __init__(self, root: pathlib.Path):
        sys.modules.setdefault("cvxpy", types.ModuleType("cvxpy"))  # imported, unused here
        sys.path.insert(0, str(root))
        self.module = importlib.import_module("methods.weight_methods")
        sys.path.pop(0)

    def weights_and_direction(self, grads: torch.Tensor, alpha: float):
        k = grads.shape[0]
        method = self.module.FairGrad(k, device=torch.device("cpu"), alpha=alpha)
        # Their grads are (dim, n_tasks); their trainer then multiplies g by n_tasks.
        g, _, w = method.fairgrad(grads.T.contiguous(), alpha=alpha)
        return np.asarray(w, np.float64), numpy(g)


class AuthorsAlignedMTL:
    def __init__(self, root: pathlib.Path):
        self.module = load_file(
            "samsung_aligned_solver", root / "code" / "optim" / "aligned" / "solver.py"
        )

    def output_and_weights(self, grads: torch.Tensor, scale_mode: str):
        with symeig_as_eigh():
            aligned, weights, _ = self.module.ProcrustesSolver.apply(
                grads.T.unsqueeze(0), scale_mode
            )
        # Their balancer: grad = aligned[0].sum(-1), weights.sum(-1) (sum convention).
        return numpy(aligned[0].sum(-1)), numpy(weights.sum(-1))


class AuthorsConFIG:
    def __init__(self, root: pathlib.Path):
        sys.path.insert(0, str(root))
        self.module = importlib.import_module("conflictfree.grad_operator")
        sys.path.pop(0)

    def output(self, grads: torch.Tensor, use_least_square: bool):
        # Their EqualWeight makes its weights in torch's default dtype.
        default = torch.get_default_dtype()
        torch.set_default_dtype(grads.dtype)
        try:
            return numpy(self.module.ConFIG_update(grads, use_least_square=use_least_square))
        finally:
            torch.set_default_dtype(default)


# ---------------------------------------------------------------------------
# Per-method records.


def record(store: dict, prefix: str, **arrays):
    for key, value in arrays.items():
        store[f"{prefix}_{key}"] = np.asarray(value)


def gramian(grads: torch.Tensor) -> torch.Tensor:
    return grads @ grads.T


def pref_vector(k: int, dtype) -> torch.Tensor:
    values = torch.arange(1, k + 1, dtype=dtype)
    return values / values.sum()


def upgrad_fixture(cases, libmtl):
    store = {}
    for case, matrix in cases.items():
        k = matrix.shape[0]
        store[f"{case}/J"] = matrix
        for tag, dtype in DTYPES.items():
            grads = tensor(matrix, dtype)
            configs = {
                "default": {},
                "pref": {"pref_vector": pref_vector(k, dtype)},
                "reg1e-6": {"projector": QuadprogProjector(norm_eps=0.0, reg_eps=1e-6)},
            }
            for config, kwargs in configs.items():
                aggregator = tja.UPGrad(**kwargs)
                weighting = tja.UPGradWeighting(**kwargs)
                record(
                    store,
                    f"{case}/{config}/torchjd_{tag}",
                    out=numpy(aggregator(grads)),
                    weights=numpy(weighting(gramian(grads))),
                )
            if libmtl is not None:
                weights = libmtl.weights("UPGrad", grads, UPGrad_norm_eps=1e-4, UPGrad_reg_eps=1e-4)
                record(store, f"{case}/default/libmtl_{tag}", weights=weights)
    return store


def dualproj_fixture(cases):
    store = {}
    for case, matrix in cases.items():
        k = matrix.shape[0]
        store[f"{case}/J"] = matrix
        for tag, dtype in DTYPES.items():
            grads = tensor(matrix, dtype)
            for config, kwargs in {
                "default": {},
                "pref": {"pref_vector": pref_vector(k, dtype)},
            }.items():
                record(
                    store,
                    f"{case}/{config}/torchjd_{tag}",
                    out=numpy(tja.DualProj(**kwargs)(grads)),
                    weights=numpy(tja.DualProjWeighting(**kwargs)(gramian(grads))),
                )
    return store


def aligned_mtl_fixture(cases, libmtl, authors):
    store = {}
    for case, matrix in cases.items():
        k = matrix.shape[0]
        store[f"{case}/J"] = matrix
        for tag, dtype in DTYPES.items():
            grads = tensor(matrix, dtype)
            for mode in ("min", "median", "rmse"):
                record(
                    store,
                    f"{case}/{mode}/torchjd_{tag}",
                    out=numpy(tja.AlignedMTL(scale_mode=mode)(grads)),
                    weights=numpy(tja.AlignedMTLWeighting(scale_mode=mode)(gramian(grads))),
                )
                if authors is not None and matrix.any():  # their code fails on rank 0
                    out, weights = authors.output_and_weights(grads, mode)
                    record(store, f"{case}/{mode}/authors_{tag}", out=out, weights=weights)
            pref = {"pref_vector": pref_vector(k, dtype)}
            record(
                store,
                f"{case}/pref/torchjd_{tag}",
                out=numpy(tja.AlignedMTL(**pref)(grads)),
                weights=numpy(tja.AlignedMTLWeighting(**pref)(gramian(grads))),
            )
            if libmtl is not None:
                record(
                    store, f"{case}/min/libmtl_{tag}", weights=libmtl.weights("Aligned_MTL", grads)
                )
    return store


def con_fig_fixture(cases, authors):
    store = {}
    for case, matrix in cases.items():
        k = matrix.shape[0]
        store[f"{case}/J"] = matrix
        for tag, dtype in DTYPES.items():
            grads = tensor(matrix, dtype)
            record(store, f"{case}/default/torchjd_{tag}", out=numpy(tja.ConFIG()(grads)))
            pref = torch.arange(1, k + 1, dtype=dtype)
            record(
                store, f"{case}/pref/torchjd_{tag}", out=numpy(tja.ConFIG(pref_vector=pref)(grads))
            )
            if authors is not None:
                record(
                    store, f"{case}/default/authors_lstsq_{tag}", out=authors.output(grads, True)
                )
                record(
                    store, f"{case}/default/authors_pinv_{tag}", out=authors.output(grads, False)
                )
    return store


def krum_configs(k):
    configs = [(0, 1), (1, 1), (0, 2), (1, 3), (k - 3, 1), (2, 4)]
    return sorted({(f, s) for f, s in configs if f >= 0 and k >= f + 3 and k >= s})


def krum_fixture(cases):
    store = {}
    for case, matrix in cases.items():
        k = matrix.shape[0]
        store[f"{case}/J"] = matrix
        for tag, dtype in DTYPES.items():
            grads = tensor(matrix, dtype)
            for f, s in krum_configs(k):
                record(
                    store,
                    f"{case}/f{f}_s{s}/torchjd_{tag}",
                    out=numpy(tja.Krum(n_byzantine=f, n_selected=s)(grads)),
                    weights=numpy(tja.KrumWeighting(n_byzantine=f, n_selected=s)(gramian(grads))),
                )
    return store


def trimmed_mean_fixture(cases):
    store = {}
    for case, matrix in cases.items():
        k = matrix.shape[0]
        store[f"{case}/J"] = matrix
        for tag, dtype in DTYPES.items():
            grads = tensor(matrix, dtype)
            for trim in sorted({0, 1, (k - 1) // 2}):
                if k >= 2 * trim + 1:
                    out = numpy(tja.TrimmedMean(trim_number=trim)(grads))
                    record(store, f"{case}/t{trim}/torchjd_{tag}", out=out)
    return store


FAIRGRAD_ALPHAS = (0.5, 1.0, 2.0, 5.0)


def tight_fairgrad_weights(gram: np.ndarray, alpha: float) -> np.ndarray:
    """scipy's least_squares from the same start at (near) machine tolerances."""
    k = gram.shape[0]

    def residual(x):
        return gram @ x - np.power(x, -1.0 / alpha)

    result = least_squares(
        residual,
        np.ones(k) / k,
        bounds=(0, np.inf),
        xtol=1e-15,
        ftol=1e-15,
        gtol=1e-15,
        max_nfev=20000,
    )
    return result.x


def fairgrad_fixture(cases, libmtl, authors):
    store = {}
    for case, matrix in cases.items():
        store[f"{case}/J"] = matrix
        for tag, dtype in DTYPES.items():
            grads = tensor(matrix, dtype)
            for alpha in FAIRGRAD_ALPHAS:
                config = f"alpha{alpha:g}"
                record(
                    store,
                    f"{case}/{config}/torchjd_{tag}",
                    out=numpy(tja.FairGrad(alpha=alpha)(grads)),
                    weights=numpy(tja.FairGradWeighting(alpha=alpha)(gramian(grads))),
                )
                gram = numpy(gramian(grads)).astype(np.float64)
                record(
                    store,
                    f"{case}/{config}/tight_{tag}",
                    weights=tight_fairgrad_weights(gram, alpha),
                )
                if libmtl is not None:
                    weights = libmtl.weights("FairGrad", grads, FairGrad_alpha=alpha)
                    record(store, f"{case}/{config}/libmtl_{tag}", weights=weights)
                if authors is not None:
                    weights, direction = authors.weights_and_direction(grads, alpha)
                    record(store, f"{case}/{config}/authors_{tag}", weights=weights, out=direction)
    return store


CR_MOGM_STEPS = 6


def cr_mogm_sequences(rng):
    sequences = {}
    for k in (3, 5):
        m = 2 * k + 3
        base = rng.standard_normal((k, m))
        noise = rng.standard_normal((CR_MOGM_STEPS, k, m))
        # Mini-batch gradients: a fixed conflicting set plus noise, so the wrapped
        # weights change from step to step.
        base[1] = -0.7 * base[0] + 0.5 * base[1]
        sequences[f"k{k:02d}"] = np.asarray(base[None] + 0.8 * noise, np.float32)
    return sequences


def cr_mogm_fixture(rng):
    store = {}
    for name, sequence in cr_mogm_sequences(rng).items():
        k = sequence.shape[1]
        store[f"{name}/J"] = sequence
        initial = np.linspace(1.0, 2.0, k) / np.linspace(1.0, 2.0, k).sum()
        store[f"{name}/initial_weights"] = initial.astype(np.float32)
        for tag, dtype in DTYPES.items():
            configs = {
                "upgrad_a0.9": (tja.UPGradWeighting(), 0.9, None),
                "upgrad_a0.5_init": (tja.UPGradWeighting(), 0.5, initial),
                "dualproj_a0": (tja.DualProjWeighting(), 0.0, None),
                "aligned_mtl_a0.9": (tja.AlignedMTLWeighting(), 0.9, None),
                "aligned_mtl_a1_init": (tja.AlignedMTLWeighting(), 1.0, initial),
            }
            for config, (inner, alpha, init) in configs.items():
                init_tensor = None if init is None else tensor(init, dtype)
                weighting = tja.CRMOGMWeighting(inner, alpha=alpha, initial_weights=init_tensor)
                aggregator = tja.GramianWeightedAggregator(weighting)
                outs, weights = [], []
                for step in range(sequence.shape[0]):
                    grads = tensor(sequence[step], dtype)
                    outs.append(numpy(aggregator(grads)))
                    weights.append(numpy(weighting._lambda))
                record(
                    store,
                    f"{name}/{config}/torchjd_{tag}",
                    out=np.stack(outs),
                    weights=np.stack(weights),
                )
    return store


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--libmtl", type=pathlib.Path, help="checkout of LibMTL")
    parser.add_argument("--fairgrad", type=pathlib.Path, help="checkout of OptMN-Lab/fairgrad")
    parser.add_argument("--aligned-mtl", type=pathlib.Path, help="checkout of SamsungLabs/MTL")
    parser.add_argument("--con-fig", type=pathlib.Path, help="checkout of tum-pbs/ConFIG")
    parser.add_argument("--out", type=pathlib.Path, default=OUT)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    rng = np.random.default_rng(SEED)
    cases = make_cases(rng)
    libmtl = LibMTL(args.libmtl) if args.libmtl else None
    fairgrad = AuthorsFairGrad(args.fairgrad) if args.fairgrad else None
    aligned = AuthorsAlignedMTL(args.aligned_mtl) if args.aligned_mtl else None
    con_fig = AuthorsConFIG(args.con_fig) if args.con_fig else None

    meta = {
        "meta/torch": torch.__version__,
        "meta/torchjd": torchjd.__version__ if hasattr(torchjd, "__version__") else "0.18.0",
        "meta/libmtl": git_commit(args.libmtl) if args.libmtl else "not run",
        "meta/fairgrad": git_commit(args.fairgrad) if args.fairgrad else "not run",
        "meta/aligned_mtl": git_commit(args.aligned_mtl) if args.aligned_mtl else "not run",
        "meta/con_fig": git_commit(args.con_fig) if args.con_fig else "not run",
    }
    fixtures = {
        "upgrad": upgrad_fixture(cases, libmtl),
        "dualproj": dualproj_fixture(cases),
        "aligned_mtl": aligned_mtl_fixture(cases, libmtl, aligned),
        "con_fig": con_fig_fixture(cases, con_fig),
        "krum": krum_fixture(cases),
        "trimmed_mean": trimmed_mean_fixture(cases),
        "fairgrad": fairgrad_fixture(cases, libmtl, fairgrad),
        "cr_mogm": cr_mogm_fixture(rng),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for name, store in fixtures.items():
        path = args.out / f"{name}.npz"
        np.savez_compressed(path, **store, **{k: np.asarray(v) for k, v in meta.items()})
        print(f"{path}: {len(store)} arrays, {path.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
