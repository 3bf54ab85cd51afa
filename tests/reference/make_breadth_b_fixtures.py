"""Parity fixtures for GradVac, SDMGrad, MoDo, MoCo, ExcessMTL, DB-MTL and GradNorm.

Runs the peers' own code on stored task gradients and losses, with the
methods' state carried over several steps, and writes
``tests/reference/fixtures/breadth_b/{peer}_{method}.npz``, replayed without
torch by ``tests/aggregation/test_{method}.py``.

Peers:

* LibMTL (every method): its current sources (the PyPI ``libmtl`` is from
  2021 and lacks them), from the path given on the command line, e.g.::

      git --git-dir=<LibMTL.git> archive HEAD LibMTL | tar -x -C /tmp/libmtl
      python tests/reference/make_breadth_b_fixtures.py --libmtl /tmp/libmtl

  Only ``LibMTL/weighting/abstract_weighting.py`` and each method's file are
  imported (not the package's ``__init__``, which pulls in every weighting and
  trainer). Each weighting class is mixed into a stub model that gives it what
  LibMTL's trainer would: ``task_num``, ``device``, ``rep_grad=False``, an
  ``encoder`` (the shared parameters) with ``get_share_params`` and
  ``zero_grad_share_params``, no decoders, and for GradNorm ``epoch`` and
  ``train_loss_buffer``. The losses are linear in the shared parameters,
  :math:`\\ell_i(\\theta) = \\langle \\theta - \\theta_0, g_i\\rangle + l_i`, so at
  :math:`\\theta_0` their values are the stored ``losses`` and their gradients
  the stored task gradients; the method's output is read from the shared
  parameters' ``.grad`` after its ``backward``, as LibMTL's optimizer would.
  GradVac's ``random.shuffle`` is recorded, so the tests replay its orders.
  NumPy 2 removed ``np.alltrue`` (used by SDMGrad's projection): it is aliased
  to ``np.all``.
* TorchJD 0.18 (GradVac, SDMGrad, MoDo), if importable
  (``pip install torch==2.13.0 torchjd==0.18.0``): its aggregator or weighting
  on the stacked gradients; ``torch.randperm`` is recorded for GradVac.

Every peer runs in float64 (``torch.set_default_dtype``); the inputs are
float32 values (stored as float32), so a float32 and a float64 replay see the
same numbers.

Inputs, for each ``k`` in ``NUM_TASKS`` and each scenario (``STEPS`` steps, the
state carried from step to step): ``random`` (normal gradients), ``conflicting``
(a common direction with alternating signs of size 3 plus noise),
``scaled`` (task ``i``'s gradients and losses scaled by a fixed factor
``10 ** U(-3, 3)``) and ``degenerate`` (steps: random, a zero task gradient,
two parallel, two opposite, all equal, random); ``k = 24`` with ``random`` only.
The parameter layout (``LAYOUT``) has three layers and five leaves (19 entries),
in the same order as the pytree ``{"layer1": {"bias", "kernel"}, "layer2":
{"w"}, "layer3": {"bias", "kernel"}}`` flattens. MoDo and SDMGrad get three
batches per step (a per-task base gradient plus independent noise per batch),
plus a scenario ``same_batch`` where the three are equal (the single-batch
fallback).

A file holds, for every case ``c`` (named ``{config}__{scenario}_k{k}``):
``{c}__grads`` ``(STEPS, k, 19)`` (``(STEPS, 3, k, 19)`` for MoDo and SDMGrad),
``{c}__losses`` ``(STEPS, k)``, ``{c}__output`` ``(STEPS, 19)`` (the peer's
shared gradient, in its own scale convention), and per method the exposed
weights and state after every step (listed in ``record`` of each runner);
``configs`` maps config names to their hyperparameters (JSON in ``meta``).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import pathlib
import random
import sys
import types

import numpy as np
import torch
from torch import nn

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "breadth_b"
NUM_TASKS = (2, 3, 5, 10)
LARGE_K = 24
STEPS = 6
SEED = 20260214
# (layer, parameter, shape) in the order of the encoder's parameters() and of
# the JAX pytree's leaves.
LAYOUT = (
    ("layer1", "bias", (3,)),
    ("layer1", "kernel", (3, 2)),
    ("layer2", "w", (4,)),
    ("layer3", "bias", (2,)),
    ("layer3", "kernel", (2, 1, 2)),
)
NUM_PARAMS = sum(int(np.prod(shape)) for _, _, shape in LAYOUT)


# ---------------------------------------------------------------------------
# Inputs.


def task_gradients(rng, scenario, k, step):
    """``(k, NUM_PARAMS)`` float32 gradients and ``(k,)`` losses for one step."""
    grads = rng.standard_normal((k, NUM_PARAMS))
    losses = np.exp(0.5 * rng.standard_normal(k))
    if scenario == "conflicting":
        direction = rng.standard_normal(NUM_PARAMS)
        signs = np.where(np.arange(k) % 2 == 0, 3.0, -3.0)
        grads = 0.5 * grads + signs[:, None] * direction
    elif scenario == "scaled":
        scales = 10.0 ** np.random.default_rng(SEED + k).uniform(-3, 3, k)
        grads, losses = grads * scales[:, None], losses * scales
    elif scenario == "degenerate":
        if step == 1:
            grads[0] = 0.0
        elif step == 2:
            grads[1] = 2.0 * grads[0]
        elif step == 3:
            grads[1] = -grads[0]
        elif step == 4:
            grads[:] = grads[0]
            losses[:] = losses[0]
    return grads.astype(np.float32), losses.astype(np.float32)


def scenarios():
    for k in NUM_TASKS:
        for scenario in ("random", "conflicting", "scaled", "degenerate"):
            yield scenario, k
    yield "random", LARGE_K


SCENARIO_SEEDS = {"random": 1, "conflicting": 2, "scaled": 3, "degenerate": 4}


def single_batch_inputs(scenario, k):
    rng = np.random.default_rng([SEED, k, SCENARIO_SEEDS[scenario]])
    steps = [task_gradients(rng, scenario, k, t) for t in range(STEPS)]
    return np.stack([g for g, _ in steps]), np.stack([loss for _, loss in steps])


def three_batch_inputs(scenario, k):
    """``(STEPS, 3, k, m)`` gradients: per-task base plus independent batch noise."""
    base, losses = single_batch_inputs("random" if scenario == "same_batch" else scenario, k)
    rng = np.random.default_rng([SEED, k, 7])
    if scenario == "same_batch":
        grads = np.repeat(base[:, None], 3, axis=1)
    else:
        # Noise of half each task gradient's mean magnitude, per batch.
        magnitude = np.abs(base).mean(axis=-1, keepdims=True)[:, None]
        grads = base[:, None] + 0.5 * magnitude * rng.standard_normal((STEPS, 3) + base.shape[1:])
    return grads.astype(np.float32), losses


def three_batch_scenarios():
    for k in NUM_TASKS:
        for scenario in ("random", "scaled", "same_batch"):
            yield scenario, k
    yield "random", LARGE_K


# ---------------------------------------------------------------------------
# LibMTL, imported from its sources, with a stub model.


def import_libmtl(root: pathlib.Path, name: str):
    """``LibMTL.weighting.<name>`` without running the packages' ``__init__``."""
    for package, path in (
        ("LibMTL", root / "LibMTL"),
        ("LibMTL.weighting", root / "LibMTL/weighting"),
    ):
        if package not in sys.modules:
            module = types.ModuleType(package)
            module.__path__ = [str(path)]
            sys.modules[package] = module
    return importlib.import_module(f"LibMTL.weighting.{name}")


class Layer(nn.Module):
    def __init__(self, shapes):
        super().__init__()
        for name, shape in shapes:
            self.register_parameter(name, nn.Parameter(torch.randn(shape)))


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        for layer in dict.fromkeys(layer for layer, _, _ in LAYOUT):
            shapes = [(name, shape) for lay, name, shape in LAYOUT if lay == layer]
            self.add_module(layer, Layer(shapes))


def stub_model(weighting_class, k):
    class Model(weighting_class):
        def __init__(self):
            super().__init__()
            self.task_num, self.device, self.rep_grad = k, torch.device("cpu"), False
            self.encoder, self.decoders = Encoder(), {}

        def get_share_params(self):
            return self.encoder.parameters()

        def zero_grad_share_params(self):
            self.encoder.zero_grad(set_to_none=False)

    Model.__name__ = f"Stub{weighting_class.__name__}"
    model = Model()
    model.init_param()
    return model


def linear_losses(model, grads, losses):
    """Losses of the shared parameters with the given values and gradients at theta_0."""
    theta = torch.cat([p.view(-1) for p in model.encoder.parameters()])
    grads = torch.as_tensor(np.asarray(grads, np.float64))
    return (theta - theta.detach()) @ grads.T + torch.as_tensor(np.asarray(losses, np.float64))


def shared_grad(model):
    return torch.cat([p.grad.view(-1) for p in model.encoder.parameters()]).detach().numpy().copy()


def zero_all(model):
    for p in model.parameters():
        if p.grad is not None:
            p.grad.zero_()


class RecordingRandom:
    """Stands for the ``random`` module in GradVac.py: records every shuffle."""

    def __init__(self, seed):
        self._random = random.Random(seed)
        self.orders = []

    def shuffle(self, items):
        self._random.shuffle(items)
        self.orders.append(list(items))


LIBMTL_NAMES = {
    "gradvac": "GradVac",
    "sdmgrad": "SDMGrad",
    "modo": "MoDo",
    "moco": "MoCo",
    "excess_mtl": "ExcessMTL",
    "db_mtl": "DB_MTL",
    "gradnorm": "GradNorm",
}


def run_libmtl(root, method, config, grads, losses):
    """Runs one LibMTL method over the steps; returns the per-step records."""
    name = LIBMTL_NAMES[method]
    cls = getattr(import_libmtl(root, name), name)
    module = sys.modules[f"LibMTL.weighting.{name}"]
    k = grads.shape[-2]
    model = stub_model(cls, k)
    records = {"output": []}
    if method == "gradvac":
        recorder = RecordingRandom(SEED + k)
        module.random = recorder
        kwargs = {"GradVac_beta": config["beta"], "GradVac_group_type": config["group_type"]}
        records |= {"orders": [], "cosine_targets": []}
    elif method == "gradnorm":
        model.epoch = 0
        model.train_loss_buffer = np.zeros((k, 2))
        optimizer = torch.optim.Adam(
            [model.loss_scale], lr=config["learning_rate"], weight_decay=config["weight_decay"]
        )
        warmup = config["warmup_steps"]
        if warmup == 0:  # the reference losses: the first step's
            model.train_loss_buffer[:, 0] = losses[0]
            model.epoch = 1
        records |= {"weights": [], "logits": []}
    for t in range(STEPS):
        zero_all(model)
        if method in ("sdmgrad", "modo"):
            step_losses = torch.stack(
                [linear_losses(model, grads[t, b], losses[t]) for b in range(3)]
            )
        else:
            step_losses = linear_losses(model, grads[t], losses[t])
        if method == "gradvac":
            before = len(recorder.orders)
            model.backward(step_losses, **kwargs)
            orders = recorder.orders[before:]
            records["orders"].append(np.array(orders, np.int64).reshape(k, k - 1))
            records["cosine_targets"].append(model.rho_T.permute(2, 0, 1).numpy().copy())
        elif method == "sdmgrad":
            model.backward(
                step_losses, SDMGrad_lamda=config["lamda"], SDMGrad_niter=config["num_iters"]
            )
            records.setdefault("weights", []).append(model.w.detach().numpy().copy())
        elif method == "modo":
            w = model.backward(step_losses, MoDo_gamma=config["gamma"], MoDo_rho=config["rho"])
            records.setdefault("weights", []).append(np.asarray(w, np.float64))
        elif method == "moco":
            w = model.backward(
                step_losses,
                MoCo_beta=config["beta"],
                MoCo_beta_sigma=config["beta_sigma"],
                MoCo_gamma=config["gamma"],
                MoCo_gamma_sigma=config["gamma_sigma"],
                MoCo_rho=config["rho"],
            )
            records.setdefault("weights", []).append(np.asarray(w, np.float64))
            records.setdefault("tracked", []).append(model.y.numpy().copy())
        elif method == "excess_mtl":
            w = model.backward(step_losses, robust_step_size=config["robust_step_size"])
            records.setdefault("weights", []).append(np.asarray(w, np.float64))
            records.setdefault("squared_grad_sum", []).append(model.grad_sum.numpy().copy())
        elif method == "db_mtl":
            model.backward(step_losses, DB_beta=config["beta"], DB_beta_sigma=config["beta_sigma"])
            records.setdefault("grad_buffer", []).append(model.grad_buffer.numpy().copy())
        elif method == "gradnorm":
            if warmup and t == warmup:  # LibMTL's second epoch: epoch 0's mean loss
                model.train_loss_buffer[:, 0] = losses[:warmup].astype(np.float64).mean(0)
                model.epoch = 1
            w = model.backward(step_losses, alpha=config["alpha"])
            optimizer.step()
            records["weights"].append(np.asarray(w, np.float64))
            records["logits"].append(model.loss_scale.detach().numpy().copy())
        records["output"].append(shared_grad(model))
    return {name: np.stack(values) for name, values in records.items()}


# ---------------------------------------------------------------------------
# TorchJD 0.18.


def run_torchjd(method, config, grads, losses):
    from torchjd import aggregation

    k = grads.shape[-2]
    records = {"output": [], "weights": []}
    if method == "gradvac":
        aggregator = aggregation.GradVac(beta=config["beta"])
        records["orders"] = []
        real_randperm = torch.randperm
        generator = torch.Generator().manual_seed(SEED + k)
        drawn = []

        def recording_randperm(n, *args, **kwargs):
            perm = real_randperm(n, generator=generator)
            drawn.append(perm.tolist())
            return perm

        torch.randperm = recording_randperm
        try:
            for t in range(STEPS):
                drawn.clear()
                matrix = torch.as_tensor(grads[t], dtype=torch.float64)
                records["output"].append(aggregator(matrix).numpy().copy())
                others = [[j for j in range(k) if j != i] for i in range(k)]
                records["orders"].append(
                    np.array(
                        [[others[i][p] for p in perm] for i, perm in enumerate(drawn)]
                    ).reshape(k, k - 1)
                )
        finally:
            torch.randperm = real_randperm
        del records["weights"]  # TorchJD's GradVac exposes no weights
    else:
        if method == "sdmgrad":
            weighting = aggregation.SDMGradWeighting(
                lr=config["learning_rate"], lambda_=config["lamda"], n_iter=config["num_iters"]
            )
            pairs, direction = (1, 2), 0
        else:  # modo
            weighting = aggregation.MoDoWeighting(gamma=config["gamma"], rho=config["rho"])
            pairs, direction = (0, 1), 2
        for t in range(STEPS):
            g = torch.as_tensor(grads[t], dtype=torch.float64)
            weights = weighting(g[pairs[0]] @ g[pairs[1]].T)
            records["weights"].append(weights.numpy().copy())
            if method == "sdmgrad":  # its state w (MoDo's state is what it returns)
                records.setdefault("state_weights", []).append(weighting._w.numpy().copy())
            records["output"].append((weights @ g[direction]).numpy().copy())
    return {name: np.stack(values) for name, values in records.items()}


# ---------------------------------------------------------------------------

LIBMTL_CONFIGS = {
    "gradvac": {
        "beta0.5_whole": {"beta": 0.5, "group_type": 0},
        "beta0.5_layer": {"beta": 0.5, "group_type": 1},
        "beta0.1_matrix": {"beta": 0.1, "group_type": 2},
    },
    "sdmgrad": {
        "default": {"lamda": 0.3, "num_iters": 20},
        "lamda1": {"lamda": 1.0, "num_iters": 5},
    },
    "modo": {"default": {"gamma": 1e-3, "rho": 0.1}, "gamma0.1": {"gamma": 0.1, "rho": 0.1}},
    "moco": {
        "default": {"beta": 0.5, "beta_sigma": 0.5, "gamma": 0.1, "gamma_sigma": 0.5, "rho": 0.0},
        "rho0.1": {"beta": 0.9, "beta_sigma": 0.0, "gamma": 0.5, "gamma_sigma": 0.0, "rho": 0.1},
    },
    "excess_mtl": {"default": {"robust_step_size": 1e-2}, "step1": {"robust_step_size": 1.0}},
    "db_mtl": {
        "default": {"beta": 0.9, "beta_sigma": 0.0},
        "beta0.5_sigma0.5": {"beta": 0.5, "beta_sigma": 0.5},
    },
    "gradnorm": {
        "default": {"alpha": 1.5, "learning_rate": 1e-4, "weight_decay": 1e-5, "warmup_steps": 0},
        "lr0.05_warmup2": {
            "alpha": 0.5,
            "learning_rate": 0.05,
            "weight_decay": 1e-5,
            "warmup_steps": 2,
        },
    },
}
TORCHJD_CONFIGS = {
    "gradvac": {"beta0.5": {"beta": 0.5}},
    "sdmgrad": {
        "lr10": {"learning_rate": 10.0, "lamda": 0.3, "num_iters": 20},
        "lr0.5": {"learning_rate": 0.5, "lamda": 0.3, "num_iters": 20},
    },
    "modo": {"gamma0.1": {"gamma": 0.1, "rho": 0.1}},
}


def inputs_for(method):
    if method in ("sdmgrad", "modo"):
        return [(s, k, *three_batch_inputs(s, k)) for s, k in three_batch_scenarios()]
    cases = [(s, k, *single_batch_inputs(s, k)) for s, k in scenarios()]
    if method == "excess_mtl":
        # LibMTL divides by the first estimate: a zero gradient at the first step
        # makes its weights NaN for good (famo_jax waits for a positive estimate,
        # tested on its own); the degenerate steps start at step 1.
        assert all(np.all(np.abs(g[0]).sum(-1) > 0) for _, _, g, _ in cases)
    return cases


def write(peer, method, configs, run, source):
    arrays = {}
    for config_name, config in configs.items():
        for scenario, k, grads, losses in inputs_for(method):
            case = f"{config_name}__{scenario}_k{k}"
            arrays[f"{case}__grads"] = grads
            arrays[f"{case}__losses"] = losses
            for name, value in run(method, config, grads, losses).items():
                arrays[f"{case}__{name}"] = value
    meta = {
        "peer": peer,
        "source": source,
        "configs": configs,
        "steps": STEPS,
        "torch": torch.__version__,
    }
    FIXTURES.mkdir(parents=True, exist_ok=True)
    path = FIXTURES / f"{peer}_{method}.npz"
    np.savez_compressed(path, meta=np.array(json.dumps(meta)), **arrays)
    print(f"wrote {path} ({path.stat().st_size} bytes, {len(arrays)} arrays)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--libmtl", type=pathlib.Path, required=True, help="LibMTL source root")
    parser.add_argument("--libmtl-commit", default="unknown", help="recorded in the fixtures")
    args = parser.parse_args()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(SEED)
    if not hasattr(np, "alltrue"):
        np.alltrue = np.all
    for method, configs in LIBMTL_CONFIGS.items():
        write(
            "libmtl",
            method,
            configs,
            lambda m, c, g, losses: run_libmtl(args.libmtl, m, c, g, losses),
            f"LibMTL {args.libmtl_commit}",
        )
    try:
        version = importlib.metadata.version("torchjd")
    except importlib.metadata.PackageNotFoundError:
        print("torchjd not installed: no TorchJD fixtures")
        return
    assert version == "0.18.0", version
    for method, configs in TORCHJD_CONFIGS.items():
        write("torchjd", method, configs, run_torchjd, f"torchjd {version}")


if __name__ == "__main__":
    main()
